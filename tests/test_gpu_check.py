"""scripts/gpu_check.py (`make gpu-check`): without CUDA it says so and exits 0; `--device cpu` runs the one-GPU
steps' code on the CPU (tiny model: the same overrides, subprocesses and CSV as on a GPU); its forward check fails
for a forward that is not the plan's."""
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
    assert list(dict.fromkeys(df.step)) == ["forward", "runtime", "finetune", "generate"]
    checked = df[df.ok.notna()]
    assert len(checked) == 6 and checked.ok.astype(bool).all(), df[["step", "check", "value", "detail"]]
    row = df.set_index("check")
    assert float(row.loc["fp32: max |cqil - reference| / scale", "value"]) < 1e-4
    assert row.loc["optimizer steps", "value"] == "4" or int(row.loc["optimizer steps", "value"]) == 4
    assert float(row.loc["TTFT median (ms)", "value"]) > 0
    assert (df.gpu == "cpu").all() and df.command.notna().all() and df.torch.notna().all()


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
