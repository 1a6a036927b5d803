"""Latency model: its limit is the ideal reduction, the fits recover known parameters, the roofline counts a
real LLaMA layer's parameters, the chooser's latency ranking, and `cqil latency` end to end."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from conftest import auto_overrides, model_and_tokenizer, synthetic_layer_steps
from transformers import LlamaConfig, LlamaForCausalLM

from cqil import cli, latency, planning
from cqil import costs as cost_model
from cqil.latency import Comm, Costs, Shape
from cqil.plan import Plan
from cqil.results import plan_columns
from cqil.schedule import Variant, make_schedule, tp_schedule

VARIANTS = [("sharded", "rank0"), ("replicated", "rank0"), ("replicated", "replicated"), ("sharded", "replicated")]
NO_COMM = Comm(0.0, float("inf"))


def costs(layer: float = 1.3, head: float = 0.0, rest: float = 0.0, ar: Comm = NO_COMM, bc: Comm = NO_COMM,
          nbytes: int = 1000) -> Costs:
    return latency.measured_costs(rest, layer, head, ar, bc, batch=1, tokens=1, hidden=nbytes, dtype_bytes=1)


def schedule(plan: Plan, n: int, lm_head: str = "sharded", ungrouped: str = "replicated", T: int = 1):
    return make_schedule(plan, n, plan.group_size, T, Variant(lm_head=lm_head, ungrouped=ungrouped))


@pytest.mark.parametrize("plan", [Plan.from_range(12, 24, 2, 0, 30), Plan.from_range(1, 10, 3, 1, 30),
                                  Plan(((0, 1), (5, 6, 7, 8)), 0), Plan(((26, 27, 28, 29),), 0)])
def test_without_communication_the_limit_is_the_ideal_reduction(plan):
    n, c = 30, costs()
    for lm_head, ungrouped in VARIANTS:
        got = 1 - latency.predict(schedule(plan, n, lm_head, ungrouped), c) / latency.original(n, c)
        assert got == pytest.approx(plan.ideal_latency_reduction(n), abs=1e-12)
    # communication and a slower shared memory bus only take away from it
    slow = costs(ar=Comm(0.1, 1e6), bc=Comm(0.1, 1e6))
    assert latency.predict(schedule(plan, n), slow, 1.1) > latency.predict(schedule(plan, n), c, 1.0)


def test_costs_are_summed_over_the_schedule():
    """rank0: member 0's state is broadcast before each group that follows its work (the embedding, ungrouped
    layers) and before a sharded head after one; every collective of the schedule is charged once, so the
    collective term is its count x alpha."""
    n, plan = 10, Plan(((0, 1), (4, 5), (6, 7)), 0)  # stages: embed G 2 3 G G 8 9 head
    c = costs(layer=0.0, bc=Comm(1.0, float("inf")))
    assert latency.split(schedule(plan, n, "sharded", "rank0"), c) == (3.0, 0.0)  # before (0,1), (4,5) and the head
    assert latency.split(schedule(plan, n, "replicated", "rank0"), c) == (3.0, 0.0)  # (0,1), (4,5), the token ids
    assert latency.split(schedule(plan, n, "sharded", "replicated"), c) == (0.0, 0.0)
    every = costs(layer=0.0, ar=Comm(1.0, float("inf")), bc=Comm(1.0, float("inf")))
    for s in (tp_schedule(n, 4), make_schedule(plan, n, 2, 2, Variant(ungrouped="tp")),
              make_schedule(Plan(plan.groups, 1), n, 2, 2, Variant(ungrouped="rank0"))):
        t = cost_model.terms(s, every)
        assert t["collectives"] == t["collective_rounds"] == s.count()
    # compute: a layer cut over k ranks costs layer / k on CPU; several ranks at once are `concurrent` (kappa)
    c = costs(layer=1.0, head=1.0)
    assert latency.split(tp_schedule(n, 2, lm_head="replicated"), c) == (0.0, n / 2 + 1.0)
    assert latency.split(schedule(plan, n, "replicated", "rank0"), c) == (4.0 + 1.0, 3.0)


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
        common = {"model": "synthetic", **plan_columns(plan), "n_layers": n, "devices": P, "tp": 1, "mesh_p": P,
                  "mesh_t": 1, "phase": phase, "prompt_tokens": T, "batch_size": B, "hidden_size": H, "dtype_bytes": 4,
                  "comm_bytes": nbytes, **parts}

        def c(ar: Comm = NO_COMM, bc: Comm = NO_COMM) -> Costs:
            return latency.measured_costs(parts["rest_ms"], parts["layer_ms"], parts["head_ms"], ar, bc, B, tokens, H, 4)

        rows.append({**common, "setup": "original, 1 device", "median_ms": latency.original(n, c()), "comm": np.nan,
                     "lm_head": np.nan, "ungrouped": np.nan, "allreduce_ms": np.nan, "broadcast_ms": np.nan})
        for comm, (ar, bc) in comms.items():
            for lm_head, ungrouped in VARIANTS[:3]:
                t = latency.predict(schedule(plan, n, lm_head, ungrouped), c(ar, bc), kappa[phase])
                rows.append({**common, "setup": f"cqil ({comm}, head {lm_head}, ungrouped {ungrouped})",
                             "median_ms": t * jitter(), "comm": comm, "lm_head": lm_head, "ungrouped": ungrouped,
                             "allreduce_ms": ar(nbytes) * jitter(), "broadcast_ms": bc(nbytes) * jitter()})
            # the tensor-parallel baseline on the same 2 ranks: never fitted, predicted with the CQIL fit
            t = latency.predict(tp_schedule(n, P, lm_head="replicated"), c(ar, bc), kappa[phase])
            rows.append({**common, "mesh_p": 1, "mesh_t": P, "setup": f"tensor parallel TP={P} ({comm}, head replicated)",
                         "median_ms": t * jitter(), "comm": comm, "lm_head": "replicated", "ungrouped": np.nan,
                         "allreduce_ms": ar(nbytes) * jitter(), "broadcast_ms": bc(nbytes) * jitter()})
    df = pd.DataFrame(rows)
    base = df[df.setup == "original, 1 device"].set_index(["phase", "prompt_tokens", "batch_size"]).median_ms
    orig = base.reindex(list(zip(df.phase, df.prompt_tokens, df.batch_size))).to_numpy()
    df["reduction"] = 1 - df.median_ms / orig  # as cqil bench's paired median would give it
    df["reduction_ci_low"], df["reduction_ci_high"], df["rounds"] = df.reduction - 0.01, df.reduction + 0.02, 20
    return df.assign(source=f"{plan.tag()}.csv")


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
    assert len(val) == 8 * 2 * 4 and val.error_pct.abs().max() < 1e-6  # 3 CQIL variants and TP per communicator
    assert (val.kind == "tp").sum() == 16 and (val[val.kind == "tp"].plan == "none (tensor parallel)").all()
    # the measurement's interval beside the model's error: the exact prediction lies inside it
    assert val.measured_ci_halfwidth_pp.to_numpy() == pytest.approx(1.5) and val.within_measured_ci.all()
    assert "(the measurement's interval: +/-1.5 points, 32/32 inside it)" in latency.error_summary(val)
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
    flops, nbytes = cost_model.layer_work(shape, "prefill", T, B, bpp=2, context=T)
    attn = 4 * B * T * T * shape.heads * shape.hd
    assert flops - attn == 2 * matrices * B * T and nbytes == 2 * matrices
    # decode: one token per sequence, and the KV cache of the context is read
    flops, nbytes = cost_model.layer_work(shape, "decode", T, B, bpp=2, context=50)
    assert flops == 2 * matrices * B + 4 * B * 50 * shape.heads * shape.hd
    assert nbytes == 2 * matrices + 2 * B * 50 * shape.kv_heads * shape.hd * 2
    assert shape.hidden * shape.vocab == model.lm_head.weight.numel()


SEVEN = Shape(32, 4096, 11008, 32, 32, 32000)
SEVENTY = Shape(80, 8192, 28672, 64, 8, 32000)


def flat_hardware(**figures) -> latency.Hardware:
    """A GPU whose layers cost only their overhead and whose collectives only their alpha (infinite speeds)."""
    base = dict(name="flat", peak_flops=1e30, mem_bw=1e30, bus_bw=1e30, comm_alpha_s=0.0, flops_eff=1, bw_eff=1,
                layer_overhead_s=0.0, rest_overhead_s=0.0, kappa=1.0, memory_gb=80, memory_reserve_gb=4)
    return latency.hardware({**base, **figures})


def test_a_group_costs_one_layer_step_and_two_collectives_where_tp_pays_2p():
    """With fixed costs only (overhead o per layer step, alpha per collective): TP=N pays n (o + 2 alpha);
    CQIL x TP with ungrouped layers tensor parallel over all N pays, for each group of P, o + 2 alpha instead
    of P (o + 2 alpha) (T > 1: the member's tp all-reduce and the one world all-reduce)."""
    o, alpha = 50e-6, 10e-6
    hw = flat_hardware(layer_overhead_s=o, comm_alpha_s=alpha)
    plan = Plan.from_range(14, 30, 4, 0, 32)  # 4 groups of 4
    tp = cost_model.tensor_parallel_row(SEVEN, hw, 8, "decode", 1, 1, 2, 512, "sharded")
    ms = 1e3 * (o + 2 * alpha)
    assert tp["latency_ms"] == pytest.approx(32 * ms + 1e3 * (o + alpha))  # + the head and its pairs
    assert tp["collective_rounds"] == 2 * 32 + 1
    rows = {r["ungrouped"]: r for r in cost_model.mesh_candidates(SEVEN, hw, plan, 8, "decode", 1, 1, 2, 512, "sharded",
                                                                  ("replicated", "tp"))}
    assert set(rows) == {"replicated", "tp"} and rows["tp"]["P"] == 4 and rows["tp"]["T"] == 2
    assert tp["latency_ms"] - rows["tp"]["latency_ms"] == pytest.approx(4 * 3 * ms)
    assert cost_model.mesh_candidates(SEVEN, hw, Plan.from_range(14, 29, 3, 0, 32), 8, "decode", 1, 1, 2, 512,
                                      "sharded", ("tp",)) == []  # P = 3 does not divide N = 8


def test_memory_per_gpu_comes_from_the_schedule():
    """70B in bf16 on 2 GPUs: TP holds half of every layer (~69 GB, fits 80 GB); CQIL P=2 with the layers
    outside groups replicated holds those whole on both GPUs (does not fit); tensor-parallel ones fit."""
    hw = latency.hardware("a100")
    tp = cost_model.tensor_parallel_row(SEVENTY, hw, 2, "decode", 1, 1, 2, 512, "sharded")
    layer_gb = SEVENTY.layer_params * 2 / 1e9
    embed_gb = SEVENTY.vocab * SEVENTY.hidden * 2 / 1e9
    assert tp["weight_gb_per_gpu"] == pytest.approx(80 * layer_gb / 2 + embed_gb + embed_gb / 2, rel=1e-3)
    kv = 80 * 2 * 512 * 1024 * 2 / 2 / 1e9  # K and V of 8 KV heads x 128 over 2 GPUs, 512 tokens, 80 layers
    assert tp["kv_cache_gb_per_gpu"] == pytest.approx(kv) and tp["fits"] and tp["shardable"]
    plan = latency.layout_plan(80, 2, 0.375, 2)
    assert plan.describe() == "S30 E78 P2 D0"
    rows = {r["ungrouped"]: r for r in cost_model.mesh_candidates(SEVENTY, hw, plan, 2, "decode", 1, 1, 2, 512, "sharded",
                                                                  ("replicated", "tp"))}
    assert not rows["replicated"]["fits"] and rows["tp"]["fits"]
    best = cost_model.best_mesh(SEVENTY, hw, plan, 2, "decode", 1, 1, 2, 512)
    assert best["ungrouped"] == "tp" and best["tp_latency_ms"] == pytest.approx(tp["latency_ms"])
    # LLaMA-33B's 52 heads on 8 GPUs: an uneven cut (whole KV heads per GPU), priced by its fullest shard (7 of 52
    # heads); fewer KV heads than GPUs cannot be cut at all: TP refused, and so are such cuts inside CQIL x TP
    thirty = Shape(60, 6656, 17920, 52, 52, 32000)
    attention, mlp = 4 * 6656 * 6656, 3 * 6656 * 17920
    assert cost_model.fullest_shard(thirty, 8) == pytest.approx((attention * 7 * 8 / 52 + mlp) / (attention + mlp))
    assert cost_model.fullest_shard(SEVEN, 8) == 1.0
    assert cost_model.tensor_parallel_row(thirty, hw, 8, "decode", 1, 1, 2, 512, "sharded")["shardable"]
    few = Shape(8, 512, 1024, 8, 4, 1000)
    assert not cost_model.tensor_parallel_row(few, hw, 8, "decode", 1, 1, 2, 512, "sharded")["shardable"]
    rows = cost_model.mesh_candidates(few, hw, Plan.from_range(2, 8, 2, 0, 8), 8, "decode", 1, 1, 2, 512, "sharded",
                                      ("tp", "replicated"))
    assert [(r["ungrouped"], r["T"]) for r in rows] == [("replicated", 4)]  # layers 0, 1 cut 8 ways: refused


def test_external_fit_recovers_known_figures():
    """Published numbers made by the model itself with known figures: the fit on the 'fit' rows finds them
    again and the held-out rows are then predicted exactly."""
    cfg = cli.compose("latency")
    models, ext = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("models", "external"))
    truth = replace(latency.hardware("a100"), bw_eff=0.7, layer_overhead_s=40e-6, comm_alpha_s=8e-6)
    made = latency.external_table(ext, models, truth)
    for source in ext["sources"].values():  # the truth's own predictions become the "published" numbers
        for entry in source["rows"]:
            rows = made[made.model == entry["model"]].itertuples()
            if source["quantity"] == "tokens_per_s":
                entry["published"] = {r.devices: r.predicted for r in rows if r.quantity == "tokens_per_s"}
            else:
                entry["published"] = next(r.predicted for r in rows if r.plan == Plan.from_dict(entry["plan"]).describe())
    fitted = latency.fit_hardware(ext, models, latency.hardware("a100"))
    for name in ext["fit"]:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-4)
    table = latency.external_table(ext, models, fitted)
    assert set(table.role) == {"fit", "held out"} and table.error.abs().max() < 1e-5
    assert set(table.quantity) == {"tokens_per_s", "latency_reduction"}


