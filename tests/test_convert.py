"""plan=auto, `cqil convert` and `cqil sweep` end to end on a tiny saved checkpoint with real text files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cqil import CqilError, cli, convert, plots, similarity
from cqil.evaluate import perplexity
from cqil.modeling import apply_plan, get_plan, plan_disabled
from cqil.plan import Plan, PlanError


def overrides(ckpt: dict, tmp_path, *extra: str) -> list[str]:
    """Point a job at the tiny checkpoint, its text files and tmp_path (block size 64)."""
    files = ",".join(f"'{f}'" for f in ckpt["files"])
    return [f"model.path={ckpt['model']}", "model.name=tiny", f"data.files=[{files}]", "data.name=tiny",
            "data.block_size=64", *extra]


@pytest.fixture
def analyzed(tiny_checkpoint, tmp_path) -> dict:
    """tiny_checkpoint plus a real `cqil analyze` CSV of it."""
    csv = tmp_path / "similarity.csv"
    similarity.run(cli.compose("analyze", overrides(tiny_checkpoint, tmp_path, "n_tokens=256", f"out={csv}")))
    return {**tiny_checkpoint, "similarity": str(csv)}


def auto_overrides(ckpt: dict, tmp_path, *extra: str) -> list[str]:
    return overrides(ckpt, tmp_path, "plan=auto", f"plan.similarity_csv={ckpt['similarity']}",
                     "plan.calibration_tokens=256", f"plan.table={tmp_path}/candidates.csv",
                     f"plan.out={tmp_path}/plan.json", "plan.min_similarity=-1", *extra)


def test_plan_perplexities_equal_full_model_perplexity(tiny_llama):
    model = tiny_llama(6)
    blocks = torch.randint(3, 97, (5, 16), generator=torch.Generator().manual_seed(0))
    plans = [Plan(), Plan.from_range(1, 5, 2, 1, 6), Plan.from_range(3, 6, 3, 2, 6), Plan(((0, 1), (4, 5)), 0)]
    shared = convert.plan_perplexities(model, blocks, plans, batch_size=2)
    for plan, got in zip(plans, shared):
        assert got == pytest.approx(perplexity(apply_plan(model, plan), blocks, batch_size=2), rel=1e-5)
    assert convert.plan_perplexities(model, blocks, plans[:1])[0] == pytest.approx(shared[0], rel=1e-6)


def test_candidates_are_the_widest_similar_spans_per_start():
    n = 8
    sim = np.full((n + 1, n + 1), 0.95)
    sim[4, 5] = 0.5  # layers 4 and 5 see very different inputs: no group may start at 4 and contain 5
    plans = convert.candidate_plans(sim, n, [2, 3], bypass=0, min_similarity=0.9, keep_first=1, keep_last=1)
    got = {(p.group_size, p.groups[0][0], p.groups[-1][-1] + 1) for p in plans}
    # P=2: S=2 stops before the failing group [4,5]; odd starts never form it; S=4 has no candidate.
    # P=3: [4,5,6] fails (cos(x4, x5) = 0.5), so S=1 stops at E=4; E <= 7 keeps layer 7 sequential.
    assert got == {(2, 1, 7), (2, 2, 4), (2, 3, 7), (2, 5, 7), (3, 1, 4), (3, 2, 5), (3, 3, 6)}
    assert all(p.groups[0][0] >= 1 and p.groups[-1][-1] + 1 <= n - 1 for p in plans)  # first/last sequential
    assert all(convert.group_similarity(sim, g[0], len(g)) >= 0.9 for p in plans for g in p.groups)
    with pytest.raises(PlanError, match="group size must be >= 2"):
        convert.candidate_plans(sim, n, [1, 2], 0, 0.9, 1, 1)


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

    # a rerun with plan=file replaces its rows instead of piling them up
    convert.run(cli.compose("convert", overrides(analyzed, tmp_path, "plan=file", f"plan.file={tmp_path}/plan.json",
                                                 "eval_tokens=256", f"out_dir={out_dir}",
                                                 f"results={tmp_path}/convert.csv")))
    rows = pd.read_csv(tmp_path / "convert.csv")
    assert len(rows) == 2 and list(rows.plan_mode) == ["file", "file"]


def test_auto_choice_rule(analyzed, tmp_path, monkeypatch, capsys):
    """Largest ideal reduction within the budget wins; ties go to the smaller P, then the lower perplexity."""
    def fake(model, blocks, plans, batch_size=4, desc=""):  # damage grows with reduction, then with start
        n = model.config.num_hidden_layers
        return [10.0 * (1 + 2 * p.ideal_latency_reduction(n)) + (0.01 * p.groups[0][0] if p.groups else 0)
                for p in plans]
    monkeypatch.setattr(convert, "plan_perplexities", fake)
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.6"))
    plan = convert.resolve_plan(cfg.plan, *_model_and_tokenizer(analyzed), cfg.data)
    table = pd.read_csv(tmp_path / "candidates.csv")
    assert plan.ideal_latency_reduction(8) == 0.25 == table[table.within_budget].ideal_latency_reduction.max()
    tied = table[table.ideal_latency_reduction == 0.25]
    assert set(tied.group_size) == {2, 3} and plan.group_size == 2  # 2 groups of 2 beat 1 group of 3
    assert plan.groups[0][0] == tied[tied.group_size == 2].start.min()  # then the lowest perplexity
    assert table.ideal_latency_reduction.max() > 0.25  # bolder candidates existed and were refused
    assert "every bolder candidate exceeds the budget" in capsys.readouterr().out


def test_auto_without_a_candidate_in_budget_says_so_and_keeps_the_table(analyzed, tmp_path):
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=0.5"))
    with pytest.raises(CqilError, match=r"none of the \d+ candidates keeps calibration perplexity within 0.5 x"):
        convert.resolve_plan(cfg.plan, *_model_and_tokenizer(analyzed), cfg.data)
    assert not pd.read_csv(tmp_path / "candidates.csv").chosen.any()
    assert not (tmp_path / "plan.json").exists()


def _model_and_tokenizer(ckpt: dict):
    from cqil import models
    return models.load({"name": "tiny", "path": ckpt["model"]})


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
    assert [p.describe() for p in convert.sweep_plans(8, [2, 3], ends=[7], min_start=1, bypass=0)] == [
        "S5 E7 P2 D0", "S3 E7 P2 D0", "S1 E7 P2 D0", "S4 E7 P3 D0", "S1 E7 P3 D0"]
    with pytest.raises(PlanError, match="must be in 1..8"):
        convert.sweep_plans(8, [2], ends=[9], min_start=1, bypass=0)
    csv = tmp_path / "sweep.csv"
    convert.sweep(cli.compose("sweep", overrides(tiny_checkpoint, tmp_path, "eval_tokens=256", f"out={csv}")))
    table = pd.read_csv(csv)
    # original; default ends [6, 7], S >= 1: P=2 S=4,2 | 5,3,1; P=3 S=3 | 4,1; P=4 S=2 | 3
    assert len(table) == 1 + 5 + 3 + 2
    assert table.ppl_ratio.iloc[0] == 1.0 and set(table.end.dropna()) == {6, 7}
    png = plots.sweep_perplexity(table, tmp_path / "sweep.png")
    assert png.stat().st_size > 0
