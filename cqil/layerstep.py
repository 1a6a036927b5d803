"""The layer-step microbenchmark: what one decoder layer step costs a device, eager and compiled, and its fixed part.

CQIL's gain over tensor parallelism (TP) on N GPUs is made of the fixed cost of a layer step: the time a decoder
layer takes beyond streaming its bytes (kernel launches, small ops, host time), which every TP shard pays in full
however small it is, and which a CQIL group of P layers pays once. `cqil latency` projects with that constant;
this module measures it (issue 21):

  - one LLaMA decoder layer (transformers' LlamaDecoderLayer, sdpa attention) of a given shape with random weights
    in a given dtype, cut as tensor parallelism cuts it for one device: the shapes of its tensors are those that
    cqil.schedule.shares gives rank `index` of the TP=count schedule (q, k, v, gate, up by output features with
    whole KV heads beside their query heads, o and down by input features; where the KV heads do not divide evenly
    the MLP columns balance the shards' bytes, cqil.schedule.tp_cuts);
  - batch-1 decode steps against a preallocated KV cache of `context` tokens written in place at a position held
    on the device (gpt-fast's KVCache); the step at the last position is repeated, so every timed step does the
    same work: its attention reads the whole cache (HF's StaticCache advances its position at every update);
    a step runs a stack of `depth` such shards with distinct weights and caches (Step: why), and a layer step's
    time is the stack's over `depth`;
  - eager, and compiled whole (torch.compile(fullgraph=True): a graph break is an error; on CUDA
    mode="reduce-overhead", i.e. CUDA graphs, on CPU inductor's default), eager and compiled blocks alternating,
    so that drift of the machine hits both alike; the compiled step is checked against the eager one;
  - timing: after a warm-up, `blocks` blocks of `steps` back-to-back steps (CUDA: events on the stream, then a
    synchronize); a layer step's time = a block's time / (steps x depth); median, p10 and p90 over the blocks;
  - the fit, per (shape, mode) over the shard sizes: t = c0 + bytes / bandwidth (least squares of the relative
    error: cqil.costs.fit_comm, the form the latency model fits to collectives), bytes = the shard's weight
    bytes + the bytes of KV cache its attention reads; every row carries the fit and its own residual.

One device, so the all-reduces that end a TP shard's attention and MLP are not in the step; cqil latency adds
them from its own figures. scripts/gpu_check.py runs it on one GPU (LLaMA-2-7B and 70B layer shapes, bf16) and
scripts/layer_step.py on the CPU (the bundled model's layer shape, fp32); `cqil latency layer_step.csv=<table>`
takes c0 and the bandwidth from the table instead of fitting them to gpt-fast's published numbers.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from . import CqilError
from .costs import fit_comm
from .plan import PlanError
from .results import provenance
from .schedule import LAYER_PREFIX, check_shardable, llama_shapes, shares, tp_schedule

MODES = ("eager", "compiled")
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}  # reduce-overhead on CUDA: CUDA graphs
GPU_SHARDS = (1, 2, 4, 8)  # TP = 1, 2, 4, 8 on one node
# What a run measures by default on each kind of device (scripts/layer_step.py, scripts/gpu_check.py). depth: layer
# shards per step (Step), enough that a step's weights exceed the device's caches: on a GPU 4 x a 7B TP=8 shard is
# 200 MB (an H100's L2: 50 MB); on the CPU the bundled model's own 30 layers.
DEFAULTS = {"cpu": {"shapes": ("smollm2-135m",), "depth": 30, "dtype": "float32"},
            "cuda": {"shapes": ("llama-2-7b", "llama-2-70b"), "depth": 4, "dtype": "bfloat16"}}


@dataclass(frozen=True)
class LayerShape:
    """The dimensions of one LLaMA decoder layer (head_dim 0: hidden // heads)."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


# Shapes from the models' config.json (conf/latency.yaml `models` has the same; tests/test_layerstep.py checks it).
SHAPES = {
    "llama-2-7b": LayerShape(4096, 11008, 32, 32),
    "llama-2-70b": LayerShape(8192, 28672, 64, 8),   # GQA: 8 KV heads of 8 query heads each
    "smollm2-135m": LayerShape(576, 1536, 9, 3),     # the bundled model
    "tiny": LayerShape(64, 192, 4, 4),               # the dry runs' (tests, gpu_check --device cpu)
}


def shardable(shape: LayerShape, count: int) -> bool:
    """Can tensor parallelism cut this layer `count` ways (cqil.schedule.check_shardable: whole KV heads per shard)?"""
    try:
        check_shardable(tp_schedule(1, count, lm_head="replicated"), shape.heads, shape.kv_heads, shape.intermediate)
    except PlanError:
        return False
    return True


def default_shards(shape: LayerShape, device: str) -> list[int]:
    """GPU: TP = 1, 2, 4, 8 (those the shape allows); CPU: every count from 1 to min(8, KV heads), so that a small
    model (SmolLM2: 3 KV heads) still gives the fit three shard sizes."""
    wanted = GPU_SHARDS if device == "cuda" else range(1, min(8, shape.kv_heads) + 1)
    return [c for c in wanted if shardable(shape, c)]


def shard_shapes(shape: LayerShape, count: int, index: int = 0) -> dict[str, tuple[int, ...]]:
    """{parameter name inside the layer: shape} of TP shard `index` of `count` (cqil.schedule.shares)."""
    if not shardable(shape, count):
        raise CqilError(f"tensor parallelism cannot cut a layer with {shape.kv_heads} KV heads {count} ways "
                        "(each shard holds whole KV heads); choose fewer shards")
    full = llama_shapes(1, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, vocab=1,
                        head_dim=shape.head_dim or None)
    prefix = f"{LAYER_PREFIX}0."
    return {s.name[len(prefix):]: s.shape(full[s.source])
            for s in shares(tp_schedule(1, count, lm_head="replicated"), index, full, tied=False, heads=shape.heads,
                            kv_heads=shape.kv_heads)
            if s.name.startswith(prefix)}


def build_shard(shape: LayerShape, count: int, dtype: torch.dtype, device: str | torch.device,
                index: int = 0) -> LlamaDecoderLayer:
    """TP shard `index` of `count` of a decoder layer of `shape`: a LlamaDecoderLayer with the shard's heads,
    KV heads and MLP columns, random weights, on `device` in `dtype`, no gradients."""
    want = shard_shapes(shape, count, index)
    hd = shape.hd
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=want["mlp.gate_proj.weight"][0],
                         num_attention_heads=want["self_attn.q_proj.weight"][0] // hd,
                         num_key_value_heads=want["self_attn.k_proj.weight"][0] // hd, head_dim=hd,
                         num_hidden_layers=1, vocab_size=1, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"  # a bare LlamaConfig has none set
    with torch.device(device):
        layer = LlamaDecoderLayer(config, layer_idx=0).to(dtype).eval().requires_grad_(False)
    got = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    if got != want:  # transformers' layout drifted from the schedule's: the bytes would be someone else's
        raise CqilError(f"the layer shard's parameters {got} are not the schedule's shares {want}")
    return layer


class SlotCache:
    """A preallocated KV cache of one layer, [1, kv_heads, context, head_dim] keys and values (random: their values
    do not change the cost), written in place at `pos`, a position tensor on the device (gpt-fast's KVCache);
    a LlamaAttention calls update(key, value, layer_idx) and attends over what it returns."""

    def __init__(self, kv_heads: int, context: int, head_dim: int, dtype: torch.dtype, device: str | torch.device):
        self.keys = torch.randn(1, kv_heads, context, head_dim, dtype=dtype, device=device)
        self.values = torch.randn(1, kv_heads, context, head_dim, dtype=dtype, device=device)
        self.pos = torch.tensor([context - 1], device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.pos, key)
        self.values.index_copy_(2, self.pos, value)
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class Step:
    """One decode step through a stack of `depth` layer shards of one shape (distinct weights, each with its own
    cache), as a model's step runs its layers: x [1, 1, hidden] -> x. A stack, not one layer repeated: the same
    weights step after step would stay in the device's caches (a 7B TP=8 shard, 50 MB, fits an H100's L2), which a
    real step streaming every layer never sees; and a compiled stack pays a graph's launch once for `depth` layers,
    as a compiled model does."""
    layers: list[LlamaDecoderLayer]
    caches: list[SlotCache]
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, position_embeddings=(self.cos, self.sin), past_key_values=cache)
        return x

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights of one layer shard."""
        return sum(p.nbytes for p in self.layers[0].parameters())

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache one layer shard's attention reads."""
        return self.caches[0].nbytes

    def static(self) -> None:
        """Every tensor the step reads or writes keeps its address (torch._dynamo.mark_static_address), so CUDA
        graphs neither copy the weights in nor skip the graph for the caches' in-place writes."""
        tensors = [p for layer in self.layers for p in layer.parameters()]
        tensors += [t for c in self.caches for t in (c.keys, c.values, c.pos)] + [self.x, self.cos, self.sin]
        for t in tensors:
            torch._dynamo.mark_static_address(t)