def test_hybrid_projection_table():
    cfg = cli.compose("latency", ["hybrid.models=[llama-2-7b]", "hybrid.hardware=[a100]", "hybrid.prefill_tokens=[128]"])
    best, candidates = latency.hybrid(OmegaConf.to_container(cfg.hybrid, resolve=True),
                                      OmegaConf.to_container(cfg.models, resolve=True), latency.hardware)
    assert {"model", "hardware", "phase", "prompt_tokens", "devices", "tp_latency_ms", "best_p", "best_t", "plan",
            "hybrid_latency_ms", "speedup_vs_tp", "weight_gb_per_gpu", "kv_cache_gb_per_gpu", "fits"} <= set(best.columns)
    assert len(best) == 2 * 3 and set(best.devices) == {2, 4, 8}
    assert (best.best_p * best.best_t == best.devices).all()
    assert (best.speedup_vs_tp == best.tp_latency_ms / best.hybrid_latency_ms).all()
    seven = best.set_index(["phase", "devices"])
    assert seven.loc[("decode", 2), "plan"] == "S12 E30 P2 D0"  # the paper's layout
    # the best is the fastest fitting candidate of its shape
    for r in best.itertuples():
        c = candidates[(candidates.phase == r.phase) & (candidates.devices == r.devices) & (candidates.P > 1)
                       & candidates.fits]
        assert r.hybrid_latency_ms == pytest.approx(c.latency_ms.min())


