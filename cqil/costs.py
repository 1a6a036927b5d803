"""The latency model's pure cost functions (no job, no pandas): what one forward step of a schedule costs.

cqil.latency fits, validates and projects with them (`cqil latency`, read its docstring for the model);
cqil.bench and cqil.generate ask them which layout to run by default (`rank_layouts`); cqil.planning ranks plans
by them (`predicted_reduction`, `mesh_choice`: a plan on N devices against TP=N); cqil.layerstep fits its
t = c0 + bytes / bandwidth with `fit_comm`, the form fitted to collectives. No job module is imported here, so
every job may use them. The model walks the
stages of cqil.schedule's make_schedule, so TP, CQIL and CQIL x TP are costed from the list the runtime runs:

    t = t_rest + sum over stages [ compute(stage) + sum over its collectives c(op, group size, bytes) ]

with compute that several ranks do at once slowed by kappa (t = fixed + kappa * concurrent); Costs holds
what the pieces cost (measured on CPU, or a roofline of a LLaMA shape on stated hardware: gpu_costs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable

import numpy as np
from omegaconf import OmegaConf

from . import CqilError
from .inputs import hardware_named
from .paths import conf_dir
from .plan import Plan, PlanError
from .schedule import UNGROUPED, Schedule, Variant, check_shardable, llama_shapes, make_schedule, rank_bytes

schedule_of = lru_cache(maxsize=None)(make_schedule)  # pure and asked for the same meshes again and again (fits)


# ---- the model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comm:
    """c(bytes) = alpha + bytes / beta (alpha in ms, beta in bytes per ms)."""
    alpha: float
    beta: float

    def __call__(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta


@dataclass(frozen=True)
class Costs:
    """What the pieces of one forward step cost on one rank, in ms, for one (phase, T, B)."""
    rest: float                                    # embedding, final norm, masks, Python: once per step
    layer: Callable[[int], float]                  # one decoder layer cut into k tensor-parallel shards
    head: Callable[[int], float]                   # final norm + LM head + argmax, cut into k vocabulary shards
    collective: Callable[[str, int, int], float]   # (op, ranks in the group, bytes each rank hands in)
    batch: int
    tokens: int                                    # tokens per sequence in this step: T (prefill) or 1 (decode)
    hidden: int
    dtype_bytes: int
    vocab: int = 0


def terms(schedule: Schedule, c: Costs) -> dict[str, float]:
    """One step on the critical path, by term (ms): `rest`; `alone`, compute that one rank does while the
    others wait; `concurrent`, compute that several ranks do at once; `collectives`; and `collective_rounds`."""
    out = {"rest": c.rest, "alone": 0.0, "concurrent": 0.0, "collectives": 0.0, "collective_rounds": 0}
    for s in schedule.stages:
        k = {"full": 1, "tp": schedule.T, "world": schedule.world, "vocab": schedule.world}[s.split]
        if s.kind == "layer":
            work = c.layer(k)
        elif s.kind == "group":  # members run at once; with P = 1 (one process) the group's layers in turn
            work = c.layer(k) * (len(s.layers) if schedule.P == 1 else 1)
        elif s.kind == "head":
            work = c.head(k)
        else:  # embed (in rest), state (its broadcast only)
            work = 0.0
        out["concurrent" if len(s.members) * schedule.T > 1 else "alone"] += work
        for col in s.collectives:
            nbytes = col.nbytes(c.batch, c.tokens, c.hidden, c.dtype_bytes, -(-c.vocab // schedule.world))
            out["collectives"] += c.collective(col.op, schedule.axis_size(col.axis), nbytes)
            out["collective_rounds"] += 1
    return out


def split(schedule: Schedule, c: Costs) -> tuple[float, float]:
    """(fixed, concurrent) ms of one step: latency = fixed + kappa * concurrent."""
    t = terms(schedule, c)
    return t["rest"] + t["alone"] + t["collectives"], t["concurrent"]


def total(t: dict[str, float], kappa: float) -> float:
    """The latency of a step from its terms."""
    return t["rest"] + t["alone"] + t["collectives"] + kappa * t["concurrent"]


def predict(schedule: Schedule, c: Costs, kappa: float = 1.0) -> float:
    return total(terms(schedule, c), kappa)


def original(n: int, c: Costs) -> float:
    """The original model on one device: t_rest + n t_layer + t_head."""
    return predict(schedule_of(Plan(), n), c)


# ---- GPU: roofline costs of a LLaMA shape ---------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """The dimensions of a LLaMA-family model that its cost depends on."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads

    @classmethod
    def from_hf(cls, config) -> "Shape":
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, config.vocab_size, getattr(config, "head_dim", None) or 0)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Matrix parameters of one decoder layer (q, o; k, v; gate, up, down); the two norms are negligible."""
        H = self.hidden
        return 2 * H * self.heads * self.hd + 2 * H * self.kv_heads * self.hd + 3 * H * self.intermediate


def shape_of(spec: dict) -> Shape:
    """A Shape from a config entry {layers, hidden, intermediate, heads, kv_heads, vocab[, head_dim]}."""
    return Shape(**{f.name: int(spec[f.name]) for f in fields(Shape) if f.name in spec})


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float
    mem_bw: float
    bus_bw: float
    comm_alpha_s: float
    flops_eff: float
    bw_eff: float
    layer_overhead_s: float
    rest_overhead_s: float
    kappa: float
    memory_gb: float
    memory_reserve_gb: float


def hardware(spec: str | dict) -> Hardware:
    """A device: a name of conf/hardware/<name>.yaml, or the figures themselves as a dict."""
    if isinstance(spec, str):
        path = conf_dir() / "hardware" / f"{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise CqilError(f"unknown hardware {spec!r}: no {path}; known: {', '.join(known)}")
        spec = OmegaConf.to_container(OmegaConf.load(path))
    missing = [f.name for f in fields(Hardware) if f.name not in spec]
    if missing:
        raise CqilError(f"hardware {spec.get('name', spec)} lacks {', '.join(missing)}")
    return Hardware(**{f.name: (spec[f.name] if f.name == "name" else float(spec[f.name])) for f in fields(Hardware)})


def roofline_ms(flops: float, nbytes: float, hw: Hardware, overhead_s: float) -> float:
    return 1e3 * (max(flops / (hw.peak_flops * hw.flops_eff), nbytes / (hw.mem_bw * hw.bw_eff)) + overhead_s)


def layer_work(s: Shape, phase: str, T: int, B: int, bpp: int, context: int) -> tuple[float, float]:
    """(flops, bytes) of one decoder layer: prefill of T tokens, or one decode step against `context` tokens."""
    tokens, ctx = (B * T, T) if phase == "prefill" else (B, context)
    flops = 2 * s.layer_params * tokens + 4 * tokens * ctx * s.heads * s.hd
    kv_read = 2 * B * ctx * s.kv_heads * s.hd * bpp if phase == "decode" else 0
    return flops, s.layer_params * bpp + kv_read


def fullest_shard(s: Shape, k: int) -> float:
    """The fullest of k tensor-parallel shards of a layer, as a multiple of 1/k of it: shards hold whole KV heads
    (with their query heads) and whole MLP columns, so an uneven cut (LLaMA-33B's 52 heads on 8) has a larger one."""
    attention = 2 * s.hidden * s.hd * (s.heads + s.kv_heads)
    mlp = 3 * s.hidden * s.intermediate
    return (attention * math.ceil(s.kv_heads / k) * k / s.kv_heads
            + mlp * math.ceil(s.intermediate / k) * k / s.intermediate) / (attention + mlp)


def gpu_costs(s: Shape, hw: Hardware, phase: str, T: int, B: int, bpp: int = 2, context: int = 512) -> Costs:
    """Roofline Costs of one step (prefill of T tokens, or a decode step against `context` tokens); a layer cut
    into k shards costs what its fullest shard does."""
    flops, nbytes = layer_work(s, phase, T, B, bpp, context)
    head_flops, head_bytes = 2 * s.hidden * s.vocab * B, s.hidden * s.vocab * bpp  # the last position only
    bus = hw.bus_bw / 1e3  # bytes per ms
    moved = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: n - 1, "broadcast": lambda n: 1}

    def collective(op: str, n: int, nbytes: int) -> float:
        return 1e3 * hw.comm_alpha_s + moved[op](n) * nbytes / bus

    return Costs(rest=1e3 * hw.rest_overhead_s,
                 layer=lambda k: roofline_ms(flops * fullest_shard(s, k) / k, nbytes * fullest_shard(s, k) / k, hw,
                                             hw.layer_overhead_s),
                 head=lambda k: roofline_ms(head_flops / k, head_bytes / k, hw, hw.layer_overhead_s),
                 collective=collective, batch=B, tokens=T if phase == "prefill" else 1, hidden=s.hidden,
                 dtype_bytes=bpp, vocab=s.vocab)