def make_step(shape: LayerShape, count: int, dtype: torch.dtype, device: str | torch.device, context: int = 512,
              depth: int = 1, index: int = 0) -> Step:
    """A decode step through `depth` copies of TP shard `index` of `count`, at position context - 1 against full
    caches of `context` tokens."""
    layers = [build_shard(shape, count, dtype, device, index) for _ in range(depth)]
    config = layers[0].self_attn.config
    caches = [SlotCache(config.num_key_value_heads, context, shape.hd, dtype, device) for _ in layers]
    with torch.device(device):
        rotary = LlamaRotaryEmbedding(config)
        x = torch.randn(1, 1, shape.hidden, dtype=dtype)
        cos, sin = rotary(x, torch.tensor([[context - 1]]))
    return Step(layers, caches, x, cos, sin)


def compile_step(step: Step, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The step compiled whole (fullgraph: a graph break raises), in a fresh dynamo state; with CUDA graphs each
    call first marks a new step (the previous call's output may be overwritten)."""
    torch._dynamo.reset()
    step.static()
    compiled = torch.compile(step.__call__, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def graphed(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)
    return graphed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_us(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int) -> float:
    """Microseconds per step of `steps` back-to-back calls (CUDA: events around them on the stream)."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(x.device)
        start.record()
        for _ in range(steps):
            fn(x)
        end.record()
        end.synchronize()
        return 1e3 * start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x)
    return 1e6 * (time.perf_counter() - t0) / steps


def measure_shard(shape: LayerShape, count: int, dtype: torch.dtype, device: str | torch.device, modes=MODES,
                  context: int = 512, depth: int = 1, warmup: int = 10, blocks: int = 20, steps: int = 25,
                  compile_mode: str | None = None) -> list[dict]:
    """One row per mode for TP shard 0 of `count` (a stack of `depth` of them per step): bytes and the median / p10 /
    p90 microseconds of one layer step (a block's time / (steps x depth)) over the blocks, the first call's seconds
    (compiled: the compile), and for the compiled step its agreement with the eager one, graph breaks and CUDA-graph
    skips."""
    from torch._dynamo.utils import counters

    device = torch.device(device)
    compile_mode = compile_mode or COMPILE_MODES[device.type]
    step = make_step(shape, count, dtype, device, context, depth)
    fns, first_s, extra = {}, {}, {}
    with torch.no_grad():
        for mode in modes:
            counters.clear()
            t0 = time.perf_counter()
            fn = step if mode == "eager" else compile_step(step, compile_mode)
            out = fn(step.x).clone()
            _sync(device)
            first_s[mode] = time.perf_counter() - t0
            fns[mode] = fn
            if mode == "compiled":
                for _ in range(2):  # CUDA graphs record on a later call than the first
                    out = fn(step.x).clone()
                reference = step(step.x).float()
                extra[mode] = {"max_rel_diff_vs_eager": ((out.float() - reference).abs().max()
                                                         / reference.abs().max()).item(),
                               "graph_breaks": sum(counters["graph_break"].values()),
                               "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
        for fn in fns.values():
            for _ in range(warmup):
                fn(step.x)
        times: dict[str, list[float]] = {m: [] for m in fns}
        for _ in range(blocks):
            for mode, fn in fns.items():  # alternating: drift between blocks hits every mode alike
                times[mode].append(block_us(fn, step.x, steps) / depth)
    cfg = step.layers[0].self_attn.config
    common = {"hidden": shape.hidden, "intermediate": shape.intermediate, "heads": shape.heads,
              "kv_heads": shape.kv_heads, "head_dim": shape.hd, "dtype": str(dtype).removeprefix("torch."),
              "context": context, "shard": count, "shard_index": 0, "shard_heads": cfg.num_attention_heads,
              "shard_kv_heads": cfg.num_key_value_heads, "shard_intermediate": cfg.intermediate_size,
              "weight_bytes": step.weight_bytes, "kv_bytes": step.kv_bytes, "bytes": step.weight_bytes + step.kv_bytes,
              "depth": depth, "blocks": blocks, "steps_per_block": steps,
              "threads": torch.get_num_threads() if device.type == "cpu" else None}
    rows = []
    for mode, t in times.items():
        q = np.percentile(t, [10, 90])
        rows.append({**common, "mode": mode, "compile_mode": compile_mode if mode == "compiled" else "",
                     "median_us": statistics.median(t), "p10_us": float(q[0]), "p90_us": float(q[1]),
                     "first_call_s": round(first_s[mode], 3),
                     **extra.get(mode, {"max_rel_diff_vs_eager": 0.0, "graph_breaks": 0, "cudagraph_skips": 0})})
    del fns, step
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fit_step(nbytes: np.ndarray, us: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(c0 us, bandwidth GB/s, residuals us = measured - fitted) of t = c0 + bytes / bandwidth (cqil.costs.fit_comm:
    least squares of the relative error); bandwidth inf where the times do not grow with the bytes."""
    c = fit_comm(np.asarray(nbytes, float), np.asarray(us, float))
    return c.alpha, c.beta * 1e-3, np.asarray(us, float) - c(np.asarray(nbytes, float))


def with_fits(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows + fit_c0_us, fit_bandwidth_gbs, fit_points (per shape and mode, NaN with fewer than 2 shard sizes),
    each row's fit_residual_us, and fixed_share = c0 / the row's median: the part of its step that is overhead."""
    parts = []
    for _, g in rows.groupby(["gpu", "shape", "mode"], sort=False):
        if g["bytes"].nunique() < 2:
            parts.append(g.assign(fit_c0_us=np.nan, fit_bandwidth_gbs=np.nan, fit_residual_us=np.nan, fit_points=len(g)))
            continue
        c0, bw, residual = fit_step(g["bytes"].to_numpy(), g["median_us"].to_numpy())
        parts.append(g.assign(fit_c0_us=c0, fit_bandwidth_gbs=bw, fit_residual_us=residual, fit_points=len(g)))
    out = pd.concat(parts, ignore_index=True)
    return out.assign(fixed_share=out.fit_c0_us / out.median_us)


def run(shapes: list[str], device: str, dtype: torch.dtype, shards: list[int] | None = None, modes=MODES,
        context: int = 512, depth: int = 1, warmup: int = 10, blocks: int = 20, steps: int = 25,
        compile_mode: str | None = None, deadline: float | None = None,
        progress: Callable[[str], None] = print) -> pd.DataFrame:
    """The microbenchmark over `shapes` (names of SHAPES) x their shard counts (None: default_shards) x modes, with
    the fits and provenance; stops before a shard when time.monotonic() passes `deadline` (the rows so far)."""
    kind = torch.device(device).type
    gpu = torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else "cpu"
    plan = [(name, count) for name in shapes for count in shards or default_shards(SHAPES[name], kind)]
    for name, count in plan:  # before any work
        shard_shapes(SHAPES[name], count)
    rows = []
    for name, count in plan:
        if deadline is not None and time.monotonic() > deadline:
            progress(f"layer step: out of time before {name} shard 1/{count}")
            break
        for r in measure_shard(SHAPES[name], count, dtype, device, modes, context, depth, warmup, blocks, steps,
                               compile_mode):
            rows.append({"gpu": gpu, "shape": name, **r})
            progress(f"layer step {name:12s} 1/{count} {r['mode']:8s} {r['bytes'] / 1e6:9.2f} MB "
                     f"{r['median_us']:9.1f} us (p10 {r['p10_us']:.1f}, p90 {r['p90_us']:.1f})"
                     + (f", first call {r['first_call_s']:.1f} s" if r["mode"] == "compiled" else ""))
    return table(rows, gpu)


def table(rows: list[dict], gpu: str) -> pd.DataFrame:
    """The rows with their fits and provenance (empty: an empty frame)."""
    if not rows:
        return pd.DataFrame()
    return with_fits(pd.DataFrame(rows)).assign(**provenance(gpu))


def summary(df: pd.DataFrame) -> str:
    """One line per (shape, mode): the fitted fixed cost and bandwidth, the fit's largest residual, and the share of
    the whole layer's step (shard 1) that is fixed cost."""
    lines = []
    for (shape, mode), g in df.groupby(["shape", "mode"], sort=False):
        r, whole = g.iloc[0], g[g["shard"] == 1]
        share = f"; {100 * whole.fixed_share.iloc[0]:.0f}% of a whole layer's step" if len(whole) else ""
        lines.append(f"  {shape:12s} {mode:8s} c0 {r.fit_c0_us:8.1f} us, bandwidth {r.fit_bandwidth_gbs:8.1f} GB/s "
                     f"over {len(g)} shard sizes (largest |residual| {g.fit_residual_us.abs().max():.1f} us){share}")
    return "\n".join(lines)