def test_chooser_for_n_devices_ranks_against_tensor_parallelism():
    """plan.devices=N: a plan's predicted reduction is against TP on N devices, on its best P x T mesh."""
    config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    lat = {"hardware": "a100", "phase": "decode", "prompt_tokens": 512, "batch_size": 1, "devices": 8}
    p2, p4, p3 = (cost_model.predicted_reduction(config, Plan.from_range(14, 30 - (30 - 14) % p, p, 0, 32), lat)
                  for p in (2, 4, 3))
    assert 0 < p2 < p4 and np.isnan(p3)  # P=3 does not divide 8
    hw, s = latency.hardware("a100"), Shape.from_hf(config)
    best = cost_model.best_mesh(s, hw, Plan.from_range(14, 30, 4, 0, 32), 8, "decode", 512, 1, 2, 512)
    assert p4 == pytest.approx(1 - best["latency_ms"] / best["tp_latency_ms"]) and best["T"] == 2


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

    # plan.devices=2: only plans of pairs have a mesh (P2 x T1); the others are left out, not chosen
    plan_cfg.update(devices=2, latency={**plan_cfg["latency"], "hardware": "a100"})
    choice = planning.choose_plan(plan_cfg, model, tokenizer, cfg.data)
    t = choice.table.set_index("plan")
    assert t.loc["S1 E5 P4 D0"].predicted_reduction != t.loc["S1 E5 P4 D0"].predicted_reduction  # NaN
    assert t.loc["S1 E5 P4 D0"].mesh == "P=4 does not divide 2" and choice.plan.group_size == 2
    assert t.loc[choice.plan.describe()].mesh.startswith("P2xT1, ungrouped")
    one = {**plan_cfg["latency"], "hardware": "a100"}  # beside it: against the original on one device
    assert t.loc["S1 E5 P4 D0"].predicted_reduction_vs_one_device == pytest.approx(
        cost_model.predicted_reduction(model.config, Plan.from_range(1, 5, 4, 0, 8), one), abs=1e-4)
    assert "against tensor parallelism on 2 devices" in capsys.readouterr().out

    plan_cfg["rank_by"] = "fastest"
    with pytest.raises(Exception, match="rank_by='fastest' is not one of ideal, latency"):
        planning.choose_plan(plan_cfg, model, tokenizer, cfg.data)


