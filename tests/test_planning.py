"""Plan choice (cqil.planning): many plans' perplexities at once, single groups -> greedy sets and contiguous
spans, the choice rule before and after recovery, the recovery probe, and the choice made once under torchrun."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers, also for the torchrun worker below
from conftest import auto_overrides, model_and_tokenizer  # noqa: E402
from cqil import CqilError, cli, data, planning, plots  # noqa: E402
from cqil.metrics import perplexity  # noqa: E402
from cqil.modeling import apply_plan, get_plan  # noqa: E402
from cqil.plan import Plan, PlanError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# A tiny probe: 2 steps of 2 x 32 tokens with a small adapter, enough to move the model and cheap to run.
PROBE = ["plan.probe.steps=2", "plan.probe.overrides=['lora.r=4','lora.alpha=8','train.batch_size=2',"
         "'train.block_size=32','train.lr=1e-2','train.warmup=0']", "plan.probe.max_before_ratio=1000.0"]


def test_plan_perplexities_equal_full_model_perplexity(tiny_llama):
    model = tiny_llama(6)
    blocks = torch.randint(3, 97, (5, 16), generator=torch.Generator().manual_seed(0))
    plans = [Plan(), Plan.from_range(1, 5, 2, 1, 6), Plan.from_range(3, 6, 3, 2, 6), Plan(((0, 1), (4, 5)), 0)]
    shared = planning.plan_perplexities(model, blocks, plans, batch_size=2)
    for plan, got in zip(plans, shared):
        assert got == pytest.approx(perplexity(apply_plan(model, plan), blocks, batch_size=2), rel=1e-5)
    assert planning.plan_perplexities(model, blocks, plans[:1])[0] == pytest.approx(shared[0], rel=1e-6)


def test_single_groups_greedy_sets_and_cheapest_spans():
    n = 10
    sim = np.full((n + 1, n + 1), 0.95)
    sim[4, 5] = 0.5  # x_4 is far from x_5: layer 5 may not share a group that starts at layer 4
    # windows within [1, 9) (first and last layer sequential) except those starting at 4 ([3,4,5] passes:
    # its shared input x_3 is close to x_4 and x_5)
    assert planning.single_groups(sim, n, 2, 0.9, 1, 1) == [1, 2, 3, 5, 6, 7]
    assert planning.single_groups(sim, n, 3, 0.9, 1, 1) == [1, 2, 3, 5, 6]
    with pytest.raises(PlanError, match="must be >= 2"):
        planning.single_groups(sim, n, 1, 0.9, 1, 1)

    cost = {1: 0.5, 2: 0.1, 3: 0.3, 5: 0.2, 6: 0.05, 7: 0.4}
    sets = planning.greedy_sets(list(cost), cost, 2)
    # cheapest first: 6, then 2, then 5 (overlaps 6: skipped), 3 (overlaps 2), 7 (overlaps 6), 1 (overlaps 2)
    assert sets == [[6], [2, 6]]
    spans = planning.cheapest_spans(list(cost), cost, 2, per_count=2)
    # 2 groups: [1,3] 0.8, [3,5] 0.5, [5,7] 0.6 -> [3,5], [5,7]; 3 groups: [1,3,5] 1.0, [3,5,7] 0.9; 4: [1,3,5,7]
    assert spans == [[3, 5], [5, 7], [3, 5, 7], [1, 3, 5], [1, 3, 5, 7]]
    plan = planning.plan_of_starts([2, 6], 2, 0, n)
    assert plan.groups == ((2, 3), (6, 7)) and not planning.is_contiguous(plan)
    assert planning.is_contiguous(planning.plan_of_starts([3, 5], 2, 1, n))


def test_pareto_front_and_search():
    table = pd.DataFrame({"ideal": [0.1, 0.2, 0.2, 0.3, 0.4], "calibration_ppl": [11.0, 12.0, 15.0, 13.0, 12.5],
                          "group_size": [2, 2, 2, 3, 2]})
    # 0.4 at 12.5 beats 0.3 at 13 (dominated) and 0.2 at 15; 0.2 at 12 and 0.1 at 11 stay
    assert list(planning.pareto_front(table, "ideal")) == [True, True, False, False, True]

    def searcher(passing: int):
        asked = []
        def ok(i):
            asked.append(i)
            return i <= passing
        return ok, asked
    for n in (1, 2, 7, 8):
        for passing in range(-1, n):
            ok, asked = searcher(passing)
            assert planning.search_front(n, "bisect", ok) == passing
            assert len(asked) <= math.ceil(math.log2(n + 1)) and len(set(asked)) == len(asked)
            ok, asked = searcher(passing)
            assert planning.search_front(n, "all", ok) == passing and asked == list(range(n))


def additive(costs: dict[tuple[int, int], float]):
    """A stand-in for plan_perplexities whose plan costs add up exactly: ppl = 10 exp(sum of group costs)."""
    def fake(model, blocks, plans, batch_size=4, desc=""):
        return [10.0 * math.exp(sum(costs.get((len(g), g[0]), 0.3 * len(g)) for g in p.groups)) for p in plans]
    return fake


# cheap groups on the tiny 8-layer model (layers 1..6 may be grouped): P=2 at 1 and 4 (a gap at layer 3)
COSTS = {(2, 1): 0.01, (2, 4): 0.02, (2, 2): 0.2, (2, 3): 0.2, (2, 5): 0.2}


def test_candidates_and_the_choice_before_recovery(analyzed, tmp_path, monkeypatch, capsys):
    """Greedy sets are cheapest first and may leave gaps; the table checks measured against summed costs; the
    largest ideal reduction within the budget wins, ties to the smaller P."""
    monkeypatch.setattr(planning, "plan_perplexities", additive(COSTS))
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.05"))
    plan = planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data)
    table = pd.read_csv(tmp_path / "candidates.csv")
    greedy = table[table.greedy_step.notna() & (table.group_size == 2)].sort_values("greedy_step")
    assert list(greedy.plan) == ["S1 E3 P2 D0", "groups [[1, 2], [4, 5]] D0"]  # then every window overlaps
    assert list(greedy.contiguous) == [True, False]
    assert np.allclose(table.log_ppl_increase, table.predicted_log_ppl_increase, atol=2e-4)  # additive stand-in
    assert (table.ppl_ratio.round(3) == np.exp(table.log_ppl_increase).round(3)).all()
    # contiguous spans of 2 groups: the two with the lowest summed costs ([1,3] 0.21, [2,4] 0.22)
    spans = table[table.contiguous & (table.n_groups == 2) & (table.group_size == 2)]
    assert set(spans.plan) == {"S1 E5 P2 D0", "S2 E6 P2 D0"}
    # the greedy set (0.03) beats every contiguous span of as many groups (>= 0.21): it is chosen at 2/8
    assert plan == Plan(((1, 2), (4, 5))) and table[table.chosen].plan.tolist() == ["groups [[1, 2], [4, 5]] D0"]
    assert table[table.within_budget].ideal_latency_reduction.max() == 0.25 and table.pareto.any()
    assert Plan.from_dict(json.loads(table[table.chosen].plan_json.iloc[0])) == plan
    out = capsys.readouterr().out
    assert "greedy group set vs best contiguous span" in out and "every bolder one exceeds the budget" in out
    assert plots.plan_candidates(table, tmp_path / "candidates.png").stat().st_size > 0

    # ties at the largest reduction in budget: P=2 (two groups) beats P=3 (one group), both 2/8
    monkeypatch.setattr(planning, "plan_perplexities", additive({(2, 1): 0.01, (2, 4): 0.01, (3, 1): 0.001}))
    plan = planning.resolve_plan(cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.05")).plan,
                                 *model_and_tokenizer(analyzed), cfg.data)
    table = pd.read_csv(tmp_path / "candidates.csv")
    assert set(table[table.within_budget & (table.ideal_latency_reduction == 0.25)].group_size) == {2, 3}
    assert plan.group_size == 2 and len(plan.groups) == 2


def test_a_ceiling_on_the_ideal_reduction_picks_the_best_plan_at_it(analyzed, tmp_path, monkeypatch):
    """plan.max_ideal_reduction with a loose budget: the cheapest plan of the largest reduction at or below it (the
    scale study's equal-reduction choice); 1/8 written rounded (0.125 exactly here, 0.1667 for 1/6) still counts."""
    monkeypatch.setattr(planning, "plan_perplexities", additive(COSTS))
    for ceiling, expected in (("0.125", Plan(((1, 2),))), ("0.2", Plan(((1, 2),))), ("0.25", Plan(((1, 2), (4, 5))))):
        cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=100",
                                                     f"plan.max_ideal_reduction={ceiling}"))
        assert planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data) == expected
        table = pd.read_csv(tmp_path / "candidates.csv")
        assert table[table.within_budget].ideal_latency_reduction.max() <= float(ceiling)
        assert (table.ideal_latency_reduction > float(ceiling)).any()  # there were bolder plans, all left out


