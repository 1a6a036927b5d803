"""`cqil latency`: the latency model of CQIL, CQIL x TP and tensor parallelism; calibrated and validated on
measured runs (cqil bench) and on published numbers; projected to LLaMA on N GPUs. Its pure cost functions
(Costs, terms, the roofline gpu_costs, hardware figures, fit_comm, and the chooser's side: best_mesh,
predicted_reduction) live in cqil.costs, which cqil.bench, cqil.generate, cqil.planning and cqil.layerstep read.

The model (its one definition). A run is the schedule of cqil.schedule: make_schedule(plan, n_layers, P, T,
variant) lists the stages of one forward step on a P x T mesh (embedding; layers outside groups, whole or
cut over T or P*T ranks; groups, member k's layer cut over its T ranks; broadcasts of member 0's state;
the LM head, whole or vocabulary-parallel) and every collective of every stage (op, axis, payload bytes).
The model walks those stages, so TP, CQIL and CQIL x TP are costed from the same list the runtime runs:

    t = t_rest + sum over stages [ compute(stage) + sum over its collectives c(op, group size, bytes) ]
    compute(layer | group member) = t_layer(k), compute(head) = t_head(k), k = the stage's shard count
    (1 whole, T, or P*T); a group stage is ONE layer time (its members run at once on different ranks).

On shared hardware (CPU cores: one memory bus) compute that several ranks do at once slows down:
t = fixed + kappa * concurrent, where `concurrent` is the compute of stages that more than one rank runs
at the same time and `fixed` the rest (compute of one rank alone, every collective, t_rest); kappa = 1 on
separate GPUs. With kappa = 1, no communication and t_rest = t_head = 0 a plan's predicted reduction is
exactly Plan.ideal_latency_reduction.

Two sources of t_layer(k), t_head(k) and c(...):
  - CPU, measured (cqil bench CSVs): the original model's per-layer, head and rest times (t(k) = t(1)/k)
    and alpha + bytes/beta fitted to the measured all-reduce and broadcast of the hidden state per
    communicator (an all-gather is taken as costly as an all-reduce of the same bytes); kappa per phase
    fitted to the CQIL rows of one plan (the bench's paired medians), validated on another plan's rows.
  - GPU, roofline with stated figures (conf/hardware/*.yaml), per decoder layer of a LLaMA shape
    (b bytes per parameter, B sequences, T_phase tokens each: the prompt for a prefill, 1 for a decode step):
        params = 2 H (heads hd) + 2 H (kv hd) + 3 H I          (q, o; k, v; gate, up, down)
        flops  = 2 params B T_phase + 4 B T_phase T_ctx (heads hd)   (QK^T and AV, causal half not subtracted)
        bytes  = params b [+ decode: KV cache read 2 B T_ctx kv hd b]
        t(k)   = max(flops / k / (peak flops_eff), bytes / k / (mem_bw bw_eff)) + layer_overhead
    (the kernel overhead does not shrink with the shard: that is what CQIL's groups save over TP), the LM
    head likewise on the last position (H x vocab); collectives c = alpha + moved bytes / bus_bw with
    moved = 2 (n-1)/n x bytes (ring all-reduce), (n-1) x bytes (all-gather), bytes (broadcast).

External validation (`external` in conf/latency.yaml): numbers no one here produced: gpt-fast's tensor-
parallel tokens/s for Llama-2-7B (the figures named in `external.fit` are fitted on those rows) and
Llama-2-70B, and the CQIL paper's latency reductions (held out). The fitted figures then serve the GPU
projection: TP=N against the best CQIL x TP with P*T = N (results/latency/hybrid.csv), with each setup's
weights and KV cache per GPU from the schedule's per-rank accounting, against the GPU's memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import CqilError
from .inputs import bench_command, hardware_named
from .outputs import READS
from .costs import (Comm, Costs, Hardware, Shape, fit_comm, gpu_costs, hardware, mesh_candidates, original, predict,
                    schedule_of, shape_of, split, tensor_parallel_row)
from .paths import conf_dir
from .plan import Plan
from .plots import latency_hybrid, latency_validation
from .results import BENCH_BASELINE as ORIGINAL, plan_columns, plan_of, provenance, read_csv, update_table
from .schedule import Schedule, Variant

PHASES = ("prefill", "decode")
# ---- calibration and validation on measured CPU runs ---------------------------------------------
COLUMNS = READS["latency bench"].columns  # what the model computes with from a bench table (cqil.outputs)


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
                            f"rerun `{bench_command(path)}`")  # the table's own command
        if "mesh_p" not in df:  # older tables: every multi-process setup ran on the devices x tp mesh
            df = df.assign(mesh_p=df.devices, mesh_t=df.tp)
        if "compile" in df:  # the model's CPU figures are eager steps (compiled rows are paired with compiled (a))
            df = df[df["compile"] == "none"]
        frames.append(df.assign(source=path))
    return pd.concat(frames, ignore_index=True)


def fit_kappa(measured: np.ndarray, fixed: np.ndarray, conc: np.ndarray) -> float:
    """kappa minimising sum ((fixed + kappa conc) / measured - 1)^2 (closed form)."""
    w = 1 / measured ** 2
    return float(np.sum(w * conc * (measured - fixed)) / np.sum(w * conc ** 2))


def cqil_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[df.setup.str.startswith("cqil")].assign(kind="cqil")
    if rows.empty:
        raise CqilError(f"no cqil rows in {', '.join(df.source.unique())}; rerun cqil bench")
    return rows


def model_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The multi-process rows the model predicts: CQIL (x TP) and the tensor-parallel baseline (kind tp)."""
    return pd.concat([cqil_rows(df), df[df.setup.str.startswith("tensor parallel")].assign(kind="tp")])


