"""Plan choice (cqil.planning): many plans' perplexities at once, candidates from similarity, the choice rule."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import auto_overrides, model_and_tokenizer
from cqil import CqilError, cli, planning
from cqil.metrics import perplexity
from cqil.modeling import apply_plan
from cqil.plan import Plan, PlanError


def test_plan_perplexities_equal_full_model_perplexity(tiny_llama):
    model = tiny_llama(6)
    blocks = torch.randint(3, 97, (5, 16), generator=torch.Generator().manual_seed(0))
    plans = [Plan(), Plan.from_range(1, 5, 2, 1, 6), Plan.from_range(3, 6, 3, 2, 6), Plan(((0, 1), (4, 5)), 0)]
    shared = planning.plan_perplexities(model, blocks, plans, batch_size=2)
    for plan, got in zip(plans, shared):
        assert got == pytest.approx(perplexity(apply_plan(model, plan), blocks, batch_size=2), rel=1e-5)
    assert planning.plan_perplexities(model, blocks, plans[:1])[0] == pytest.approx(shared[0], rel=1e-6)


def test_candidates_are_the_widest_similar_spans_per_start():
    n = 8
    sim = np.full((n + 1, n + 1), 0.95)
    sim[4, 5] = 0.5  # layers 4 and 5 see very different inputs: no group may start at 4 and contain 5
    plans = planning.candidate_plans(sim, n, [2, 3], bypass=0, min_similarity=0.9, keep_first=1, keep_last=1)
    got = {(p.group_size, p.groups[0][0], p.groups[-1][-1] + 1) for p in plans}
    # P=2: S=2 stops before the failing group [4,5]; odd starts never form it; S=4 has no candidate.
    # P=3: [4,5,6] fails (cos(x4, x5) = 0.5), so S=1 stops at E=4; E <= 7 keeps layer 7 sequential.
    assert got == {(2, 1, 7), (2, 2, 4), (2, 3, 7), (2, 5, 7), (3, 1, 4), (3, 2, 5), (3, 3, 6)}
    assert all(p.groups[0][0] >= 1 and p.groups[-1][-1] + 1 <= n - 1 for p in plans)  # first/last sequential
    assert all(planning.group_similarity(sim, g[0], len(g)) >= 0.9 for p in plans for g in p.groups)
    with pytest.raises(PlanError, match="group size must be >= 2"):
        planning.candidate_plans(sim, n, [1, 2], 0, 0.9, 1, 1)


def test_auto_choice_rule(analyzed, tmp_path, monkeypatch, capsys):
    """Largest ideal reduction within the budget wins; ties go to the smaller P, then the lower perplexity."""
    def fake(model, blocks, plans, batch_size=4, desc=""):  # damage grows with reduction, then with start
        n = model.config.num_hidden_layers
        return [10.0 * (1 + 2 * p.ideal_latency_reduction(n)) + (0.01 * p.groups[0][0] if p.groups else 0)
                for p in plans]
    monkeypatch.setattr(planning, "plan_perplexities", fake)
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.6"))
    plan = planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data)
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
        planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data)
    assert not pd.read_csv(tmp_path / "candidates.csv").chosen.any()
    assert not (tmp_path / "plan.json").exists()