def test_no_candidate_in_budget_says_so_and_keeps_the_table(analyzed, tmp_path):
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=0.5"))
    with pytest.raises(CqilError, match=r"none of the \d+ candidates keeps its calibration perplexity within 0.5 x"):
        planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data)
    assert not pd.read_csv(tmp_path / "candidates.csv").chosen.any()
    assert not (tmp_path / "plan.json").exists()


def test_choice_after_recovery_probes_the_front(analyzed, tmp_path, monkeypatch):
    """Probes go to Pareto-front candidates only; the largest reduction whose probed perplexity is in budget wins,
    even where it was far over the budget before recovery; bisect probes fewer than all and agrees with all."""
    monkeypatch.setattr(planning, "plan_perplexities", additive(COSTS))
    probed = []

    def fake_probe(model, plan, recipe, train_blocks, cal_blocks, steps, batch_size=4):
        probed.append(plan)
        assert recipe["recipe_name"] == "kl" and recipe["lora"]["r"] == 4 and steps == 2
        assert train_blocks.shape == (2 * 2, 32)  # steps x batch_size blocks of train.block_size from the training split
        cost = sum(COSTS.get((len(g), g[0]), 0.3 * len(g)) for g in plan.groups)
        return 10.0 * math.exp(cost / 4)  # recovery removes three quarters of the log-perplexity increase

    monkeypatch.setattr(planning, "probe", fake_probe)
    tables = {}
    for search in ("all", "bisect"):
        probed.clear()
        cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, *PROBE, "plan.budget=after_recovery",
                                                    "plan.max_ppl_ratio=1.2", f"plan.probe.search={search}",
                                                    f"plan.probe.table={tmp_path}/probes_{search}.csv"))
        plan = planning.resolve_plan(cfg.plan, *model_and_tokenizer(analyzed), cfg.data)
        table, probes = pd.read_csv(tmp_path / "candidates.csv"), pd.read_csv(tmp_path / f"probes_{search}.csv")
        front = table[table.pareto]
        assert set(probes.plan) == {p.describe() for p in probed} <= set(front.plan)
        assert (probes.probe_ratio < probes.ppl_ratio).all() and probes.chosen.sum() == 1
        ok = probes[probes.probe_ratio <= 1.2]
        chosen = table[table.chosen].iloc[0]
        assert chosen.ideal_latency_reduction == ok.ideal_latency_reduction.max()
        assert chosen.ppl_ratio > 1.2 >= chosen.probe_ratio  # out of budget before recovery, in budget after it
        assert plan == Plan.from_dict(json.loads(chosen.plan_json))
        tables[search] = (plan, len(probes), len(front))
    assert tables["all"][0] == tables["bisect"][0]
    assert tables["all"][1] == tables["all"][2] > tables["bisect"][1]
    assert plots.plan_probes(probes, tmp_path / "probes.png").stat().st_size > 0


