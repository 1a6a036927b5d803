"""`cqil latency`: a latency model of CQIL plans, calibrated and validated on measured runs, projected to GPUs.

The model (its one definition). A plan on n layers runs on P devices as `Plan.stages(n)`: a single
(ungrouped) layer or a group of P layers. With t_rest, t_layer, t_head the parts of the ORIGINAL model on
one device (embedding/norm/masks/python; one decoder layer; LM head + argmax on the last position):

    t = t_rest + sum over stages of
          ungrouped layer  t_layer                       ungrouped="rank0": member 0 alone
                           kappa t_layer                 ungrouped="replicated": all P ranks at once
          group            kappa t_layer + c_ar(bytes)   [+ c_gather(bytes) if bypass D > 0]
                           [+ c_bc(bytes) with ungrouped="rank0" after an ungrouped layer]
        + head  replicated, ungrouped="replicated"  kappa t_head
                replicated, ungrouped="rank0"       t_head + c_bc(token ids)
                sharded                             kappa t_head_shard + c_ar(max/argmax pairs)
                                                    [+ c_bc(bytes) with "rank0" if the last stage is ungrouped]
    c(bytes) = alpha + bytes / beta,   bytes = B * T_phase * H * bytes_per_element of the hidden state
    (T_phase = prompt length T for prefill, 1 for decode); t_head_shard = t_head / P on CPU.

kappa >= 1 is the slowdown of a layer while P members compute at once on shared hardware (CPU cores
share one memory bus; separate GPUs: kappa = 1). The original model is t_rest + n t_layer + t_head;
tensor parallelism on P GPUs (projection baseline): t_rest + n (t_layer_tp + 2 c_ar(bytes)) +
t_head_shard + c_ar(pairs), with t_layer_tp the layer's roofline over P plus its full kernel overhead.
With kappa = 1, no communication and t_rest = t_head = 0 the predicted reduction is Plan.ideal_latency_reduction.

Calibration (CPU, `cqil bench` CSVs with the component columns): alpha, beta of all-reduce and of
broadcast per communicator from the measured collectives of the hidden state; kappa per phase from the
measured CQIL latencies (t = fixed + kappa * concurrent: a 1-D fit). Both fits minimise relative
error, since the rows span two orders of magnitude. Validation: predict every CQIL row of another plan.

GPU projection, roofline per decoder layer of a LLaMA shape (b bytes per parameter):
    params = 2 H (heads hd) + 2 H (kv hd) + 3 H I          (q, o; k, v; gate, up, down)
    flops  = 2 params B T_phase + 4 B T_phase T_ctx (heads hd)   (QK^T and AV, causal half not subtracted)
    bytes  = params b [+ decode: KV cache read 2 B T_ctx kv hd b]
    t      = max(flops / (peak flops_eff), bytes / (mem_bw bw_eff)) + layer_overhead
LM head likewise on the last position (H x vocab); NCCL ring all-reduce beta = bus_bw P / (2 (P-1)),
broadcast beta = bus_bw, bypass all-gather beta = bus_bw / (P-1). Figures: conf/hardware/*.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import CqilError
from .checks import bench_command
from .plan import Plan
from .cli import conf_dir
from .plots import latency_projection, latency_validation
from .results import BENCH_BASELINE as ORIGINAL, plan_of, provenance, read_csv, write_csv

PHASES = ("prefill", "decode")


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
    """Everything the model needs for one (phase, T, B): parts of the original model (ms) and the collectives."""
    rest: float
    layer: float
    head: float
    head_shard: float
    allreduce: Comm
    broadcast: Comm
    gather: Comm
    hidden_bytes: float  # [B, T_phase, H] hidden state
    batch: int           # pairs (2 floats) and token ids (int64) are the tiny messages of the head


def split(plan: Plan, n: int, c: Costs, lm_head: str, ungrouped: str) -> tuple[float, float]:
    """(fixed, concurrent) ms of a CQIL run: latency = fixed + kappa * concurrent."""
    P = plan.group_size
    rank0 = ungrouped == "rank0"
    fixed, conc = c.rest, 0.0
    stages = plan.stages(n)
    for j, stage in enumerate(stages):
        if len(stage) == 1:
            fixed, conc = (fixed + c.layer, conc) if rank0 else (fixed, conc + c.layer)
            continue
        conc += c.layer
        fixed += c.allreduce(c.hidden_bytes) + (c.gather(c.hidden_bytes) if plan.bypass else 0.0)
        if rank0 and j > 0 and len(stages[j - 1]) == 1:
            fixed += c.broadcast(c.hidden_bytes)
    if lm_head == "sharded":
        conc += c.head_shard
        fixed += c.allreduce(8 * c.batch * P)
        if rank0 and len(stages[-1]) == 1:
            fixed += c.broadcast(c.hidden_bytes)
    elif rank0:
        fixed += c.head + c.broadcast(8 * c.batch)
    else:
        conc += c.head
    return fixed, conc


def predict(plan: Plan, n: int, c: Costs, kappa: float, lm_head: str = "sharded", ungrouped: str = "replicated") -> float:
    fixed, conc = split(plan, n, c, lm_head, ungrouped)
    return fixed + kappa * conc


def original(n: int, c: Costs) -> float:
    return c.rest + n * c.layer + c.head


# ---- calibration and validation on measured CPU runs ---------------------------------------------
COLUMNS = ["plan", "plan_json", "n_layers", "devices", "setup", "phase", "prompt_tokens", "batch_size", "median_ms", "comm",
           "lm_head", "ungrouped", "hidden_size", "dtype_bytes", "layer_ms", "head_ms", "rest_ms", "allreduce_ms",
           "broadcast_ms", "comm_bytes"]


def load_bench(paths: list[str]) -> pd.DataFrame:
    """The cqil bench CSVs, checked for the columns the model needs."""
    if not paths:
        raise CqilError("latency: the list of bench CSVs is empty; give latency.calibrate/validate paths")
    frames = []
    for path in paths:
        if not Path(path).is_file():
            raise CqilError(f"bench table {path} does not exist; make it with `{bench_command(path)}`")
        df = read_csv(path)
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise CqilError(f"{path} lacks the columns {', '.join(missing)} (made by an older cqil bench); "
                            f"rerun `{bench_command(path)}`")
        frames.append(df.assign(source=path))
    return pd.concat(frames, ignore_index=True)


def fit_comm(nbytes: np.ndarray, ms: np.ndarray) -> Comm:
    """alpha, beta of c = alpha + bytes / beta by least squares of the relative error."""
    A = np.stack([np.ones_like(nbytes), nbytes], 1) / ms[:, None]
    alpha, inv_beta = np.linalg.lstsq(A, np.ones_like(ms), rcond=None)[0]
    return Comm(float(alpha), float(1 / inv_beta) if inv_beta > 0 else float("inf"))


def fit_kappa(measured: np.ndarray, fixed: np.ndarray, conc: np.ndarray) -> float:
    """kappa minimising sum ((fixed + kappa conc) / measured - 1)^2 (closed form)."""
    w = 1 / measured ** 2
    return float(np.sum(w * conc * (measured - fixed)) / np.sum(w * conc ** 2))


def cqil_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[df.setup.str.startswith("cqil")].copy()
    if rows.empty:
        raise CqilError(f"no cqil rows in {', '.join(df.source.unique())}; rerun cqil bench")
    return rows


def fit_comms(rows: pd.DataFrame) -> dict[tuple[str, str], Comm]:
    """{(comm, 'allreduce' | 'broadcast'): Comm} from the measured collectives (one point per message size)."""
    fits = {}
    for comm, g in rows.groupby("comm"):
        for op in ("allreduce", "broadcast"):
            pts = g.groupby("comm_bytes")[f"{op}_ms"].median()
            fits[comm, op] = fit_comm(pts.index.to_numpy(float), pts.to_numpy(float))
    return fits


def row_costs(r, fits: dict) -> Costs:
    """Costs of one bench row (on CPU the bypass all-gather is taken as costly as an all-reduce)."""
    if (r.comm, "allreduce") not in fits:
        raise CqilError(f"communicator {r.comm!r} of {r.source} was not calibrated; add a calibration run with it")
    ar, bc = fits[r.comm, "allreduce"], fits[r.comm, "broadcast"]
    tokens = r.prompt_tokens if r.phase == "prefill" else 1
    return Costs(r.rest_ms, r.layer_ms, r.head_ms, r.head_ms / r.devices, ar, bc, ar,
                 r.batch_size * tokens * r.hidden_size * r.dtype_bytes, int(r.batch_size))


def with_terms(rows: pd.DataFrame, fits: dict) -> pd.DataFrame:
    plans = [plan_of(r).validate(int(r.n_layers)) for r in rows.itertuples()]
    terms = [split(p, int(r.n_layers), row_costs(r, fits), r.lm_head, r.ungrouped) for p, r in zip(plans, rows.itertuples())]
    return rows.assign(fixed_ms=[t[0] for t in terms], concurrent_ms=[t[1] for t in terms],
                       n_groups=[len(p.groups) for p in plans])


def calibrate(cal: pd.DataFrame) -> tuple[dict, dict[str, float]]:
    """(communicator fits, kappa per phase) from the cqil rows of the calibration runs."""
    rows = cqil_rows(cal)
    fits = fit_comms(rows)
    rows = with_terms(rows, fits)
    kappa = {ph: fit_kappa(*(g[c].to_numpy(float) for c in ("median_ms", "fixed_ms", "concurrent_ms")))
             for ph, g in rows.groupby("phase")}
    return fits, kappa


def validate(frames: dict[str, pd.DataFrame], fits: dict, kappa: dict[str, float]) -> pd.DataFrame:
    """Measured vs predicted for every cqil row ({role: bench rows}), with the parameters used as columns."""
    out = []
    for role, df in frames.items():
        rows = with_terms(cqil_rows(df), fits)
        missing = set(rows.phase) - set(kappa)
        if missing:
            raise CqilError(f"phase(s) {', '.join(missing)} were not calibrated; the calibration runs need them too")
        k = rows.phase.map(kappa)
        base = df[df.setup == ORIGINAL].set_index(["source", "phase", "prompt_tokens", "batch_size"]).median_ms
        orig = base.reindex(list(zip(rows.source, rows.phase, rows.prompt_tokens, rows.batch_size))).to_numpy()
        pred = rows.fixed_ms + k * rows.concurrent_ms
        ar = [fits[c, "allreduce"] for c in rows.comm]
        bc = [fits[c, "broadcast"] for c in rows.comm]
        out.append(pd.DataFrame({
            "role": role, "source": rows.source, "model": rows.model, "plan": rows.plan, "n_layers": rows.n_layers,
            "devices": rows.devices, "setup": rows.setup, "comm": rows.comm, "lm_head": rows.lm_head,
            "ungrouped": rows.ungrouped, "phase": rows.phase, "prompt_tokens": rows.prompt_tokens,
            "batch_size": rows.batch_size, "measured_ms": rows.median_ms, "predicted_ms": pred,
            "error_pct": 100 * (pred / rows.median_ms - 1), "original_ms": orig,
            "measured_reduction": 1 - rows.median_ms / orig, "predicted_reduction": 1 - pred / orig,
            "reduction_error_pp": 100 * (rows.median_ms - pred) / orig,
            "kappa": k,
            # the same slowdown measured directly (cqil bench's member-0 profile): a member layer's time / alone
            "measured_member_slowdown": rows.get("rank0_group_ms", np.nan) / (rows.n_groups * rows.layer_ms),
            "allreduce_alpha_ms": [c.alpha for c in ar], "allreduce_beta_bytes_per_ms": [c.beta for c in ar],
            "broadcast_alpha_ms": [c.alpha for c in bc], "broadcast_beta_bytes_per_ms": [c.beta for c in bc]}))
    return pd.concat(out, ignore_index=True)


def params_table(fits: dict, kappa: dict[str, float], n_rows: int) -> pd.DataFrame:
    rows = [{"parameter": "kappa", "phase": ph, "comm": "", "value": v, "unit": "1", "calibration_rows": n_rows}
            for ph, v in kappa.items()]
    for (comm, op), c in fits.items():
        rows += [{"parameter": f"{op}_alpha", "phase": "", "comm": comm, "value": c.alpha, "unit": "ms",
                  "calibration_rows": n_rows},
                 {"parameter": f"{op}_beta", "phase": "", "comm": comm, "value": c.beta, "unit": "bytes/ms",
                  "calibration_rows": n_rows}]
    return pd.DataFrame(rows)


# ---- GPU projection: roofline ---------------------------------------------------------------------
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


def gpu_costs(s: Shape, hw: Hardware, P: int, phase: str, T: int, B: int, bpp: int = 2,
              context: int = 512) -> tuple[Costs, float]:
    """(Costs on P GPUs, tensor-parallel layer ms) from the roofline; the head runs on the last position only."""
    flops, nbytes = layer_work(s, phase, T, B, bpp, context)
    head = (2 * s.hidden * s.vocab * B, s.hidden * s.vocab * bpp)
    alpha = 1e3 * hw.comm_alpha_s
    bw = hw.bus_bw / 1e3  # bytes per ms
    costs = Costs(rest=1e3 * hw.rest_overhead_s, layer=roofline_ms(flops, nbytes, hw, hw.layer_overhead_s),
                  head=roofline_ms(*head, hw, hw.layer_overhead_s),
                  head_shard=roofline_ms(head[0] / P, head[1] / P, hw, hw.layer_overhead_s),
                  allreduce=Comm(alpha, bw * P / (2 * (P - 1))), broadcast=Comm(alpha, bw),
                  gather=Comm(alpha, bw / (P - 1)),
                  hidden_bytes=B * (T if phase == "prefill" else 1) * s.hidden * bpp, batch=B)
    return costs, roofline_ms(flops / P, nbytes / P, hw, hw.layer_overhead_s)


def tensor_parallel(n: int, c: Costs, layer_tp: float, P: int) -> float:
    return c.rest + n * (layer_tp + 2 * c.allreduce(c.hidden_bytes)) + c.head_shard + c.allreduce(8 * c.batch * P)


def predicted_reduction(config, plan: Plan, lat: dict) -> float:
    """plan=auto rank_by=latency: 1 - CQIL / original latency of the model's own shape on `lat['hardware']`."""
    s = Shape.from_hf(config)
    hw = hardware(lat["hardware"])
    c, _ = gpu_costs(s, hw, plan.group_size, lat["phase"], int(lat["prompt_tokens"]), int(lat["batch_size"]),
                     int(lat.get("bytes_per_param", 2)), int(lat.get("decode_context", lat["prompt_tokens"])))
    t = predict(plan, s.layers, c, hw.kappa, lat.get("lm_head", "sharded"), lat.get("ungrouped", "replicated"))
    return 1 - t / original(s.layers, c)


