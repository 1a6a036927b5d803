"""`cqil plot`: draw the figures (cqil.plots.FIGURES) whose input CSVs exist, or only `figures=[...]`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from . import CqilError
from .plots import FIGURES
from .results import read_csv


def inputs(csv: str, png: str) -> list[tuple[str, str]]:
    """(CSV, PNG) pairs: a `*` in the CSV path draws one figure per match, its part replacing the PNG's `*`."""
    if "*" not in csv:
        return [(csv, png)]
    head, tail = csv.split("*", 1)
    matches = sorted(str(p) for p in Path(head).parent.glob(Path(csv).name))
    return [(m, png.replace("*", m[len(head):len(m) - len(tail)])) for m in matches] or [(csv, png)]


def draw_together(name: str, draw, csvs: dict[str, str], png: str, asked: bool) -> int:
    """One figure from several tables, each config key's matches concatenated; 0 (not drawn) if a key matches
    nothing, unless the figure was asked for by name (then the missing table is the error)."""
    tables = {}
    for key, pattern in csvs.items():
        paths = sorted(Path(pattern).parent.glob(Path(pattern).name)) if "*" in pattern else [Path(pattern)]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            if asked:
                raise CqilError(f"{key}={pattern}: no such table; figure {name} needs it (run the study that writes it)")
            return 0
        tables[key] = pd.concat([read_csv(p) for p in paths], ignore_index=True)
    try:
        print(f"{name}: {', '.join(csvs.values())} -> {draw(tables, png)}")
    except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise CqilError(f"{', '.join(csvs.values())} cannot be drawn as {name} ({type(e).__name__}: {why}); "
                        "are they the tables the jobs named in conf/plot.yaml write?") from None
    return 1


def run(cfg: DictConfig) -> None:
    names = list(cfg.figures) if cfg.figures else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise CqilError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    drawn = 0
    for name in names:
        draw, csv_key, png_key = FIGURES[name]
        if isinstance(csv_key, tuple):
            drawn += draw_together(name, draw, {k: cfg[k] for k in csv_key}, cfg[png_key], bool(cfg.figures))
            continue
        for csv, png in inputs(cfg[csv_key], cfg[png_key]):
            if not Path(csv).is_file():
                if cfg.figures:  # asked for explicitly: its input must exist
                    read_csv(csv)
                continue
            try:  # cqil.checks has read the table's columns; this catches values no figure can draw
                print(f"{name}: {csv} -> {draw(read_csv(csv), png)}")
            except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
                why = (str(e).strip().splitlines() or [""])[0]
                raise CqilError(f"{csv} cannot be drawn as {name} ({type(e).__name__}: {why}); "
                                "is it the table the job named in conf/plot.yaml writes?") from None
            drawn += 1
    if not drawn:
        raise CqilError("no result CSVs found to draw from; run `cqil analyze` (or the job named) first")