def test_job_end_to_end(tmp_path, capsys):
    cal, val = tmp_path / "cal_S12E24P2D0.csv", tmp_path / "val_S24E28P2D0.csv"
    synthetic_bench(S12E24, KAPPA, COMMS, noise=0.02).drop(columns="source").to_csv(cal, index=False)
    synthetic_bench(S24E28, KAPPA, COMMS, noise=0.02, seed=3).drop(columns="source").to_csv(val, index=False)
    outs = [f"validation_out={tmp_path}/v.csv", f"params_out={tmp_path}/p.csv", f"validation_png={tmp_path}/v.png",
            f"external_out={tmp_path}/ext.csv", f"hybrid_out={tmp_path}/h.csv", f"hybrid_candidates_out={tmp_path}/hc.csv",
            f"hybrid_png={tmp_path}/h.png", "hybrid.models=[llama-2-7b,llama-2-70b]", "hybrid.hardware=[a100]"]
    cli.main(["latency", f"calibrate=[{cal}]", f"validate=[{val}]", *outs])
    out = capsys.readouterr().out
    assert "kappa[prefill]" in out and "validation, cqil (S24 E28 P2 D0, 48 rows): mean |error| prefill" in out and "llama-2-70b" in out
    assert "validation, tp (none (tensor parallel), 16 rows)" in out
    table = pd.read_csv(tmp_path / "v.csv")
    assert set(table.role) == {"calibration", "validation"} and "command" in table
    assert table[table.role == "validation"].error_pct.abs().mean() < 6
    params = pd.read_csv(tmp_path / "p.csv").set_index(["parameter", "phase"])
    assert params.loc[("kappa", "decode"), "value"] == pytest.approx(KAPPA["decode"], rel=0.05)
    assert (tmp_path / "v.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "h.csv")) == 2 * 3 * 3  # models x shapes x N
    ext = pd.read_csv(tmp_path / "ext.csv")
    assert {"source", "model", "hardware", "devices", "setup", "published", "predicted", "error"} <= set(ext.columns)
    assert "held out, all 5 rows: mean |latency error|" in out and (ext.role == "fit").sum() == 4

    # a missing bench table: one line naming the command that makes it, exit 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["latency", f"calibrate=[{cal}]", f"validate=[{tmp_path}/none_S24E28P2D0.csv]", *outs])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert f"does not exist; make it with `cqil bench plan.start=.. plan.end=.. out={tmp_path}/none_S24E28P2D0.csv`" in err
    # an old bench table without the component columns: rerun the command it records
    old = pd.read_csv(cal).drop(columns=["layer_ms", "allreduce_ms"]).assign(command="cqil bench plan=file out=old.csv")
    old.to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["latency", f"calibrate=[{tmp_path}/old.csv]", f"validate=[{val}]", *outs])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "lacks the columns layer_ms, allreduce_ms" in err and len(err.splitlines()) == 1
    assert "rerun `cqil bench plan=file out=old.csv`" in err