@lru_cache(maxsize=None)
def memory_gb(schedule: Schedule, s: Shape, bpp: int, batch: int, context: int) -> tuple[float, float]:
    """(weights, KV cache) in GB of the fullest rank: the weights each rank materializes by the schedule's
    own accounting (cqil.schedule.rank_bytes), the KV cache of its layers' shards at `context` tokens."""
    shapes = llama_shapes(s.layers, s.hidden, s.intermediate, s.heads, s.kv_heads, s.vocab, s.head_dim or None)
    fullest = (0.0, 0.0)
    for r in range(schedule.world):
        weights = rank_bytes(schedule, r, shapes, tied=False, dtype_bytes=bpp, heads=s.heads, kv_heads=s.kv_heads)
        kv = sum(2 * batch * context * s.hd * bpp * math.ceil(s.kv_heads / p.count)
                 for p in schedule.parts(r) if p.kind == "layer")
        fullest = max(fullest, (weights / 1e9, kv / 1e9), key=sum)
    return fullest


# ---- the layout a run uses by default ----------------------------------------------------------------
def hardware_for(device: str) -> str:
    """The conf/hardware figures that stand for a device ("cpu", or a GPU's name): cpu-core for CPU ranks; for a
    GPU the file its name contains (cqil.inputs.hardware_named), else A100's, a stand-in the ranking line names."""
    return "cpu-core" if device == "cpu" else hardware_named(device, conf_dir()) or "a100"