def projection(pcfg: dict) -> pd.DataFrame:
    """Original / CQIL / tensor parallel latency of every model x hardware x plan x shape x runtime variant."""
    rows = []
    bpp, B, ctx = int(pcfg["bytes_per_param"]), int(pcfg["batch_size"]), int(pcfg["decode_context"])
    shapes = [("prefill", T) for T in pcfg["prefill_tokens"]] + [("decode", ctx)]
    for hw_name in pcfg["hardware"]:
        hw = hardware(hw_name)
        for name, m in pcfg["models"].items():
            s = Shape(m["layers"], m["hidden"], m["intermediate"], m["heads"], m["kv_heads"], m["vocab"])
            for pd_ in m["plans"]:
                plan = Plan.from_dict(pd_, s.layers)
                P = plan.group_size
                for phase, T in shapes:
                    c, layer_tp = gpu_costs(s, hw, P, phase, T, B, bpp, ctx)
                    orig, tp = original(s.layers, c), tensor_parallel(s.layers, c, layer_tp, P)
                    for v in pcfg["runtime"]:
                        t = predict(plan, s.layers, c, hw.kappa, v["lm_head"], v["ungrouped"])
                        rows.append({"model": name, "hardware": hw_name, "device": hw.name, "plan": plan.describe(),
                                     "P": P, "lm_head": v["lm_head"], "ungrouped": v["ungrouped"], "phase": phase,
                                     "prompt_tokens": T, "batch_size": B, "original_ms": orig, "cqil_ms": t,
                                     "tensor_parallel_ms": tp, "cqil_reduction": 1 - t / orig,
                                     "tp_reduction": 1 - tp / orig, "ideal_reduction": plan.ideal_latency_reduction(s.layers),
                                     "layer_ms": c.layer, "head_ms": c.head, "allreduce_ms": c.allreduce(c.hidden_bytes),
                                     "bytes_per_param": bpp,
                                     **{f.name: getattr(hw, f.name) for f in fields(Hardware) if f.name != "name"}})
    return pd.DataFrame(rows)


