"""`cqil convert` (with plan=auto) and `cqil sweep` end to end on a tiny saved checkpoint with real text files."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import auto_overrides, overrides
from cqil import cli, convert, outputs, plots
from cqil.metrics import perplexity
from cqil.modeling import apply_plan, get_plan, plan_disabled
from cqil.plan import Plan, PlanError
from cqil.planning import sweep_plans


def test_auto_picks_the_largest_reduction_within_budget_and_converts(analyzed, tmp_path):
    out_dir = tmp_path / "converted"
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.5", "eval_tokens=256",
                                                f"out_dir={out_dir}", f"results={tmp_path}/convert.csv"))
    convert.run(cfg)
    table = pd.read_csv(tmp_path / "candidates.csv")
    assert set(table.group_size) == {2, 3, 4} and table.chosen.sum() == 1
    assert (table.within_budget == (table.ppl_ratio <= 1.5)).all()
    chosen = table[table.chosen].iloc[0]
    assert chosen.ideal_latency_reduction == table[table.within_budget].ideal_latency_reduction.max()
    plan = Plan.load(tmp_path / "plan.json", 8)
    assert plan.describe() == chosen.plan and {"command", "torch", "date"} <= set(table.columns)

    rows = pd.read_csv(tmp_path / "convert.csv")
    assert list(rows.variant) == ["original", "converted"] and rows.plan.iloc[1] == plan.describe()
    # the saved directory works on its own: plan in its config, generate() through its tokenizer
    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)  # its config names remote code
    assert Plan.from_dict(model.config.cqil_plan) == plan
    # cqil's helpers also work on the model's own (remote-code) copy of the CQIL classes
    assert get_plan(model) == plan
    ids = torch.randint(3, 60, (1, 12))
    with torch.no_grad(), plan_disabled(model):
        disabled = model(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(analyzed["model"]).eval()
    torch.testing.assert_close(disabled, original(input_ids=ids).logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_plan(model, Plan())(input_ids=ids).logits, disabled, atol=1e-5, rtol=1e-5)
    prompt = tokenizer("the cat sat", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt.input_ids.shape[1] + 5) and isinstance(tokenizer.decode(out[0]), str)
    assert perplexity(model, prompt.input_ids) > 1  # scored like any HF model
    # its model card: what it is, what was measured, how to load it; listed in the manifest (the rerun below may
    # replace the directory); and the failure it warns of is the one stock transformers gives
    card = (out_dir / "README.md").read_text()
    assert "README.md" in outputs.manifest(out_dir)["files"] and plan.describe() in card
    assert f"{rows.perplexity.iloc[1]:.4g}" in card and f"source model: `{analyzed['model']}`" in card
    assert "cqil eval model=hf" in card and f"from_pretrained({str(out_dir)!r}, trust_remote_code=True)" in card
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out_dir)

    # a rerun with plan=file replaces its rows instead of piling them up
    convert.run(cli.compose("convert", overrides(analyzed, tmp_path, "plan=file", f"plan.file={tmp_path}/plan.json",
                                                 "eval_tokens=256", f"out_dir={out_dir}",
                                                 f"results={tmp_path}/convert.csv")))
    rows = pd.read_csv(tmp_path / "convert.csv")
    assert len(rows) == 2 and list(rows.plan_mode) == ["file", "file"]


def test_cli_errors_are_one_line(analyzed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", *auto_overrides(analyzed, tmp_path, f"plan.similarity_csv={tmp_path}/none.csv",
                                             "eval_tokens=256")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # progress bars may come first; the error is one line, no traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith("cqil convert: error:") and "run `cqil analyze`" in last and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", *overrides(analyzed, tmp_path, "plan.start=2", "plan.end=7", "plan.group_size=2",
                                        "eval_tokens=256")])
    assert exit_.value.code == 2 and "not a multiple of group_size=2" in capsys.readouterr().err


def test_sweep_table_and_figure(tiny_checkpoint, tmp_path):
    assert [p.describe() for p in sweep_plans(8, [2, 3], ends=[7], min_start=1, bypass=0)] == [
        "S5 E7 P2 D0", "S3 E7 P2 D0", "S1 E7 P2 D0", "S4 E7 P3 D0", "S1 E7 P3 D0"]
    with pytest.raises(PlanError, match="must be in 1..8"):
        sweep_plans(8, [2], ends=[9], min_start=1, bypass=0)
    csv = tmp_path / "sweep.csv"
    convert.sweep(cli.compose("sweep", overrides(tiny_checkpoint, tmp_path, "eval_tokens=256", f"out={csv}")))
    table = pd.read_csv(csv)
    # original; default ends [6, 7], S >= 1: P=2 S=4,2 | 5,3,1; P=3 S=3 | 4,1; P=4 S=2 | 3
    assert len(table) == 1 + 5 + 3 + 2
    assert table.ppl_ratio.iloc[0] == 1.0 and set(table.end.dropna()) == {6, 7}
    png = plots.sweep_perplexity(table, tmp_path / "sweep.png")
    assert png.stat().st_size > 0