def rank_layouts(config, plan: Plan, P: int, T: int, hw: Hardware, lm_head: str, batch: int = 1,
                 context: int = 512, bytes_per_param: int = 2) -> list[dict]:
    """The latency model's decode step (batch `batch`, a `context`-token cache) of `plan` on a P x T mesh under
    every `ungrouped` option the runtime can cut for this model (check_shardable), fastest first:
    [{"ungrouped", "latency_ms", "fits"}], each with tp_latency_ms, TP on the same P*T devices (NaN where the
    model's heads cannot be cut that many ways). Options that do not fit the device's memory come last."""
    s = Shape.from_hf(config)
    c = gpu_costs(s, hw, "decode", 1, batch, bytes_per_param, context)
    rows = []
    tp = schedule_of(Plan(), s.layers, 1, P * T, Variant(lm_head=lm_head))
    try:
        check_shardable(tp, s.heads, s.kv_heads, s.intermediate)
        tp_ms = predict(tp, c, hw.kappa)
    except PlanError:
        tp_ms = float("nan")
    for ungrouped in UNGROUPED:
        schedule = schedule_of(plan, s.layers, P, T, Variant(lm_head=lm_head, ungrouped=ungrouped))
        try:
            check_shardable(schedule, s.heads, s.kv_heads, s.intermediate)
        except PlanError:
            continue
        weights, kv = memory_gb(schedule, s, bytes_per_param, batch, context)
        rows.append({"ungrouped": ungrouped, "latency_ms": predict(schedule, c, hw.kappa), "tp_latency_ms": tp_ms,
                     "fits": weights + kv <= hw.memory_gb - hw.memory_reserve_gb})
    return sorted(rows, key=lambda r: (not r["fits"], r["latency_ms"]))


