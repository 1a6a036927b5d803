"""The registry of result tables (cqil.outputs.TABLES and READS): the writers, the checks and the figures agree with it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cqil import checks, plots
from cqil.cli import compose
from cqil.inputs import bench_command
from cqil.outputs import PROVENANCE, READS, TABLES
from cqil.plot import inputs
from cqil.results import update_table

REPO = Path(__file__).resolve().parents[1]


def test_each_figure_draws_from_the_columns_its_read_declares(tmp_path, monkeypatch):
    """Every committed table a figure is drawn from (conf/plot.yaml's defaults) is its TABLES table and has the
    columns READS declares for it; the figure draws from those columns alone (a column its drawing reads but the
    registry leaves out fails here, so cqil plot's check is what the drawing needs)."""
    monkeypatch.chdir(REPO)
    cfg = compose("plot", [])
    drawn = set()
    for name, (draw, csv_key, _) in plots.FIGURES.items():
        keys = csv_key if isinstance(csv_key, tuple) else (csv_key,)
        tables = {}
        for key in keys:
            paths = [Path(csv) for csv, _ in inputs(cfg[key], "x*.png") if Path(csv).is_file()]
            if not paths:
                break
            read = READS[key]
            for path in paths:
                assert TABLES[read.table].ours(path), f"{path} is not a {read.table} table"
            frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
            assert not set(read.columns) - set(frame.columns), f"{key}: {set(read.columns) - set(frame.columns)}"
            tables[key] = frame[list(read.columns)]
        else:
            draw(tables if isinstance(csv_key, tuple) else tables[csv_key], tmp_path / f"{name}.png")
            drawn.add(name)
    assert {"similarity_heatmap", "accuracy", "plan_candidates", "finetune_loss", "bench_latency", "scale"} <= drawn


def test_the_plot_checks_cover_every_figure_by_its_read():
    """cqil plot checks each figure's table as READS declares it, under the figure names plots.FIGURES gives it."""
    figures: dict[str, set[str]] = {}
    for name, (_, csv_key, _) in plots.FIGURES.items():
        for key in csv_key if isinstance(csv_key, tuple) else (csv_key,):
            figures.setdefault(key, set()).add(name)
    plot = checks.CHECKS["plot"]
    assert {k: set(plot[k].figures) for k in figures} == figures
    assert all(plot[k].read is READS[k] for k in figures)


def test_a_writer_cannot_drop_a_declared_column(tmp_path):
    """update_table refuses rows without the schema's columns: the table would not be recognised as cqil's next time."""
    row = {c: 1 for c in TABLES["sweep"].columns} | dict.fromkeys(PROVENANCE, "x")
    update_table("sweep", [row], tmp_path / "sweep.csv")
    assert TABLES["sweep"].ours(tmp_path / "sweep.csv")
    with pytest.raises(AssertionError, match="lack perplexity"):
        update_table("sweep", [{k: v for k, v in row.items() if k != "perplexity"}], tmp_path / "sweep.csv")


def test_the_command_that_remakes_a_bench_table_is_its_own():
    """A bench table names its plan in its `command` column, never in its file name: that is the command to remake
    it; a table that does not exist gets the command with the plan left to give."""
    table = REPO / "results" / "bench" / "latency_smollm2-135m_auto-T32.csv"
    assert bench_command(str(table)) == pd.read_csv(table).command.iloc[0]
    assert bench_command("none_S24E28P2D0.csv") == "cqil bench plan.start=.. plan.end=.. out=none_S24E28P2D0.csv"