def layer_step_run(tmp_path, table, *extra: str) -> list[str]:
    """`cqil latency` on 7B/70B, A100 and H100, with `table` as layer_step.csv (no CPU calibration)."""
    path = tmp_path / "layer_step.csv"
    table.to_csv(path, index=False)
    return ["latency", "calibrate=[]", f"layer_step.csv={path}", f"external_out={tmp_path}/ext.csv",
            f"hybrid_out={tmp_path}/h.csv", f"hybrid_candidates_out={tmp_path}/hc.csv", f"hybrid_png={tmp_path}/h.png",
            "hybrid.models=[llama-2-7b,llama-2-70b]", "hybrid.prefill_tokens=[128]", *extra]


def test_a_measured_layer_step_sets_the_fixed_cost_and_bandwidth(tmp_path, capsys):
    """cqil latency layer_step.csv=<the microbenchmark's table>: c0 -> layer_overhead_s and bandwidth / mem_bw ->
    bw_eff of the GPU it names, not fitted to gpt-fast (the rest of external.fit is); the projection follows c0."""
    cli.main(layer_step_run(tmp_path, synthetic_layer_steps(30.0, 1600.0, noise=0.01)))
    out = capsys.readouterr().out
    assert "measured layer step on a100: c0 3" in out and "compiled, llama-2-7b, llama-2-70b: 8 rows" in out
    c0_us, bw = latency.measured_figures({"csv": str(tmp_path / "layer_step.csv"), "hardware": "auto",
                                         "mode": "compiled", "shapes": [], "figures": ["layer_overhead_s", "bw_eff"]}
                                        ).figures.values()
    assert c0_us == pytest.approx(30e-6, rel=0.1) and bw == pytest.approx(1600e9 / 2.039e12, rel=0.03)
    h = pd.read_csv(tmp_path / "h.csv")
    a100 = h[h.hardware == "a100"]
    assert a100.layer_overhead_s.to_numpy() == pytest.approx(c0_us) and a100.bw_eff.to_numpy() == pytest.approx(bw)
    assert (a100.layer_step_csv == str(tmp_path / "layer_step.csv")).all() and h[h.hardware == "h100"].layer_step_csv.isna().all()
    assert h[h.hardware == "h100"].layer_overhead_s.to_numpy() == pytest.approx(c0_us)  # carried over (apply_to)
    ext = pd.read_csv(tmp_path / "ext.csv")
    assert (ext.fitted == "comm_alpha_s").all() and (ext.layer_overhead_s == c0_us).all()

    # one shape's rows: the fit is the table's own (cqil.layerstep fits the same way)
    one = synthetic_layer_steps(12.0, 1500.0, noise=0.02, seed=4, shapes=("llama-2-7b",))
    one.to_csv(tmp_path / "one.csv", index=False)
    m = latency.measured_figures({"csv": str(tmp_path / "one.csv"), "hardware": "a100", "mode": "compiled",
                                  "shapes": ["llama-2-7b"], "figures": ["layer_overhead_s", "bw_eff"]})
    assert (m.c0_us, m.bandwidth_gbs) == pytest.approx((one.fit_c0_us.iloc[0], one.fit_bandwidth_gbs.iloc[0]))

    # all-reduce cost as stated (nothing left to fit): the gain over TP=8 shrinks with the fixed cost per step
    def speedup(c0: float) -> float:
        cli.main(layer_step_run(tmp_path, synthetic_layer_steps(c0, 1600.0), "external.fit=[bw_eff,layer_overhead_s]",
                                "hybrid.hardware=[a100]"))
        h = pd.read_csv(tmp_path / "h.csv")  # the table keeps the h100 rows of the run above (another key)
        h = h[h.hardware == "a100"].set_index(["model", "phase", "devices"])
        return h.loc[("llama-2-7b", "decode", 8), "speedup_vs_tp"]

    assert speedup(60.0) > speedup(5.0) > 1
    assert "nothing fitted" in capsys.readouterr().out


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist; make it with `make gpu-check` (one GPU) or `python scripts/layer_step.py` (CPU)"),
    ("eager only", "has no rows of mode compiled (it has: llama-2-70b eager, llama-2-7b eager)"),
    ("cpu", "was measured on cpu, which names none of conf/hardware/ (a100, cpu-core, h100); give layer_step.hardware=<name>"),
    ("one size", "at one size only"),
    ("lacks columns", "lacks the column(s) median_us"),
    ("too fast", "above A100-SXM4-80GB + NVLink3's memory bandwidth (2039 GB/s"),
])
def test_a_bad_layer_step_table_is_refused_in_one_line(tmp_path, capsys, case, words):
    table = {"missing": None, "eager only": synthetic_layer_steps(30.0, 1600.0, modes=("eager",)),
             "cpu": synthetic_layer_steps(30.0, 10.0, gpu="cpu"),
             "one size": synthetic_layer_steps(30.0, 1600.0, shapes=("llama-2-7b",)).query("shard == 1"),
             "lacks columns": synthetic_layer_steps(30.0, 1600.0).drop(columns="median_us"),
             "too fast": synthetic_layer_steps(30.0, 5000.0)}[case]
    argv = layer_step_run(tmp_path, table if table is not None else synthetic_layer_steps(30.0, 1600.0))
    if table is None:
        (tmp_path / "layer_step.csv").unlink()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("cqil latency: error: layer_step.csv")
    assert words in err
    assert not (tmp_path / "h.csv").exists()  # refused before any work


def test_help_and_figures_registered(capsys):
    cli.main(["latency", "--help"])
    assert "cqil latency: latency model" in capsys.readouterr().out
    from cqil import plots
    assert {"latency_validation", "latency_hybrid"} <= set(plots.FIGURES)
    cfg = cli.compose("plot")
    assert all(k in cfg for n in ("latency_validation", "latency_hybrid") for k in plots.FIGURES[n][1:])