def describe_layouts(rows: list[dict], hw: Hardware, P: int, T: int) -> str:
    """One line: the options as the model ranks them, against TP on the same devices (and a warning if the best
    is predicted slower than TP)."""
    ranked = " < ".join(f"{r['ungrouped']} {r['latency_ms']:.3g} ms" + ("" if r["fits"] else " (does not fit)")
                        for r in rows)
    tp = rows[0]["tp_latency_ms"]
    line = f"latency model ({hw.name}), decode step of the P{P}xT{T} mesh: {ranked}; TP={P * T}: " + \
           ("cannot cut the heads" if math.isnan(tp) else f"{tp:.3g} ms")
    if not math.isnan(tp) and rows[0]["latency_ms"] > tp:
        line += f"  (WARNING: the model predicts every CQIL layout slower than TP={P * T} on these devices)"
    return line


# ---- fitting ---------------------------------------------------------------------------------------
def fit_comm(nbytes: np.ndarray, ms: np.ndarray) -> Comm:
    """alpha, beta of c = alpha + bytes / beta by least squares of the relative error."""
    A = np.stack([np.ones_like(nbytes), nbytes], 1) / ms[:, None]
    alpha, inv_beta = np.linalg.lstsq(A, np.ones_like(ms), rcond=None)[0]
    return Comm(float(alpha), float(1 / inv_beta) if inv_beta > 0 else float("inf"))


# ---- the chooser's latency side: a plan on N devices against TP=N ----------------------------------
def predicted_reduction(config, plan: Plan, lat: dict) -> float:
    """plan=auto rank_by=latency: the predicted reduction of `plan` on the model's own shape on lat['hardware']
    against the original on one device, or with lat['devices'] = N against tensor parallelism on N devices
    (mesh_choice: NaN where the plan's P does not divide N or nothing fits)."""
    if lat.get("devices"):
        return mesh_choice(config, plan, lat)["reduction"]
    s, hw = Shape.from_hf(config), hardware(lat["hardware"])
    phase, T, B = lat["phase"], int(lat["prompt_tokens"]), int(lat["batch_size"])
    c = gpu_costs(s, hw, phase, T, B, int(lat.get("bytes_per_param", 2)), int(lat.get("decode_context", T)))
    variant = Variant(lm_head=lat.get("lm_head", "sharded"), ungrouped=lat.get("ungrouped", "replicated"))
    schedule = schedule_of(plan, s.layers, plan.group_size, 1, variant)
    return 1 - predict(schedule, c, hw.kappa) / original(s.layers, c)


def mesh_choice(config, plan: Plan, lat: dict) -> dict:
    """plan.devices=N: `plan` on its best P x (N/P) mesh (best_mesh) for the model's own shape:
    {"reduction": against TP on N devices (NaN if none), "mesh": "P4xT2, ungrouped tp" or why there is none}."""
    s, hw, N = Shape.from_hf(config), hardware(lat["hardware"]), int(lat["devices"])
    T = int(lat["prompt_tokens"])
    best = best_mesh(s, hw, plan, N, lat["phase"], T, int(lat["batch_size"]), int(lat.get("bytes_per_param", 2)),
                     int(lat.get("decode_context", T)), lat.get("lm_head", "sharded"),
                     tuple(lat.get("ungrouped_options", UNGROUPED_OPTIONS)))
    if best is None:
        why = (f"P={plan.group_size} does not divide {N}" if N % plan.group_size else
               f"no P x T mesh of {N} devices fits it ({hw.name} memory, head cuts)")
        return {"reduction": float("nan"), "mesh": why}
    return {"reduction": 1 - best["latency_ms"] / best["tp_latency_ms"],
            "mesh": f"P{best['P']}xT{best['T']}, ungrouped {best['ungrouped']}"}