def test_probe_trains_a_fresh_adapter_and_leaves_the_model_as_it_was(analyzed):
    model, tokenizer = model_and_tokenizer(analyzed)
    recipe = planning.load_recipe("kl", ["lora.r=4", "lora.alpha=8", "train.batch_size=2", "train.block_size=32",
                                         "train.lr=1e-2", "train.warmup=0"])
    dcfg = data.DataConfig(name="tiny", files=analyzed["files"], block_size=64)
    cal = data.token_blocks(dcfg, tokenizer, "calibration", 256)
    train = data.token_blocks(dcfg, tokenizer, "training", 3 * 2 * 32, 32)
    a, b = Plan.from_range(1, 5, 2, 0, 8), Plan(((2, 3), (5, 6)))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before_b = planning.plan_perplexities(model, cal, [b])[0]

    first = planning.probe(model, b, recipe, train, cal, steps=3)
    planning.probe(model, a, recipe, train, cal, steps=3)
    again = planning.probe(model, b, recipe, train, cal, steps=3)
    assert again == pytest.approx(first, rel=1e-6)  # nothing of a's probe carried over into b's
    assert first < before_b  # the 3 steps of distillation did move the CQIL model toward the original
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert get_plan(model) == Plan() and not model.training and model.config.cqil_plan is None
    assert all(p.requires_grad for p in model.parameters())

    with pytest.raises(CqilError, match="unknown recipe 'nope'.*known: .*kl"):
        planning.load_recipe("nope")
    with pytest.raises(CqilError, match="bad plan.probe.overrides"):
        planning.load_recipe("kl", ["train.nonsense=1"])