def fit_comms(rows: pd.DataFrame) -> dict[tuple[str, str], Comm]:
    """{(comm, 'allreduce' | 'broadcast'): Comm} from the measured collectives (one point per message size)."""
    fits = {}
    for comm, g in rows.groupby("comm"):
        for op in ("allreduce", "broadcast"):
            pts = g.groupby("comm_bytes")[f"{op}_ms"].median()
            fits[comm, op] = fit_comm(pts.index.to_numpy(float), pts.to_numpy(float))
    return fits


def measured_costs(rest: float, layer: float, head: float, allreduce: Comm, broadcast: Comm, batch: int, tokens: int,
                   hidden: int, dtype_bytes: int) -> Costs:
    """Costs from measured parts of the original model (a cut into k shards takes 1/k of the time) and fitted
    collectives (an all-gather is taken as costly as an all-reduce of the same bytes)."""
    ops = {"all_reduce": allreduce, "all_gather": allreduce, "broadcast": broadcast}
    return Costs(rest, lambda k: layer / k, lambda k: head / k, lambda op, size, nbytes: ops[op](nbytes), batch, tokens,
                 hidden, dtype_bytes)


def row_costs(r, fits: dict) -> Costs:
    """Costs of one bench row: the original's measured parts, the row's communicator's fits."""
    if (r.comm, "allreduce") not in fits:
        raise CqilError(f"communicator {r.comm!r} of {r.source} was not calibrated; add a calibration run with it")
    return measured_costs(float(r.rest_ms), float(r.layer_ms), float(r.head_ms), fits[r.comm, "allreduce"],
                          fits[r.comm, "broadcast"], int(r.batch_size), int(r.prompt_tokens) if r.phase == "prefill" else 1,
                          int(r.hidden_size), int(r.dtype_bytes))


def row_schedule(r) -> Schedule:
    """The schedule a bench row ran: its plan (none for tensor parallelism) on its P x T mesh, its variant."""
    n = int(r.n_layers)
    if r.kind == "tp":
        return schedule_of(Plan(), n, 1, int(r.mesh_t), Variant(lm_head=r.lm_head))
    return schedule_of(plan_of(r).validate(n), n, int(r.mesh_p), int(r.mesh_t),
                       Variant(lm_head=r.lm_head, ungrouped=r.ungrouped))


