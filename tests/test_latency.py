"""Latency model: its limit is the ideal reduction, the fits recover known parameters, the roofline counts a
real LLaMA layer's parameters, the chooser's latency ranking, and `cqil latency` end to end."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from conftest import auto_overrides, model_and_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from cqil import cli, latency, planning
from cqil.latency import Comm, Costs, Shape
from cqil.plan import Plan
from cqil.results import plan_columns

VARIANTS = [("sharded", "rank0"), ("replicated", "rank0"), ("replicated", "replicated"), ("sharded", "replicated")]
NO_COMM = Comm(0.0, float("inf"))


@pytest.mark.parametrize("plan", [Plan.from_range(12, 24, 2, 0, 30), Plan.from_range(1, 10, 3, 1, 30),
                                  Plan(((0, 1), (5, 6, 7, 8)), 0), Plan(((26, 27, 28, 29),), 0)])
def test_without_communication_the_limit_is_the_ideal_reduction(plan):
    n = 30
    c = Costs(rest=0.0, layer=1.3, head=0.0, head_shard=0.0, allreduce=NO_COMM, broadcast=NO_COMM, gather=NO_COMM,
              hidden_bytes=1e6, batch=1)
    for lm_head, ungrouped in VARIANTS:
        got = 1 - latency.predict(plan, n, c, 1.0, lm_head, ungrouped) / latency.original(n, c)
        assert got == pytest.approx(plan.ideal_latency_reduction(n), abs=1e-12)
    # communication and a slower shared memory bus only take away from it
    slow = Costs(0.0, 1.3, 0.0, 0.0, Comm(0.1, 1e6), Comm(0.1, 1e6), Comm(0.1, 1e6), 1e6, 1)
    assert latency.predict(plan, n, slow, 1.1) > latency.predict(plan, n, c, 1.0)


def test_broadcasts_follow_the_runtime():
    """rank0: one broadcast before each group after an ungrouped layer, one before a sharded head after one."""
    n, plan = 10, Plan(((0, 1), (4, 5), (6, 7)), 0)  # stages: G 2 3 G G 8 9
    bc = Comm(1.0, float("inf"))
    c = Costs(0.0, 0.0, 0.0, 0.0, NO_COMM, bc, NO_COMM, 1.0, 1)
    assert latency.split(plan, n, c, "sharded", "rank0") == (2.0, 0.0)  # before (4,5) and before the head
    assert latency.split(plan, n, c, "replicated", "rank0") == (2.0, 0.0)  # before (4,5) and the token ids
    assert latency.split(plan, n, c, "sharded", "replicated") == (0.0, 0.0)


def synthetic_bench(plan: Plan, kappa: dict, comms: dict, n: int = 30, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """A `cqil bench`-like table whose latencies follow the model exactly (times a relative noise)."""
    rng = np.random.default_rng(seed)
    H, P, rows = 576, 2, []

    def jitter() -> float:
        return 1 + noise * rng.standard_normal()

    for phase, T, B in itertools.product(("prefill", "decode"), (32, 128), (1, 4)):
        tokens = T if phase == "prefill" else 1
        parts = {"layer_ms": 0.05 + 0.01 * B * tokens, "head_ms": 0.3 + 0.002 * B, "rest_ms": 0.2 + 0.001 * B * tokens}
        nbytes = B * tokens * H * 4
        common = {"model": "synthetic", **plan_columns(plan), "n_layers": n, "devices": P, "phase": phase,
                  "prompt_tokens": T, "batch_size": B, "hidden_size": H, "dtype_bytes": 4, "comm_bytes": nbytes, **parts}
        c0 = Costs(parts["rest_ms"], parts["layer_ms"], parts["head_ms"], parts["head_ms"] / P, NO_COMM, NO_COMM,
                   NO_COMM, nbytes, B)
        rows.append({**common, "setup": "original, 1 device", "median_ms": latency.original(n, c0), "comm": np.nan,
                     "lm_head": np.nan, "ungrouped": np.nan, "allreduce_ms": np.nan, "broadcast_ms": np.nan})
        for comm, (ar, bc) in comms.items():
            c = Costs(c0.rest, c0.layer, c0.head, c0.head_shard, ar, bc, ar, nbytes, B)
            for lm_head, ungrouped in VARIANTS[:3]:
                t = latency.predict(plan, n, c, kappa[phase], lm_head, ungrouped)
                rows.append({**common, "setup": f"cqil ({comm}, head {lm_head}, ungrouped {ungrouped})",
                             "median_ms": t * jitter(), "comm": comm, "lm_head": lm_head, "ungrouped": ungrouped,
                             "allreduce_ms": ar(nbytes) * jitter(), "broadcast_ms": bc(nbytes) * jitter()})
    return pd.DataFrame(rows).assign(source=f"{plan.tag()}.csv")


KAPPA = {"prefill": 1.07, "decode": 1.21}
S12E24, S24E28 = Plan.from_range(12, 24, 2, 0, 30), Plan.from_range(24, 28, 2, 0, 30)
COMMS = {"shm": (Comm(0.004, 2e6), Comm(0.003, 4e6)), "torch": (Comm(0.3, 4e5), Comm(0.2, 5e5))}


def test_fit_recovers_known_parameters():
    fits, kappa = latency.calibrate(synthetic_bench(S12E24, KAPPA, COMMS))
    assert kappa == pytest.approx(KAPPA, rel=1e-9)
    for comm, (ar, bc) in COMMS.items():
        for op, true in (("allreduce", ar), ("broadcast", bc)):
            assert fits[comm, op].alpha == pytest.approx(true.alpha, rel=1e-6)
            assert fits[comm, op].beta == pytest.approx(true.beta, rel=1e-6)
    # another plan is predicted exactly from those fits
    val = latency.validate({"validation": synthetic_bench(S24E28, KAPPA, COMMS)}, fits, kappa)
    assert len(val) == 8 * 2 * 3 and val.error_pct.abs().max() < 1e-6
    # with 3% measurement noise the fit stays close and so do the predictions
    fits, kappa = latency.calibrate(synthetic_bench(S12E24, KAPPA, COMMS, noise=0.03, seed=1))
    assert kappa == pytest.approx(KAPPA, rel=0.03)
    val = latency.validate({"validation": synthetic_bench(S24E28, KAPPA, COMMS, noise=0.03, seed=2)}, fits, kappa)
    assert val.error_pct.abs().mean() < 6


@pytest.mark.parametrize("head_dim", [None, 12])
def test_roofline_counts_the_parameters_of_a_real_llama_layer(head_dim):
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=head_dim)
    model = LlamaForCausalLM(cfg)
    shape = Shape.from_hf(model.config)
    matrices = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    assert shape.layer_params == matrices
    B, T = 3, 7
    flops, nbytes = latency.layer_work(shape, "prefill", T, B, bpp=2, context=T)
    attn = 4 * B * T * T * shape.heads * shape.hd
    assert flops - attn == 2 * matrices * B * T and nbytes == 2 * matrices
    # decode: one token per sequence, and the KV cache of the context is read
    flops, nbytes = latency.layer_work(shape, "decode", T, B, bpp=2, context=50)
    assert flops == 2 * matrices * B + 4 * B * 50 * shape.heads * shape.hd
    assert nbytes == 2 * matrices + 2 * B * 50 * shape.kv_heads * shape.hd * 2
    assert shape.hidden * shape.vocab == model.lm_head.weight.numel()


def test_projection_has_the_papers_7b_plans():
    cfg = cli.compose("latency")
    proj = latency.projection(OmegaConf.to_container(cfg.projection, resolve=True))
    seven = proj[proj.model == "llama-7b"]
    assert {"S12 E30 P2 D0", "S14 E30 P4 D1"} <= set(seven.plan) and set(seven.P) == {2, 4}
    assert set(seven.phase) == {"prefill", "decode"} and {128, 512} <= set(seven.prompt_tokens)
    assert (proj.cqil_reduction < proj.ideal_reduction).all()  # kappa = 1 on GPUs: only communication is lost
    assert seven[seven.plan == "S12 E30 P2 D0"].ideal_reduction.iloc[0] == pytest.approx(9 / 32)
    assert {"peak_flops", "bus_bw", "flops_eff", "layer_overhead_s"} <= set(proj.columns)


def test_chooser_ranks_by_predicted_latency(analyzed, tmp_path, monkeypatch, capsys):
    """A huge all-reduce latency makes every group expensive: one group of 4 beats three groups of 2
    with the same ideal reduction; rank_by=ideal keeps the ideal ranking."""
    monkeypatch.setattr(planning, "plan_perplexities", lambda model, blocks, plans, batch_size=4, desc="": [10.0] * len(plans))
    model, tokenizer = model_and_tokenizer(analyzed)
    cfg = cli.compose("convert", auto_overrides(analyzed, tmp_path, "plan.max_ppl_ratio=1.5"))
    plan_cfg = OmegaConf.to_container(cfg.plan, resolve=True)
    ideal = planning.choose_plan(plan_cfg, model, tokenizer, cfg.data)
    assert ideal.plan.describe() == "S1 E7 P3 D0" and "predicted_reduction" not in ideal.table  # 4/8 of the layers

    slow = {**latency.hardware("a100").__dict__, "comm_alpha_s": 1.0}
    plan_cfg.update(rank_by="latency", latency={**plan_cfg["latency"], "hardware": slow})
    choice = planning.choose_plan(plan_cfg, model, tokenizer, cfg.data)
    t = choice.table.set_index("plan")
    assert t.loc["S1 E7 P2 D0"].ideal_latency_reduction == t.loc["S1 E5 P4 D0"].ideal_latency_reduction
    assert t.loc["S1 E5 P4 D0"].predicted_reduction > t.loc["S1 E7 P2 D0"].predicted_reduction
    assert len(choice.plan.groups) == 1 and choice.plan.group_size == 4
    assert "largest predicted latency reduction" in capsys.readouterr().out

    plan_cfg["rank_by"] = "fastest"
    with pytest.raises(Exception, match="rank_by='fastest' is not one of ideal, latency"):
        planning.choose_plan(plan_cfg, model, tokenizer, cfg.data)


def test_job_end_to_end(tmp_path, capsys):
    cal, val = tmp_path / "cal_S12E24P2D0.csv", tmp_path / "val_S24E28P2D0.csv"
    synthetic_bench(S12E24, KAPPA, COMMS, noise=0.02).drop(columns="source").to_csv(cal, index=False)
    synthetic_bench(S24E28, KAPPA, COMMS, noise=0.02, seed=3).drop(columns="source").to_csv(val, index=False)
    outs = [f"validation_out={tmp_path}/v.csv", f"params_out={tmp_path}/p.csv", f"validation_png={tmp_path}/v.png",
            f"projection_out={tmp_path}/proj.csv", f"projection_png={tmp_path}/proj.png"]
    cli.main(["latency", f"calibrate=[{cal}]", f"validate=[{val}]", *outs])
    out = capsys.readouterr().out
    assert "kappa[prefill]" in out and "validation (S24 E28 P2 D0, 48 rows): mean |error| of latency" in out and "llama-33b" in out
    table = pd.read_csv(tmp_path / "v.csv")
    assert set(table.role) == {"calibration", "validation"} and "command" in table
    assert table[table.role == "validation"].error_pct.abs().mean() < 6
    params = pd.read_csv(tmp_path / "p.csv").set_index(["parameter", "phase"])
    assert params.loc[("kappa", "decode"), "value"] == pytest.approx(KAPPA["decode"], rel=0.05)
    assert (tmp_path / "v.png").stat().st_size > 0 and (tmp_path / "proj.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "proj.csv")) == 2 * 3 * 2 * 3 * 2

    # a missing bench table: one line naming the command that makes it, exit 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["latency", f"calibrate=[{cal}]", f"validate=[{tmp_path}/none_S24E28P2D0.csv]", *outs])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "does not exist; make it with `cqil bench plan.start=24 plan.end=28 plan.group_size=2" in err
    # an old bench table without the component columns
    pd.read_csv(cal).drop(columns=["layer_ms", "allreduce_ms"]).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["latency", f"calibrate=[{tmp_path}/old.csv]", f"validate=[{val}]", *outs])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "lacks the columns layer_ms, allreduce_ms" in err and len(err.splitlines()) == 1


def test_help_and_figures_registered(capsys):
    cli.main(["latency", "--help"])
    assert "cqil latency: latency model" in capsys.readouterr().out
    from cqil import plots
    assert {"latency_validation", "latency_projection"} <= set(plots.FIGURES)
    cfg = cli.compose("plot")
    assert all(k in cfg for n in ("latency_validation", "latency_projection") for k in plots.FIGURES[n][1:])