UNGROUPED_OPTIONS = ("replicated", "tp")  # where layers outside groups run on a P x T mesh of GPUs


def mesh_row(s: Shape, hw: Hardware, schedule: Schedule, c: Costs, bpp: int, batch: int, context: int) -> dict:
    """Latency, its terms and the memory of one schedule (weights and KV cache of the fullest GPU, and whether
    they fit the GPU's memory less its reserve)."""
    t = terms(schedule, c)
    weights, kv = memory_gb(schedule, s, bpp, batch, context)
    return {"latency_ms": total(t, hw.kappa),
            "compute_ms": t["alone"] + hw.kappa * t["concurrent"], "collectives_ms": t["collectives"],
            "collective_rounds": t["collective_rounds"], "weight_gb_per_gpu": weights, "kv_cache_gb_per_gpu": kv,
            "fits": weights + kv <= hw.memory_gb - hw.memory_reserve_gb}


def mesh_candidates(s: Shape, hw: Hardware, plan: Plan, N: int, phase: str, T: int, B: int, bpp: int, context: int,
                    lm_head: str, ungrouped_options: tuple[str, ...]) -> list[dict]:
    """`plan` (P = its group size) on a P x (N/P) mesh under each `ungrouped` option that the shape can be cut
    for; [] where P does not divide N."""
    P = plan.group_size
    if N % P:
        return []
    c, out = gpu_costs(s, hw, phase, T, B, bpp, context), []
    for ungrouped in ungrouped_options:
        schedule = schedule_of(plan, s.layers, P, N // P, Variant(lm_head=lm_head, ungrouped=ungrouped))
        try:
            check_shardable(schedule, s.heads, s.kv_heads, s.intermediate)
        except PlanError:
            continue
        out.append({"P": P, "T": N // P, "ungrouped": ungrouped, **mesh_row(s, hw, schedule, c, bpp, B, context)})
    return out


def tensor_parallel_row(s: Shape, hw: Hardware, N: int, phase: str, T: int, B: int, bpp: int, context: int,
                        lm_head: str) -> dict:
    """Tensor parallelism over N devices (the schedule with no groups, P = 1, T = N), the same head treatment;
    latency NaN (shardable False) where the runtime cannot cut the layers N ways (fewer KV heads than N)."""
    schedule = schedule_of(Plan(), s.layers, 1, N, Variant(lm_head=lm_head))
    row = mesh_row(s, hw, schedule, gpu_costs(s, hw, phase, T, B, bpp, context), bpp, B, context)
    try:
        check_shardable(schedule, s.heads, s.kv_heads, s.intermediate)
    except PlanError:
        return {**row, "latency_ms": float("nan"), "fits": False, "shardable": False}
    return {**row, "shardable": True}


def best_mesh(s: Shape, hw: Hardware, plan: Plan, N: int, phase: str, T: int, B: int, bpp: int, context: int,
              lm_head: str = "sharded", ungrouped_options: tuple[str, ...] = UNGROUPED_OPTIONS) -> dict | None:
    """The chooser's latency side: `plan` on N devices at its fastest (T = N / P, the ungrouped option) among
    the setups that fit in memory, with tp_latency_ms, TP=N's latency; None where none fits or P does not divide N."""
    fitting = [r for r in mesh_candidates(s, hw, plan, N, phase, T, B, bpp, context, lm_head, ungrouped_options)
               if r["fits"]]
    if not fitting:
        return None
    best = min(fitting, key=lambda r: r["latency_ms"])
    return {**best, "tp_latency_ms": tensor_parallel_row(s, hw, N, phase, T, B, bpp, context, lm_head)["latency_ms"]}