def with_terms(rows: pd.DataFrame, fits: dict) -> pd.DataFrame:
    schedules = [row_schedule(r) for r in rows.itertuples()]
    parts = [split(s, row_costs(r, fits)) for s, r in zip(schedules, rows.itertuples())]
    return rows.assign(fixed_ms=[t[0] for t in parts], concurrent_ms=[t[1] for t in parts],
                       n_groups=[len(s.plan.groups) for s in schedules])


def paired(rows: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """rows + original_ms ((a)'s median of the same run and shape) and measured_ms, the paired estimate
    of the row's latency: original_ms x (1 - the median over rounds of the paired reduction). Drift of
    the machine between rounds cancels in it; the bench's interval of that reduction comes along."""
    base = df[df.setup == ORIGINAL].set_index(["source", "phase", "prompt_tokens", "batch_size"]).median_ms
    orig = base.reindex(list(zip(rows.source, rows.phase, rows.prompt_tokens, rows.batch_size))).to_numpy()
    out = rows.assign(original_ms=orig, measured_ms=orig * (1 - rows.reduction.to_numpy()))
    for col in ("reduction_ci_low", "reduction_ci_high", "rounds"):  # older bench tables have no intervals
        out[col] = rows[col] if col in rows else np.nan
    return out


def calibrate(cal: pd.DataFrame) -> tuple[dict, dict[str, float]]:
    """(communicator fits, kappa per phase) from the cqil rows of the calibration runs (paired latencies)."""
    rows = cqil_rows(cal)
    fits = fit_comms(rows)
    rows = paired(with_terms(rows, fits), cal)
    kappa = {ph: fit_kappa(*(g[c].to_numpy(float) for c in ("measured_ms", "fixed_ms", "concurrent_ms")))
             for ph, g in rows.groupby("phase")}
    return fits, kappa


def validate(frames: dict[str, pd.DataFrame], fits: dict, kappa: dict[str, float]) -> pd.DataFrame:
    """Measured (paired) vs predicted for every cqil row ({role: bench rows}), the measurement's own
    interval beside the model's error, and the parameters used as columns."""
    out = []
    for role, df in frames.items():
        rows = paired(with_terms(model_rows(df), fits), df)
        missing = set(rows.phase) - set(kappa)
        if missing:
            raise CqilError(f"phase(s) {', '.join(missing)} were not calibrated; the calibration runs need them too")
        k = rows.phase.map(kappa)
        pred = rows.fixed_ms + k * rows.concurrent_ms
        orig = rows.original_ms
        predicted_reduction = 1 - pred / orig
        ar = [fits[c, "allreduce"] for c in rows.comm]
        bc = [fits[c, "broadcast"] for c in rows.comm]
        out.append(pd.DataFrame({
            "role": role, "kind": rows.kind, "source": rows.source, "model": rows.model,
            "plan": rows.plan.where(rows.kind == "cqil", "none (tensor parallel)"), "n_layers": rows.n_layers,
            "devices": rows.devices, "setup": rows.setup, "comm": rows.comm, "lm_head": rows.lm_head,
            "ungrouped": rows.ungrouped, "phase": rows.phase, "prompt_tokens": rows.prompt_tokens,
            "batch_size": rows.batch_size, "rounds": rows.rounds, "measured_ms": rows.measured_ms, "predicted_ms": pred,
            "error_pct": 100 * (pred / rows.measured_ms - 1), "original_ms": orig,
            "measured_reduction": rows.reduction, "measured_reduction_ci_low": rows.reduction_ci_low,
            "measured_reduction_ci_high": rows.reduction_ci_high, "predicted_reduction": predicted_reduction,
            "reduction_error_pp": 100 * (rows.reduction - predicted_reduction),
            # the measurement's own uncertainty in the same unit: half its interval, and whether the model is inside
            "measured_ci_halfwidth_pp": 50 * (rows.reduction_ci_high - rows.reduction_ci_low),
            "within_measured_ci": (rows.reduction_ci_low <= predicted_reduction) & (predicted_reduction <= rows.reduction_ci_high),
            "kappa": k,
            # the same slowdown measured directly (cqil bench's member-0 profile): a member layer's time / alone
            "measured_member_slowdown": rows.get("rank0_group_ms", np.nan) / (rows.n_groups * rows.layer_ms),
            "allreduce_alpha_ms": [c.alpha for c in ar], "allreduce_beta_bytes_per_ms": [c.beta for c in ar],
            "broadcast_alpha_ms": [c.alpha for c in bc], "broadcast_beta_bytes_per_ms": [c.beta for c in bc]}))
    return pd.concat(out, ignore_index=True)


def error_summary(g: pd.DataFrame) -> str:
    """The model's mean |error| per phase, beside the measurement's own interval (half-width, median over rows)."""
    parts = []
    for ph, e in g.groupby("phase", sort=False):
        ci = e.measured_ci_halfwidth_pp.dropna()
        inside = f", {int(e.within_measured_ci.sum())}/{len(ci)} inside it" if len(ci) else ""
        measured = f" (the measurement's interval: +/-{ci.median():.1f} points{inside})" if len(ci) else ""
        parts.append(f"{ph} {e.error_pct.abs().mean():.1f}% of latency, {e.reduction_error_pp.abs().mean():.1f} points "
                     f"of reduction{measured}")
    return "mean |error| " + "; ".join(parts)


def params_table(fits: dict, kappa: dict[str, float], n_rows: int) -> pd.DataFrame:
    rows = [{"parameter": "kappa", "phase": ph, "comm": "", "value": v, "unit": "1", "calibration_rows": n_rows}
            for ph, v in kappa.items()]
    for (comm, op), c in fits.items():
        rows += [{"parameter": f"{op}_alpha", "phase": "", "comm": comm, "value": c.alpha, "unit": "ms",
                  "calibration_rows": n_rows},
                 {"parameter": f"{op}_beta", "phase": "", "comm": comm, "value": c.beta, "unit": "bytes/ms",
                  "calibration_rows": n_rows}]
    return pd.DataFrame(rows)


# ---- CQIL x TP on N devices ---------------------------------------------------------------------
def layout_plan(n: int, P: int, start_fraction: float, end_margin: int, bypass: int = 0) -> Plan | None:
    """The stated group layout: groups of P from ceil(start_fraction n) (raised until the span is a multiple
    of P) up to n - end_margin (exclusive); None if no group fits."""
    end, start = n - end_margin, math.ceil(start_fraction * n)
    while (end - start) % P:
        start += 1
    return Plan.from_range(start, end, P, bypass, n) if end - start >= P else None


def hybrid(hcfg: dict, models: dict, hardware_of: Callable[[str], Hardware]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(best CQIL x TP against TP=N per model x hardware x shape x N, every candidate evaluated)."""
    bpp, B, ctx, lm_head = int(hcfg["bytes_per_param"]), int(hcfg["batch_size"]), int(hcfg["decode_context"]), hcfg["lm_head"]
    shapes = [("prefill", T) for T in hcfg["prefill_tokens"]] + [("decode", ctx)]
    best_rows, candidates = [], []
    for hw_name in hcfg["hardware"]:
        hw = hardware_of(hw_name)
        for name in hcfg["models"]:
            s = shape_of(models[name])
            plans = {int(P): layout_plan(s.layers, int(P), float(f), int(hcfg["end_margin"]))
                     for P, f in hcfg["layout"].items()}
            for phase, T in shapes:
                for N in hcfg["devices"]:
                    tp = tensor_parallel_row(s, hw, N, phase, T, B, bpp, ctx, lm_head)
                    key = {"model": name, "hardware": hw_name, "gpu": hw.name, "phase": phase, "prompt_tokens": T,
                           "batch_size": B, "devices": N}
                    rows = [{**key, "P": 1, "T": N, "ungrouped": "", "plan": "none (tensor parallel)", "plan_json": "",
                             "ideal_reduction": 0.0, **tp}]
                    for P, plan in plans.items():
                        for r in mesh_candidates(s, hw, plan, N, phase, T, B, bpp, ctx, lm_head,
                                                 tuple(hcfg["ungrouped"])) if plan else []:
                            rows.append({**key, **r, **plan_columns(plan), "ideal_reduction": plan.ideal_latency_reduction(s.layers)})
                    candidates += [{**r, "speedup_vs_tp": tp["latency_ms"] / r["latency_ms"]} for r in rows]
                    hyb = [r for r in rows[1:] if r["fits"]]
                    best = min(hyb, key=lambda r: r["latency_ms"]) if hyb else None
                    best_rows.append({
                        **key, "tp_latency_ms": tp["latency_ms"], "best_p": best and best["P"], "best_t": best and best["T"],
                        "plan": best["plan"] if best else "none fits", "ungrouped": best and best["ungrouped"],
                        "hybrid_latency_ms": best and best["latency_ms"],
                        "speedup_vs_tp": best and tp["latency_ms"] / best["latency_ms"],
                        "ideal_reduction": best and best["ideal_reduction"],
                        "weight_gb_per_gpu": best and best["weight_gb_per_gpu"],
                        "kv_cache_gb_per_gpu": best and best["kv_cache_gb_per_gpu"], "fits": bool(best),
                        "tp_weight_gb_per_gpu": tp["weight_gb_per_gpu"], "tp_kv_cache_gb_per_gpu": tp["kv_cache_gb_per_gpu"],
                        "tp_fits": tp["fits"], "tp_shardable": tp["shardable"], "tp_compute_ms": tp["compute_ms"], "tp_collectives_ms": tp["collectives_ms"],
                        "tp_collective_rounds": tp["collective_rounds"], "hybrid_compute_ms": best and best["compute_ms"],
                        "hybrid_collectives_ms": best and best["collectives_ms"],
                        "hybrid_collective_rounds": best and best["collective_rounds"], "memory_gb": hw.memory_gb,
                        "bytes_per_param": bpp, **{f.name: getattr(hw, f.name) for f in fields(Hardware) if f.name != "name"}})
    return pd.DataFrame(best_rows), pd.DataFrame(candidates)


# ---- external validation: published numbers no one here produced ----------------------------------
def tokens_per_s(s: Shape, hw: Hardware, N: int, setup: dict) -> float:
    """gpt-fast's figure: new_tokens / (prefill of the prompt + new_tokens - 1 decode steps) on TP over N
    (the decode steps read a KV cache of the prompt plus half the new tokens on average)."""
    prompt, new, B, bpp = (int(setup[k]) for k in ("prompt_tokens", "new_tokens", "batch_size", "bytes_per_param"))
    schedule = schedule_of(Plan(), s.layers, 1, N, Variant(lm_head=setup["lm_head"]))
    prefill = predict(schedule, gpu_costs(s, hw, "prefill", prompt, B, bpp, prompt), hw.kappa)
    step = predict(schedule, gpu_costs(s, hw, "decode", prompt, B, bpp, prompt + new // 2), hw.kappa)
    return 1e3 * new / (prefill + (new - 1) * step)


def external_table(ext: dict, models: dict, hw: Hardware, role: str | None = None) -> pd.DataFrame:
    """Published vs predicted for every row of ext['sources'] (of one role if given); `error` is the relative
    error of the latency (tokens/s: published / predicted - 1; a reduction: (1 - pred) / (1 - published) - 1)."""
    rows = []
    for source, spec in ext["sources"].items():
        setup, quantity = spec["setup"], spec["quantity"]
        for entry in spec["rows"]:
            if role is not None and entry["role"] != role:
                continue
            s = shape_of(models[entry["model"]])
            common = {"source": source, "model": entry["model"], "hardware": hw.name, "role": entry["role"],
                      "quantity": quantity, "cite": spec["cite"]}
            if quantity == "tokens_per_s":
                for N, published in entry["published"].items():
                    predicted = tokens_per_s(s, hw, int(N), setup)
                    rows.append({**common, "devices": int(N), "plan": "", "setup": spec["describe"].format(N=N),
                                 "published": float(published), "predicted": predicted,
                                 "error": float(published) / predicted - 1, "error_pp": np.nan})
            elif quantity == "latency_reduction":
                plan = Plan.from_dict(entry["plan"], s.layers)
                T, B, bpp = (int(setup[k]) for k in ("prompt_tokens", "batch_size", "bytes_per_param"))
                c = gpu_costs(s, hw, "prefill", T, B, bpp, T)
                schedule = schedule_of(plan, s.layers, plan.group_size, 1,
                                       Variant(lm_head=setup["lm_head"], ungrouped=setup["ungrouped"]))
                predicted, published = 1 - predict(schedule, c, hw.kappa) / original(s.layers, c), float(entry["published"])
                rows.append({**common, "devices": plan.group_size, "plan": plan.describe(),
                             "setup": spec["describe"].format(N=plan.group_size, plan=plan.describe()),
                             "published": published, "predicted": predicted,
                             "error": (1 - predicted) / (1 - published) - 1, "error_pp": 100 * (predicted - published)})
            else:
                raise CqilError(f"latency external source {source}: quantity {quantity!r} is not tokens_per_s or "
                                "latency_reduction")
    return pd.DataFrame(rows)


def least_squares(residuals: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Levenberg-Marquardt with a numerical Jacobian (a few parameters, a few rows)."""
    x, damping = np.asarray(x0, float), 1e-3
    r = residuals(x)
    for _ in range(iterations):
        h = 1e-6
        J = np.stack([(residuals(x + h * e) - r) / h for e in np.eye(len(x))], 1)
        A = J.T @ J
        step = np.linalg.solve(A + damping * np.diag(np.diag(A) + 1e-12), -J.T @ r)
        r_new = residuals(x + step)
        if r_new @ r_new < r @ r:
            x, r, damping = x + step, r_new, damping / 3
            if np.abs(step).max() < 1e-9:
                break
        else:
            damping *= 3
    return x


def fit_hardware(ext: dict, models: dict, hw: Hardware) -> Hardware:
    """`hw` with the figures named in ext['fit'] fitted (relative latency error, least squares) on the rows
    whose role is "fit"; the others stay as stated."""
    names = list(ext["fit"])
    unknown = [n for n in names if n not in {f.name for f in fields(Hardware)} - {"name"}]
    if unknown:
        raise CqilError(f"latency external.fit names {', '.join(unknown)}, which are not hardware figures")

    def residuals(x: np.ndarray) -> np.ndarray:
        return external_table(ext, models, replace(hw, **dict(zip(names, np.exp(x)))), "fit").error.to_numpy(float)

    x = least_squares(residuals, np.log([getattr(hw, n) for n in names]))  # logs: the figures stay positive
    return replace(hw, **{n: float(v) for n, v in zip(names, np.exp(x))})


def external_summary(table: pd.DataFrame, fitted: Hardware, stated: Hardware, names: list[str]) -> str:
    figures = ", ".join(f"{n} {getattr(stated, n):.3g} -> {getattr(fitted, n):.3g}" for n in names)
    lines = [f"external validation on {fitted.name}: " + (f"fitted on the rows marked fit ({figures})" if names else
                                                          "nothing fitted (the rows marked fit are predicted too)")]
    for (role, source), g in table.groupby(["role", "source"], sort=False):
        cells = ", ".join(f"{r.model} N={r.devices}{' ' + r.plan if r.plan else ''}: {r.published:.4g} vs {r.predicted:.4g} "
                          f"({100 * r.error:+.1f}%)" for r in g.itertuples())
        lines.append(f"  {role:8s} {source}: mean |error| of latency {100 * g.error.abs().mean():.1f}% ({cells})")
    held = table[table.role != "fit"]
    lines.append(f"  held out, all {len(held)} rows: mean |latency error| {100 * held.error.abs().mean():.1f}%")
    return "\n".join(lines)


# ---- the fixed cost of a layer step, measured (cqil.layerstep's table) ------------------------------
@dataclass(frozen=True)
class Measured:
    """Figures of one hardware file taken from a layer-step table (conf/latency.yaml layer_step)."""
    hardware: str                 # conf/hardware/<name>.yaml
    figures: dict[str, float]     # layer_overhead_s and/or bw_eff
    c0_us: float
    bandwidth_gbs: float
    source: str                   # the table, the mode and the rows fitted, for people


def measured_figures(spec: dict) -> Measured:
    """t = c0 + bytes / bandwidth fitted (fit_comm: least squares of the relative error, as cqil.layerstep fits
    its table) to the table's rows of spec['mode'] (and spec['shapes']): layer_overhead_s = c0, bw_eff = bandwidth
    / the hardware's mem_bw. CqilError where the fit is not a fixed cost and a bandwidth that hardware can have."""
    path, mode = spec["csv"], spec["mode"]
    df = read_csv(path)
    rows = df[(df["mode"] == mode) & (df["shape"].isin(spec["shapes"]) if spec["shapes"] else True)]
    name = spec["hardware"] if spec["hardware"] != "auto" else hardware_named(str(rows.gpu.iloc[0]), conf_dir())
    hw = hardware(name)
    c = fit_comm(rows["bytes"].to_numpy(float), rows.median_us.to_numpy(float))  # alpha in us, beta in bytes / us
    c0_s, bandwidth = c.alpha * 1e-6, c.beta * 1e6
    where = f"layer_step.csv={path}: t = c0 + bytes / bandwidth fitted to its {len(rows)} {mode} rows"
    if not (c0_s >= 0 and 0 < bandwidth < math.inf):
        raise CqilError(f"{where} gives c0 {c.alpha:.3g} us and bandwidth {bandwidth / 1e9:.3g} GB/s, not a fixed cost "
                        "and a bandwidth; measure again on an idle device (or fit fewer shapes: layer_step.shapes)")
    if bandwidth > hw.mem_bw:
        raise CqilError(f"{where} gives {bandwidth / 1e9:.0f} GB/s, above {hw.name}'s memory bandwidth "
                        f"({hw.mem_bw / 1e9:.0f} GB/s, conf/hardware/{name}.yaml); was it measured there? "
                        "set layer_step.hardware")
    figures = {"layer_overhead_s": c0_s, "bw_eff": bandwidth / hw.mem_bw}
    shapes = ", ".join(rows["shape"].unique())
    return Measured(name, {f: figures[f] for f in spec["figures"]}, c.alpha, bandwidth / 1e9,
                    f"{path} ({rows.gpu.iloc[0]}, {mode}, {shapes}: {len(rows)} rows)")


# ---- the job --------------------------------------------------------------------------------------
def hybrid_summary(best: pd.DataFrame) -> str:
    """One line per model x hardware x shape: TP=N and the best CQIL x TP for each N."""
    lines = ["CQIL x TP against tensor parallelism on the same N GPUs (batch 1; best fitting P x T within the layout):"]
    for (model, hw, phase, T), g in best.groupby(["model", "hardware", "phase", "prompt_tokens"], sort=False):
        cells = []
        for r in g.itertuples():
            if not r.fits:
                cells.append(f"N={r.devices}: TP {r.tp_latency_ms:.2f} ms, no hybrid fits")
                continue
            tp = ("TP cannot cut the heads" if not r.tp_shardable else
                  f"TP {r.tp_latency_ms:.2f}{'' if r.tp_fits else ' (does not fit)'}")
            cells.append(f"N={r.devices}: {tp} vs P{r.best_p:.0f}xT{r.best_t:.0f} {r.hybrid_latency_ms:.2f} ms"
                         + ("" if np.isnan(r.speedup_vs_tp) else f" ({r.speedup_vs_tp:.2f}x)"))
        shape = f"{phase} {'T' if phase == 'prefill' else 'ctx'}={T}"
        lines.append(f"  {model:12s} {hw:5s} {shape:16s} " + "; ".join(cells))
    return "\n".join(lines)


def run(cfg: DictConfig) -> None:
    """cqil latency: calibrate + validate on measured CPU runs (calibrate=[]: skipped), validate on published
    numbers (fitting the figures named in external.fit that a measured layer step, layer_step.csv, does not
    give), then the CQIL x TP projection with those figures."""
    ls = OmegaConf.to_container(cfg.layer_step, resolve=True)
    measured = measured_figures(ls) if ls["csv"] else None  # first: a table the fit refuses stops before any work
    if cfg.calibrate:  # every listed table must exist (cqil.checks); calibrate=[] skips this step
        cal, val = load_bench(list(cfg.calibrate)), load_bench(list(cfg.validate))
        fits, kappa = calibrate(cal)
        table = validate({"calibration": cal, "validation": val}, fits, kappa)
        prov = provenance("cpu")
        update_table("latency validation", table.assign(**prov), cfg.validation_out)
        update_table("latency parameters", params_table(fits, kappa, len(cqil_rows(cal))).assign(**prov), cfg.params_out)
        print(f"latency model fitted on {', '.join(cfg.calibrate)}: "
              + ", ".join(f"kappa[{ph}] = {k:.3f}" for ph, k in kappa.items()))
        for (comm, op), c in fits.items():
            print(f"  {op:9s} ({comm}): alpha {1e3 * c.alpha:.1f} us, beta {c.beta / 1e6:.3f} GB/s")
        slow = table.groupby("phase", sort=False).measured_member_slowdown.median()
        if slow.notna().all():
            print("  member slowdown measured directly (median over rows): "
                  + ", ".join(f"{ph} {v:.3f}" for ph, v in slow.items()))
        for (role, kind), g in table.groupby(["role", "kind"], sort=False):  # tp rows: never fitted
            print(f"  {role}, {kind} ({', '.join(g.plan.unique())}, {len(g)} rows): " + error_summary(g))
        print(f"-> {cfg.validation_out}\n-> {cfg.params_out}\n-> {latency_validation(table, cfg.validation_png)}")
    models = OmegaConf.to_container(cfg.models, resolve=True)
    ext = OmegaConf.to_container(cfg.external, resolve=True)
    stated = hardware(ext["hardware"])
    if measured is not None:  # measured > fitted to published numbers > stated
        print(f"measured layer step on {measured.hardware}: c0 {measured.c0_us:.1f} us, bandwidth "
              f"{measured.bandwidth_gbs:.0f} GB/s -> " + ", ".join(f"{n} {v:.3g}" for n, v in measured.figures.items())
              + f" (from {measured.source})")
        if measured.hardware == ext["hardware"]:
            stated = replace(stated, **measured.figures)
    to_fit = [n for n in ext["fit"] if measured is None or measured.hardware != ext["hardware"] or n not in measured.figures]
    fitted = fit_hardware({**ext, "fit": to_fit}, models, stated) if to_fit else stated
    table = external_table(ext, models, fitted)
    figures = {n: getattr(fitted, n) for n in ext["fit"]}
    used = {"layer_step_csv": cfg.layer_step.csv} if measured is not None else {}  # the table the figures came from
    update_table("latency external", table.assign(fitted=", ".join(to_fit), **figures, **used,
                                                  **provenance("published numbers")), cfg.external_out)
    print(external_summary(table, fitted, stated, to_fit))
    print(f"-> {cfg.external_out}")

    def hardware_of(name: str) -> Hardware:  # the fitted figures serve every GPU named in external.apply_to
        hw = replace(hardware(name), **figures) if name in ext["apply_to"] else hardware(name)
        return replace(hw, **measured.figures) if measured is not None and name == measured.hardware else hw

    best, candidates = hybrid(OmegaConf.to_container(cfg.hybrid, resolve=True), models, hardware_of)
    prov = provenance("roofline projection")
    if measured is not None:  # which rows carry the measured constant
        best, candidates = (t.assign(layer_step_csv=np.where(t.hardware == measured.hardware, cfg.layer_step.csv, ""))
                            for t in (best, candidates))
    update_table("latency hybrid", best.assign(**prov), cfg.hybrid_out)
    update_table("latency hybrid candidates", candidates.assign(**prov), cfg.hybrid_candidates_out)
    print(hybrid_summary(best))
    print(f"-> {cfg.hybrid_out}\n-> {cfg.hybrid_candidates_out}\n-> {latency_hybrid(best, cfg.hybrid_png)}")