def summary(proj: pd.DataFrame) -> str:
    """Projected reductions: one row per model x hardware x plan, one column per shape."""
    cells = proj.assign(case=[f"{ph} {'T' if ph == 'prefill' else 'ctx'}={t}" for ph, t in zip(proj.phase, proj.prompt_tokens)],
                        cell=[f"{r.cqil_reduction:.1%}" for r in proj.itertuples()])
    heads = list(dict.fromkeys(proj.lm_head))
    first = cells[cells.lm_head == heads[0]].set_index(["model", "hardware", "plan", "ideal_reduction", "case"])
    text = first.cell
    for h in heads[1:]:
        text = text + " / " + cells[cells.lm_head == h].set_index(first.index.names).cell
    text = text + " | TP " + first.tp_reduction.map("{:.1%}".format)
    table = text.unstack("case").reindex(list(dict.fromkeys(text.index.droplevel("case"))))
    table = table[list(dict.fromkeys(cells["case"]))].reset_index()
    table["ideal_reduction"] = table.ideal_reduction.map("{:.1%}".format)
    with pd.option_context("display.width", 250, "display.max_colwidth", 40):
        return (f"projected latency reduction against 1 GPU, batch {proj.batch_size.iloc[0]}: CQIL head "
                + " / ".join(heads) + " | tensor parallel on the same GPUs\n" + table.to_string(index=False))