# ---- under torchrun: `torchrun --nproc_per_node 2 tests/test_planning.py <setup.json>` -------------
def worker(setup: Path) -> None:
    """Each rank resolves plan=auto twice (once with no plan in budget, once with a probe) and writes what it got."""
    import torch.distributed as dist
    from datetime import timedelta

    from cqil import models

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    ckpt = json.loads(setup.read_text())
    out = Path(ckpt["out"])
    calls = []
    choose = planning.choose_plan
    planning.choose_plan = lambda *a, **k: calls.append(rank) or choose(*a, **k)
    model, tokenizer = models.load({"name": "tiny", "path": ckpt["model"]})
    result = {}
    cfg = cli.compose("convert", auto_overrides(ckpt, out, "plan.max_ppl_ratio=0.5"))
    try:
        planning.resolve_plan(cfg.plan, model, tokenizer, cfg.data)
    except CqilError as e:
        result["error"] = str(e)
    cfg = cli.compose("convert", auto_overrides(ckpt, out, *PROBE, "plan.budget=after_recovery", "plan.max_ppl_ratio=100.0"))
    result["plan"] = planning.resolve_plan(cfg.plan, model, tokenizer, cfg.data).to_dict()
    result["calls"] = len(calls)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_torchrun_chooses_once_on_rank_0(analyzed, tmp_path):
    (tmp_path / "setup.json").write_text(json.dumps({**analyzed, "out": str(tmp_path)}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path / "setup.json")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == 2 and r1["calls"] == 0  # only rank 0 scored and probed
    assert r0["plan"] == r1["plan"] and Plan.from_dict(r0["plan"]).groups
    assert Plan.load(tmp_path / "plan.json") == Plan.from_dict(r0["plan"]) and len(pd.read_csv(tmp_path / "probes.csv"))
    assert "none of the" in r0["error"] and r1["error"].startswith("plan=auto failed on rank 0: none of the")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
