"""scripts/gpu_check.py (`make gpu-check`): without CUDA it says so and exits 0; `--device cpu` runs the one-GPU
steps' code on the CPU (tiny model: the same overrides, subprocesses and CSV as on a GPU; the layer-step
microbenchmark on a tiny shape, whose table cqil latency must accept); its forward check fails for a forward that
is not the plan's."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_dry_run_on_cpu(gpu_check, tmp_path):
    from cqil.results import read_csv

    assert gpu_check.main(["--device", "cpu", "--model", "tiny", "--out", str(tmp_path)]) == 0
    df = read_csv(tmp_path / "gpu_check_cpu.csv")
    assert list(dict.fromkeys(df.step)) == ["forward", "runtime", "layer_step", "finetune", "generate"]
    checked = df[df.ok.notna()]
    assert len(checked) == 9 and checked.ok.astype(bool).all(), df[["step", "check", "value", "detail"]]
    row = df.set_index("check")
    assert float(row.loc["fp32: max |cqil - reference| / scale", "value"]) < 1e-4
    assert row.loc["optimizer steps", "value"] == "4" or int(row.loc["optimizer steps", "value"]) == 4
    assert float(row.loc["TTFT median (ms)", "value"]) > 0
    assert (df.gpu == "cpu").all() and df.command.notna().all() and df.torch.notna().all()
    check_layer_step_table(tmp_path / "layer_step_cpu.csv")


def check_layer_step_table(path):
    """The layer-step microbenchmark's dry run (tiny shape, eager and compiled, TP shards 1/2/4): the table has the
    schema cqil latency reads, one row per shard and mode, its fits are the fit of its rows, and cqil latency's
    checks accept it."""
    from cqil import checks, cli, layerstep, paths
    from cqil.outputs import READS
    from cqil.results import read_csv

    ls = read_csv(path)
    assert set(READS["latency layer step"].columns) <= set(ls.columns) and (ls.gpu == "cpu").all()
    assert sorted(zip(ls["shard"], ls["mode"])) == [(c, m) for c in (1, 2, 4) for m in ("compiled", "eager")]
    assert (ls.p10_us <= ls.median_us).all() and (ls.median_us <= ls.p90_us).all() and (ls.median_us > 0).all()
    assert (ls.graph_breaks == 0).all() and (ls.depth == 2).all() and ls.command.notna().all()
    whole = ls[ls["shard"] == 1].weight_bytes.iloc[0]
    assert (ls[ls["shard"] == 4].weight_bytes < whole / 3).all()  # a quarter of the matrices, whole norms
    for _, g in ls.groupby("mode"):
        c0, bandwidth, residual = layerstep.fit_step(g["bytes"].to_numpy(), g.median_us.to_numpy())
        assert g.fit_c0_us.to_numpy() == pytest.approx(c0) and g.fit_residual_us.to_numpy() == pytest.approx(residual)
    cfg = cli.compose("latency", [f"layer_step.csv={path}", "layer_step.hardware=a100"])
    checks.validate("latency", cfg, paths.conf_dir())


def test_the_forward_check_fails_for_another_forward(gpu_check, tmp_path, monkeypatch):
    """The grouped forward with bypass D=1 is not the D=0 formula: the fp32 check says so."""
    from cqil import modeling
    from cqil.plan import Plan

    ckpt, _ = gpu_check.pick_model("tiny", tmp_path)
    plan = gpu_check.group_plan(8, 2)
    check = gpu_check.Check(tmp_path, "cpu", "tiny")
    real = modeling.apply_plan
    monkeypatch.setattr(modeling, "apply_plan", lambda model, p: real(model, Plan(p.groups, bypass=1)))
    gpu_check.step_forward(check, ckpt, "cpu", plan)
    assert check.rows[0]["ok"] is False and check.failed