# ---- the job --------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> None:
    """cqil latency: calibrate + validate on measured CPU runs (if there), then the GPU projection."""
    if cfg.calibrate:  # every listed table must exist (cqil.checks); calibrate=[] runs the projection alone
        cal, val = load_bench(list(cfg.calibrate)), load_bench(list(cfg.validate))
        fits, kappa = calibrate(cal)
        table = validate({"calibration": cal, "validation": val}, fits, kappa)
        prov = provenance("cpu")
        write_csv(table.assign(**prov), cfg.validation_out)
        write_csv(params_table(fits, kappa, len(cqil_rows(cal))).assign(**prov), cfg.params_out)
        print(f"latency model fitted on {', '.join(cfg.calibrate)}: "
              + ", ".join(f"kappa[{ph}] = {k:.3f}" for ph, k in kappa.items()))
        for (comm, op), c in fits.items():
            print(f"  {op:9s} ({comm}): alpha {1e3 * c.alpha:.1f} us, beta {c.beta / 1e6:.3f} GB/s")
        slow = table.groupby("phase", sort=False).measured_member_slowdown.median()
        if slow.notna().all():
            print("  member slowdown measured directly (median over rows): "
                  + ", ".join(f"{ph} {v:.3f}" for ph, v in slow.items()))
        for role, g in table.groupby("role", sort=False):
            err = g.groupby("phase", sort=False)[["error_pct", "reduction_error_pp"]].apply(lambda e: e.abs().mean())
            print(f"  {role} ({', '.join(g.plan.unique())}, {len(g)} rows): mean |error| of latency "
                  + ", ".join(f"{ph} {r.error_pct:.1f}%" for ph, r in err.iterrows()) + "; of the reduction "
                  + ", ".join(f"{ph} {r.reduction_error_pp:.1f} points" for ph, r in err.iterrows()))
        print(f"-> {cfg.validation_out}\n-> {cfg.params_out}\n-> {latency_validation(table, cfg.validation_png)}")
    proj = projection(OmegaConf.to_container(cfg.projection, resolve=True))
    write_csv(proj.assign(**provenance("roofline projection")), cfg.projection_out)
    print(summary(proj))
    print(f"-> {cfg.projection_out}\n-> {latency_projection(proj, cfg.projection_png)}")
