"""`cqil bench`: latency of CQIL on P devices against honest baselines, side by side in one run.

Setups, for every (prompt length T, batch size B), each with its own rank-local weights (cqil.runtime
reads from the checkpoint only what each rank runs; `build_setups`):
  (a) original, 1 device       the original model, one process (CPU: 1 thread)
  (b) cqil (...)               the plan on a devices x tp mesh (cqil.runtime; CPU: 1 thread per rank),
                               once per runtime variant in `cqil` (communicator, LM head, where the
                               layers outside groups run); tp > 1: CQIL x TP
  (c) tensor parallel TP=N     the original model tensor parallel over the same N = devices x tp ranks,
                               once per variant in `tensor_parallel` (same LM head treatments as CQIL)
      original, N threads      CPU: one process with the threads of all N ranks
Every setup runs eagerly and, as a twin (same weights, communicators and static KV cache), compiled in each mode
of `compile` (cqil.runtime: each rank's whole step under torch.compile; auto = CUDA graphs on GPUs), in the same
rounds; the N-thread CPU baseline stays eager. `ungrouped: auto` takes the layout the latency model (cqil.costs)
ranks fastest for the mesh, printed with its ranking against TP on the same devices.
Memory columns: model_weight_mb (all parameters), rank_weight_mb_max / _min (the largest / smallest
rank's materialized parameters + buffers in that setup), rank_peak_rss_mb_max and on CUDA
rank_peak_gpu_mb_max (the largest rank's whole bench process: all the setups it holds at once, plus
activations); mesh_p, mesh_t: the setup's mesh.

Protocol. A run is the prefill of the prompt (time to first token, TTFT, includes choosing that
token) followed by `new_tokens` greedy decode steps (time per output token, TPOT). A round runs
every setup once, back to back (the order rotates from round to round), so slow drift of the
machine hits all setups of a round alike. A round's figure is its TTFT, and for decode the median
of its steps. Warm-up rounds run until two successive rounds take the same time (within
`warmup_tol`, at most `warmup_max` rounds); then timed rounds run, `repeats` of them or, with
`repeats: auto`, until the 95% interval of the headline reduction is narrower than
`stop.ci_width` in both phases or the time budget `stop.budget_s` runs out (the CSV says which).
Reported per setup: the median over rounds (and p90: over rounds for TTFT, over all steps for TPOT);
the latency reduction against (a) as the median over rounds of the PAIRED reduction
1 - setup/(a) of the same round, with a bootstrap interval resampling rounds; for CQIL its
fraction of the plan's ideal reduction g*(P-1)/n. A compiled setup is paired against (a) compiled in
the same mode (`baseline`), and against itself eager (`compile_reduction`); its first run at each shape,
which compiles it, runs before the shape's warm-up and outside the time budget (`compile_s`, `graphs`).
Each rank (and the one-process baselines) is pinned to its own cores where the platform allows (`pin`;
recorded in the CSV). While rank 0 times
(a) and the threads baseline alone, the other ranks wait. Prompts are real text (the data set's evaluation split).

Profiles, from `profile_runs` extra runs per eager setup after the timed rounds (medians; cqil.latency's inputs):
layer_ms / head_ms / rest_ms, where a run of (a) spends its time (timers around every decoder layer,
the head + argmax, and the rest); for every multi-process setup, rank0_*_ms, where rank 0 spends its
time (layers outside groups, its group members, inside collectives including waiting, head, rest), and
allreduce_ms / broadcast_ms, one collective of a [B, T, H] hidden state (decode: [B, 1, H]) over all ranks.

Failure: the bench's own waits (barriers, rank 0's decisions) go through the launcher's key-value
store and are bounded: a peer that shows no sign of life for `timeout_s` (dead, or stopped) ends
the run with its rank named; a live peer that is busy alone (rank 0 timing the baselines, a slow
model load) is waited for up to `solo_timeout_s`. Collectives inside the runtime time out after
`timeout_s` (cqil.runtime).

`cqil bench devices=P` runs itself on P processes as `torchrun --standalone --nproc_per_node P -m cqil
bench ...` would (cqil.runtime.launch: Ctrl-C ends every rank; a failing rank's line is the last one);
starting that torchrun line directly works the same.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch._dynamo.utils import counters
from tqdm import tqdm

from . import CqilError, costs, data, models
from .checks import check_keys
from .config import data_config, model_config, plan_config
from .plan import Plan
from .control import Control
from .planning import resolve_plan
from .plots import bench_latency
from .results import BENCH_BASELINE as ORIGINAL, plan_columns, provenance, update_table
from .runtime import Runtime, compile_mode, init_distributed, launch, make_mesh, shutdown, under_torchrun
from .schedule import Variant


def run(cfg: DictConfig) -> None:
    """Outside torchrun: launch it with this command's overrides. Inside: be one rank of the bench."""
    if under_torchrun():
        try:
            return worker(cfg)
        finally:
            shutdown()
    world = cfg.devices * cfg.tp
    check_protocol(cfg)
    if cfg.devices < 2:
        raise CqilError(f"devices={cfg.devices}: CQIL needs at least 2 devices to run group members concurrently")
    plan_cfg = plan_config(cfg.plan)
    if plan_cfg.mode != "auto":  # a given plan can be checked before starting processes
        check_devices(plan_cfg.given(None), cfg.devices)
    if not str(cfg.model.device).startswith("cuda") and world * cfg.threads_per_rank > (os.cpu_count() or 1):
        print(f"warning: {world} ranks x {cfg.threads_per_rank} threads on {os.cpu_count()} CPUs: ranks share cores, "
              "so the timings say little (fine for checking that it runs)", file=sys.stderr)
    launch("bench", world, cfg.threads_per_rank)  # a failing rank's own line is the last one (cqil.runtime.launch)


def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz  # user nice system irq softirq; steal


def other_load(start: tuple, ours_s: float) -> dict:
    """Share of the machine's CPU that other processes (and the hypervisor: steal) took meanwhile.

    Honest timing needs a quiet machine; these columns say whether it was (start = (wall,
    machine_cpu_s(), process_time) when the shape began; ours_s = CPU seconds of all ranks since).
    """
    now = machine_cpu_s()
    if start[1] is None or now is None:
        return {"other_cpu_load": float("nan"), "steal": float("nan")}
    capacity = (time.perf_counter() - start[0]) * os.cpu_count()
    return {"other_cpu_load": max(0.0, (now[0] - start[1][0] - ours_s) / capacity),
            "steal": (now[1] - start[1][1]) / capacity}


def check_devices(plan: Plan, devices: int) -> None:
    """A bench plan has groups, of `devices` layers (member k of every group runs on device k)."""
    if not plan.groups:
        raise CqilError("the plan has no groups, so nothing runs concurrently; give one (plan=manual, plan=file)")
    if plan.group_size != devices:
        raise CqilError(f"the plan {plan.describe()} has groups of {plan.group_size} layers but devices={devices}; "
                        f"run it with devices={plan.group_size}")


def device_sync(device: torch.device):
    """What to call before reading the clock: CUDA runs asynchronously, the CPU does not."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---- statistics of paired rounds (pure functions) ---------------------------------------------
def paired_reductions(base_ms, setup_ms) -> np.ndarray:
    """Per round: 1 - setup / baseline of the same round (both sequences in round order)."""
    base, setup = np.asarray(base_ms, float), np.asarray(setup_ms, float)
    if base.shape != setup.shape:
        raise ValueError(f"paired rounds need as many baseline rounds as setup rounds ({base.shape} vs {setup.shape})")
    return 1 - setup / base


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median: resample the values (rounds) with replacement.

    Deterministic (fixed seed), so the same rounds always give the same interval; NaN below 2 values."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float("nan"), float("nan")
    medians = np.median(v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def reduction_stats(base_ms, setup_ms, level: float = 0.95, resamples: int = 2000) -> dict:
    """Median of the paired per-round reductions and its bootstrap interval."""
    r = paired_reductions(base_ms, setup_ms)
    lo, hi = bootstrap_ci(r, level, resamples)
    return {"reduction": float(np.median(r)), "reduction_ci_low": lo, "reduction_ci_high": hi, "rounds": len(r)}


def warmed_up(round_ms: list[float], tol: float) -> bool:
    """Warm-up is over when the last round took the same time as the one before, within `tol` (relative)."""
    return len(round_ms) >= 2 and abs(round_ms[-1] / round_ms[-2] - 1) <= tol


def warmup_reason(round_ms: list[float], warmup: int | str, warmup_max: int, tol: float, elapsed_s: float,
                  share_s: float) -> str | None:
    """Why warm-up ends after these rounds, or None for another: a fixed count ("fixed"); auto: two
    rounds alike ("stable"), `warmup_max` rounds ("max"), or a quarter of the shape's time share gone ("budget")."""
    if warmup != "auto":
        return "fixed" if len(round_ms) >= int(warmup) else None
    if warmed_up(round_ms, tol):
        return "stable"
    if len(round_ms) >= warmup_max:
        return "max"
    return "budget" if len(round_ms) >= 2 and elapsed_s > share_s / 4 else None


def stop_reason(rounds: int, repeats: int | str, widths: list[float], elapsed_s: float, round_s: float,
                share_s: float, stop: dict) -> str | None:
    """Why the timed rounds of one shape end now, or None to add another round.

    Fixed `repeats`: after that many rounds ("repeats"). `repeats="auto"`: once `stop['min_rounds']`
    rounds are in, when every headline interval is narrower than `stop['ci_width']` ("ci"), when one
    more round (and the profiles after the rounds, about `profile_rounds` rounds long) would overrun
    this shape's share of the time budget ("budget"), or at `stop['max_rounds']` ("max_rounds")."""
    if repeats != "auto":
        return "repeats" if rounds >= int(repeats) else None
    if rounds < stop["min_rounds"]:
        return None
    if widths and all(w <= stop["ci_width"] for w in widths):
        return "ci"
    if elapsed_s + round_s * (1 + stop.get("profile_rounds", 0)) > share_s:
        return "budget"
    return "max_rounds" if rounds >= stop["max_rounds"] else None


def round_figures(runs: list[tuple[float, list[float]]]) -> dict[str, np.ndarray]:
    """A setup's figure in each round: its TTFT (prefill) and the median of its decode steps (decode)."""
    return {"prefill": np.array([ttft for ttft, _ in runs], float),
            "decode": np.array([np.median(steps) for _, steps in runs], float)}


def headline_widths(rounds: list[dict], headline: str, level: float, resamples: int) -> list[float]:
    """Width of the interval of the headline setup's paired reduction, per phase (the stopping rule's input)."""
    base, head = round_figures([r[ORIGINAL] for r in rounds]), round_figures([r[headline] for r in rounds])
    widths = []
    for phase in base:
        s = reduction_stats(base[phase], head[phase], level, resamples)
        widths.append(s["reduction_ci_high"] - s["reduction_ci_low"])
    return widths


PROTOCOL = ("repeats", "warmup", "new_tokens", "confidence", "stop.min_rounds", "stop.max_rounds")


def check_protocol(cfg: DictConfig) -> None:
    """The timing protocol's keys, checked (by cqil.checks' table) before any process waits on another."""
    check_keys("bench", cfg, PROTOCOL)


# ---- pinning ------------------------------------------------------------------------------
def core_plan(pin: str | bool, threads_per_rank: int, local_rank: int, local_world: int,
              allowed: list[int] | None) -> tuple[list[int] | None, list[int] | None, str]:
    """(this rank's cores, the cores of the one-process P-thread baseline on local rank 0, description).

    Local rank r gets `threads_per_rank` cores of its own (the r-th slice of the cores this host
    allows); the P-thread baseline gets the slices of all local ranks. `pin`: true (required),
    false, or "auto" (where the platform allows: sched_setaffinity exists and there are enough cores)."""
    if pin not in (True, False, "auto"):
        raise CqilError(f"bench pin={pin!r}: use true, false or auto")
    need = threads_per_rank * local_world
    why = ("pinning off (pin=false)" if pin is False else
           "os.sched_setaffinity is not available on this platform" if allowed is None else
           f"{need} cores needed ({local_world} ranks x {threads_per_rank} threads), {len(allowed)} allowed"
           if len(allowed) < need else None)
    if why:
        if pin is True:
            raise CqilError(f"bench pin=true: cannot pin: {why}; use pin=auto or pin=false")
        return None, None, f"none ({why})"
    cores = sorted(allowed)
    mine = cores[local_rank * threads_per_rank:(local_rank + 1) * threads_per_rank]
    slices = "; ".join(f"rank {r}: cpu {','.join(map(str, cores[r * threads_per_rank:(r + 1) * threads_per_rank]))}"
                       for r in range(local_world))
    return mine, cores[:need], f"{slices}; baselines on rank 0's cores, (c) on all {need}"


def pin(cores: list[int]) -> None:
    """Restrict every thread of this process (OpenMP workers, gloo threads) to `cores`; new threads inherit it."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def timed_run(rt: Runtime, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """One run: TTFT (prefill + first token) and the time of each of `new_tokens` decode steps, in ms."""
    sync = device_sync(ids.device)
    start = time.perf_counter()
    token, state = rt.prefill(ids, max_new_tokens=new_tokens + 1)
    sync()
    ttft = (time.perf_counter() - start) * 1e3
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token, state = rt.decode(token, state)
        sync()
        steps.append((time.perf_counter() - t0) * 1e3)
    return ttft, steps


# ---- one rank of the bench, step by step --------------------------------------------------------------
@dataclass
class Rank:
    """This rank's part in the bench: what every step below reads (its config, setups, waits and cores)."""
    cfg: DictConfig
    built: "Setups"
    control: Control
    device: torch.device
    device_type: str
    world: int
    lead: bool                    # rank 0: times the one-process baselines alone and writes the results
    cores: list[int] | None       # this rank's cores (None: not pinned)
    all_cores: list[int] | None   # the cores of the N-thread baseline
    pinning: str                  # the CSV's description of the pinning

    def solo(self, fn: Callable[[], None]) -> None:
        """Rank 0 runs fn alone; the other ranks wait for it (a busy peer: up to solo_timeout_s)."""
        if self.lead:
            fn()
        self.control.barrier("rank 0's one-process section", busy=not self.lead)


@dataclass
class ShapeResult:
    """What the bench measured at one shape (T, B): rank 0's timed rounds ({setup: (TTFT, decode steps)} each),
    how the warm-up and the rounds ended, the other processes' load meanwhile, the latency model's inputs, and
    the first (compiling) run of every compiled setup."""
    rounds: list[dict[str, tuple[float, list[float]]]]
    warmup: int
    warmup_ended_by: str
    stopped_by: str
    load: dict                            # rank 0's measurement ({} elsewhere)
    parts: dict[tuple[str, str], dict]    # (setup, phase) -> the latency model's inputs
    compiling: dict[str, dict]            # compiled setup -> {compile_s, graphs}


def worker(cfg: DictConfig) -> None:
    """One rank of the bench (all ranks run this; rank 0 also times the baselines and writes results): start
    the rank and build the setups, measure every shape within the time budget, write the table."""
    rank = start_rank(cfg)
    if rank.lead:
        print(rank.built.layouts, flush=True)
    rank.control.barrier("the start (ranks load at their own speed)", busy=True)
    headline = cfg.stop.headline or next(iter(rank.built.runtimes))  # the first cqil setup, eager
    if headline not in rank.built.runtimes:
        raise CqilError(f"bench stop.headline={headline!r} is not one of the setups: {', '.join(rank.built.runtimes)}")
    grid = [(t, b) for t in cfg.prompt_tokens for b in cfg.batch_sizes]
    shapes: dict[tuple[int, int], ShapeResult] = {}
    budget_start = time.perf_counter()  # the time budget's clock; compiling does not count
    for j, (t, b) in enumerate(tqdm(grid, desc="bench", unit="shape", disable=not rank.lead)):
        ids = rank.built.prompts[:b, :t]
        c0 = time.perf_counter()
        compiling = compile_shape(rank, ids)  # outside the time budget: compile cost is reported, not timed
        budget_start += time.perf_counter() - c0
        if rank.lead and compiling:
            print(f"T={t} B={b} compiled: " + ", ".join(f"{name} {c['compile_s']:.1f} s ({c['graphs']} graphs)"
                                                       for name, c in compiling.items()), flush=True)
        shapes[t, b] = measure_shape(rank, ids, budget_start, len(grid) - j, headline, compiling)
    memory = peak_memory(rank.device, rank.control)
    rank.control.close()
    if rank.lead:
        write_results(rank, shapes, memory)


def start_rank(cfg: DictConfig) -> Rank:
    """Join the job, pin this rank to its cores (before any thread starts: every thread inherits the pinning;
    the N-thread baseline widens it), and build every setup with its rank-local weights."""
    device_type = "cuda" if str(cfg.model.device).startswith("cuda") else "cpu"
    check_protocol(cfg)
    device = init_distributed(cfg.devices, cfg.tp, device_type, cfg.startup_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    cores, all_cores, pinning = core_plan(cfg.pin, cfg.threads_per_rank, int(os.environ.get("LOCAL_RANK", rank)),
                                          int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                          sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else None)
    if cores:
        pin(cores)
    torch.set_num_threads(cfg.threads_per_rank)
    control = Control(cfg.timeout_s, cfg.solo_timeout_s)
    built = build_setups(cfg, device, control)
    return Rank(cfg, built, control, device, device_type, world, rank == 0, cores, all_cores, pinning)


def compile_shape(rank: Rank, ids: torch.Tensor) -> dict[str, dict]:
    """The first run of every compiled setup at this shape, untimed by the rounds: it compiles the prefill and
    decode graphs. {setup: {compile_s: its seconds (compile included), graphs: graphs dynamo made}}."""
    first = {}

    def run(name: str, rt: Runtime) -> None:
        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        timed_run(rt, ids, rank.cfg.new_tokens)
        first[name] = {"compile_s": time.perf_counter() - start, "graphs": counters["stats"]["unique_graphs"] - graphs}

    rank.solo(lambda: [run(name, rt) for name, rt in rank.built.originals.items() if rt.mode != "none"])
    for name, rt in rank.built.runtimes.items():
        if rt.mode != "none":
            rank.control.barrier(f"the start of compiling {name}", busy=True)
            run(name, rt)
    return first


def measure_shape(rank: Rank, ids: torch.Tensor, budget_start: float, shapes_left: int, headline: str,
                  compiling: dict[str, dict]) -> ShapeResult:
    """One shape, top to bottom: warm-up, timed rounds until the stopping rule, the load meanwhile, profiles.
    The shape gets an even share of what is left of the time budget."""
    start = (time.perf_counter(), machine_cpu_s(), time.process_time())
    share = (rank.cfg.stop.budget_s - (start[0] - budget_start)) / shapes_left
    warm, warmed = warm_up(rank, ids, start[0], share)
    rounds, stopped_by = timed_rounds(rank, ids, len(warm), start[0], share, headline)
    ours = rank.control.gather(str(time.process_time() - start[2]), "the load measurement")
    load = other_load(start, sum(map(float, ours))) if rank.lead else {}
    return ShapeResult(rounds, len(warm), warmed, stopped_by, load, profile_shape(rank, ids), compiling)


def warm_up(rank: Rank, ids: torch.Tensor, start_s: float, share_s: float) -> tuple[list[float], str]:
    """Untimed rounds until warmup_reason ends them (rank 0 decides for every rank): rank 0's time of each round
    (all its setups' runs), and why the warm-up ended."""
    cfg, warm = rank.cfg, []
    warmed = warmup_reason(warm, cfg.warmup, cfg.warmup_max, cfg.warmup_tol, 0.0, share_s)  # warmup=0: none
    while not warmed:
        warm.append(sum(ttft + sum(steps) for ttft, steps in one_round(rank, ids, len(warm)).values()))
        mine = warmup_reason(warm, cfg.warmup, cfg.warmup_max, cfg.warmup_tol, time.perf_counter() - start_s,
                             share_s) if rank.lead else None
        warmed = rank.control.decide(mine or "", "the end of a warm-up round")
    return warm, warmed


def timed_rounds(rank: Rank, ids: torch.Tensor, first: int, start_s: float, share_s: float,
                 headline: str) -> tuple[list[dict], str]:
    """Timed rounds until stop_reason ends them (rank 0 decides for every rank): the rounds, and why they ended.
    `first` continues the rotation of the setups' order from the warm-up."""
    cfg, rounds = rank.cfg, []
    stop = {**OmegaConf.to_object(cfg.stop), "profile_rounds": cfg.profile_runs}
    while True:
        r0 = time.perf_counter()
        rounds.append(one_round(rank, ids, first + len(rounds)))
        reason = None
        if rank.lead:
            widths = headline_widths(rounds, headline, cfg.confidence, cfg.bootstrap_resamples) \
                if cfg.repeats == "auto" else []
            now = time.perf_counter()
            reason = stop_reason(len(rounds), cfg.repeats, widths, now - start_s, now - r0, share_s, stop)
        reason = rank.control.decide(reason or "", "the end of a timed round")
        if reason:
            return rounds, reason


def one_round(rank: Rank, ids: torch.Tensor, i: int) -> dict[str, tuple[float, list[float]]]:
    """Every setup once, back to back, the order rotated by i: {setup: (TTFT, decode steps)} (rank 0's clock)."""
    out = {}
    slots = [None, *rank.built.runtimes]  # None: the one-process baselines
    for name in slots[i % len(slots):] + slots[:i % len(slots)]:
        if name is None:
            rank.solo(lambda: out.update(time_baselines(rank, ids)))
        else:
            rank.control.barrier(f"the start of a run of {name}")  # every rank starts the run together
            out[name] = timed_run(rank.built.runtimes[name], ids, rank.cfg.new_tokens)
    return out


def time_baselines(rank: Rank, ids: torch.Tensor) -> dict[str, tuple[float, list[float]]]:
    """One run of each one-process baseline (rank 0 alone): (a), eager and compiled, and on a CPU (c), the
    original with the threads and cores of all ranks. (c) runs eager only: inductor's CPU kernels take their
    thread count when they are compiled, so a compiled twin would run the 1-thread graphs of (a)."""
    cfg, out = rank.cfg, {}
    for name, rt in rank.built.originals.items():
        out[name] = timed_run(rt, ids, cfg.new_tokens)
    if rank.device_type == "cpu":
        torch.set_num_threads(rank.world * cfg.threads_per_rank)
        if rank.all_cores:
            pin(rank.all_cores)
        out[threads_setup(rank.world)] = timed_run(rank.built.originals[ORIGINAL], ids, cfg.new_tokens)
        if rank.cores:
            pin(rank.cores)
        torch.set_num_threads(cfg.threads_per_rank)
    return out


def profile_shape(rank: Rank, ids: torch.Tensor) -> dict[tuple[str, str], dict]:
    """The latency model's inputs at this shape, by (setup, phase): (a)'s parts (rank 0 alone), and for each
    eager multi-process setup member 0's profile and its collectives alone."""
    cfg, built, (b, t) = rank.cfg, rank.built, ids.shape
    parts: dict[tuple[str, str], dict] = {}

    def profile_original() -> None:
        n = built.config.num_hidden_layers
        for phase, v in profile(built.originals[ORIGINAL], ids, cfg.new_tokens, cfg.profile_runs).items():
            parts[ORIGINAL, phase] = {"layer_ms": v["ungrouped"] / n, "head_ms": v["head"], "rest_ms": v["rest"]}

    rank.solo(profile_original)
    for name, rt in built.runtimes.items():
        if rt.mode != "none":  # timers between the stages of a compiled graph would break it apart
            continue
        rank.control.barrier(f"the start of a profile of {name}")
        prof = profile(rt, ids, cfg.new_tokens, cfg.profile_runs)
        comm = comm_times(rt.comm, b, t, built.config.hidden_size, built.dtype, rank.device) if rt.comm else {}
        for phase in prof:
            parts[name, phase] = {**{f"rank0_{k}_ms": v for k, v in prof[phase].items()}, **comm.get(phase, {})}
    return parts


def write_results(rank: Rank, shapes: dict[tuple[int, int], ShapeResult], memory: dict) -> None:
    """Rank 0: the table (one row per setup, phase and shape), its summary and its figure."""
    cfg, built = rank.cfg, rank.built
    names = [*built.originals, *([threads_setup(rank.world)] if rank.device_type == "cpu" else []), *built.runtimes]
    table = results_table(shapes, names, rank.pinning, cfg, built, memory, rank.device_type)
    out = cfg.out or f"results/bench/latency_{cfg.model.name}_{built.plan.tag()}.csv"
    figure = cfg.figure or f"results/figures/bench_latency_{cfg.model.name}_{built.plan.tag()}.png"
    update_table("bench", table, out)
    print(summary(table))
    print(f"-> {out}\n-> {bench_latency(table, figure)}")


MB = 2 ** 20  # the *_mb columns are MiB


@dataclass
class Setups:
    """What the bench times: (a) (built on rank 0 only, else None), the multi-process setups by name, and
    every setup's CSV columns (runtime options, compile mode, mesh, memory). A compiled setup is a twin of its
    eager setup (`eager_of`: the same weights, communicators and caches; cqil.runtime.Runtime.compiled)."""
    originals: dict[str, Runtime]   # rank 0: (a) eager and compiled; elsewhere empty
    runtimes: dict[str, Runtime]
    columns: dict[str, dict]
    eager_of: dict[str, str]        # compiled setup -> its eager twin
    plan: Plan
    config: object
    dtype: torch.dtype
    prompts: torch.Tensor
    layouts: str                    # the latency model's ranking of the layouts (what `ungrouped: auto` chose)


def bench_plan(cfg: DictConfig, config, tokenizer, data_cfg: data.DataConfig, control: Control) -> Plan:
    """The plan, resolved once: given plans directly; plan=auto on rank 0 (it scores candidates on the
    whole model, loaded there alone) and broadcast to the other ranks."""
    plan_cfg = plan_config(cfg.plan)
    if plan_cfg.mode != "auto":
        return plan_cfg.given(config.num_hidden_layers)
    chosen = None
    if dist.get_rank() == 0:
        model, _ = models.load(replace(model_config(cfg.model), device="cpu"))
        chosen = json.dumps(resolve_plan(plan_cfg, model, tokenizer, data_cfg).to_dict())
        del model
    return Plan.from_dict(json.loads(control.decide(chosen, "rank 0 choosing plan=auto", busy=True)),
                          config.num_hidden_layers)


def _variant(options) -> Variant:
    v = dict(options)
    if set(v) - {"comm", "lm_head", "ungrouped"}:
        raise CqilError(f"bench setup {v} has unknown keys; use comm, lm_head, ungrouped")
    return Variant(**v)


def compiled_name(name: str, mode: str) -> str:
    """The setup name of `name` run in compile `mode` (eager: the name itself)."""
    return name if mode == "none" else f"{name}, compiled ({mode})"


def cqil_variants(cfg: DictConfig, config, plan: Plan, device: torch.device,
                  dtype: torch.dtype) -> tuple[list[tuple[Variant, str]], str]:
    """The CQIL setups' variants ([(variant, how its layout was chosen)]) and the latency model's ranking line:
    `ungrouped: auto` takes the layout the model (cqil.costs) ranks fastest for this mesh (a decode step at
    batch 1 with the run's longest cache); a layout this model cannot be cut for on the mesh is left out (said
    in the log); setups that come out alike run once."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    hw = costs.hardware(costs.hardware_for(name))
    context = max(cfg.prompt_tokens) + cfg.new_tokens
    out: list[tuple[Variant, str]] = []
    lines = []
    for options in cfg.cqil:
        v = dict(options)
        ranked = costs.rank_layouts(config, plan, cfg.devices, cfg.tp, hw, v.get("lm_head", "sharded"), 1, context,
                                    dtype.itemsize)
        lines.append(costs.describe_layouts(ranked, hw, cfg.devices, cfg.tp) + f" [head {v.get('lm_head', 'sharded')}]")
        how = "given"
        if v.get("ungrouped", "replicated") == "auto":
            v["ungrouped"], how = ranked[0]["ungrouped"], "latency model"
        if v.get("ungrouped", "replicated") not in {r["ungrouped"] for r in ranked}:
            lines.append(f"  setup {dict(options)} left out: the model's heads cannot be cut over the "
                         f"{cfg.devices * cfg.tp} ranks of ungrouped {v['ungrouped']}")
            continue
        variant = Variant(**v)
        if variant not in [w for w, _ in out]:
            out.append((variant, how))
    return out, "\n".join(dict.fromkeys(lines))


def build_setups(cfg: DictConfig, device: torch.device, control: Control) -> Setups:
    """Every setup with its own rank-local weights, read from the checkpoint (nothing shared between
    setups, nothing re-sharded): (a) the original on rank 0 alone; CQIL on the devices x tp mesh once per
    variant in `cqil`; tensor parallelism over all ranks once per variant in `tensor_parallel`; each also
    compiled in every mode of `compile` (a twin: no second copy of the weights).
    All ranks call this together."""
    model_cfg = model_config(cfg.model)
    path, dtype, trust = model_cfg.path, models.dtype_of(model_cfg.dtype), model_cfg.trust_remote_code
    config, tokenizer = models.load_config(path, trust), models.load_tokenizer(path, trust)
    data_cfg = data_config(cfg.data)
    plan = bench_plan(cfg, config, tokenizer, data_cfg, control)
    check_devices(plan, cfg.devices)
    if max(cfg.prompt_tokens) > data_cfg.block_size:
        raise CqilError(f"prompt_tokens up to {max(cfg.prompt_tokens)} exceed data.block_size={data_cfg.block_size}")
    prompts = data.token_blocks(data_cfg, tokenizer, "evaluation", max(cfg.batch_sizes) * data_cfg.block_size)
    world = dist.get_world_size()
    modes = list(dict.fromkeys(["none", *(compile_mode(m, device.type) for m in cfg.compile)]))  # eager always
    runtimes: dict[str, Runtime] = {}
    columns: dict[str, dict] = {}
    eager_of: dict[str, str] = {}

    def memory(rt: Runtime) -> dict:
        sizes = control.gather(str(rt.weight_bytes()), "the weight accounting")  # on rank 0 (the CSV's), else None
        return {"mesh_p": rt.schedule.P, "mesh_t": rt.schedule.T, "model_weight_mb": rt.model_bytes / MB,
                **({"rank_weight_mb_max": max(map(int, sizes)) / MB, "rank_weight_mb_min": min(map(int, sizes)) / MB}
                   if sizes else {})}

    def add(into: dict[str, Runtime], name: str, rt: Runtime, cols: dict) -> None:
        """The setup eager and compiled in every mode of `compile`."""
        for mode in modes:
            twin = compiled_name(name, mode)
            into[twin] = rt if mode == "none" else rt.compiled(mode)
            columns[twin] = {**cols, "compile": mode}
            eager_of[twin] = name

    variants, layouts = cqil_variants(cfg, config, plan, device, dtype)
    cqil_mesh = make_mesh(cfg.devices, cfg.tp, device, cfg.timeout_s)
    for v, how in variants:
        rt = Runtime(path, plan, cqil_mesh, v, dtype, timeout_s=cfg.timeout_s, trust_remote_code=trust,
                     startup_timeout_s=cfg.startup_timeout_s)
        name = f"cqil ({rt.comm.name}, head {v.lm_head}, ungrouped {v.ungrouped})" + (f" x TP{cfg.tp}" if cfg.tp > 1 else "")
        add(runtimes, name, rt, {"comm": rt.comm.name, "lm_head": v.lm_head, "ungrouped": v.ungrouped,
                                 "ungrouped_by": how, **memory(rt)})
    tp_mesh = make_mesh(1, world, device, cfg.timeout_s)
    for options in cfg.tensor_parallel:
        v = _variant(options)
        rt = Runtime(path, Plan(), tp_mesh, v, dtype, timeout_s=cfg.timeout_s, trust_remote_code=trust,
                     startup_timeout_s=cfg.startup_timeout_s)
        name = f"tensor parallel TP={world} ({rt.comm.name}, head {v.lm_head})"
        add(runtimes, name, rt, {"comm": rt.comm.name, "lm_head": v.lm_head, **memory(rt)})
    originals: dict[str, Runtime] = {}
    if dist.get_rank() == 0:  # (a) and the threads baseline: the whole model, rank 0 alone
        original = Runtime(path, Plan(), None, Variant(), dtype, device, trust_remote_code=trust)
        whole = {"mesh_p": 1, "mesh_t": 1, "model_weight_mb": original.model_bytes / MB,
                 "rank_weight_mb_max": original.weight_bytes() / MB, "rank_weight_mb_min": original.weight_bytes() / MB}
        add(originals, ORIGINAL, original, whole)
        columns[threads_setup(world)] = {**whole, "compile": "none"}  # eager only: see time_baselines()
    return Setups(originals, runtimes, columns, eager_of, plan, config, dtype, prompts.to(device), layouts)


def threads_setup(world: int) -> str:
    """The name of the CPU baseline: the original in one process with the threads of all ranks."""
    return f"original, {world} threads"


def peak_memory(device: torch.device, control: Control) -> dict:
    """Peak RSS (on CUDA also peak GPU memory) of the largest rank's bench process, MiB: every setup that
    process holds together, plus activations. All ranks call this together."""
    mine = {"rank_peak_rss_mb_max": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB}  # Linux: KiB
    if device.type == "cuda":
        mine["rank_peak_gpu_mb_max"] = torch.cuda.max_memory_allocated(device) / MB
    everyone = control.gather(json.dumps(mine), "the peak memory")  # on rank 0 (the CSV's), else None
    return {k: max(json.loads(e)[k] for e in everyone) for k in mine} if everyone else {}


def profile(rt: Runtime, ids: torch.Tensor, new_tokens: int, runs: int) -> dict[str, dict[str, float]]:
    """profile_run's parts, each the median over `runs` runs (one run is as noisy as one timing)."""
    out = [profile_run(rt, ids, new_tokens) for _ in range(runs)]
    return {phase: {k: float(np.median([o[phase][k] for o in out])) for k in out[0][phase]} for phase in out[0]}


def profile_run(rt: Runtime, ids: torch.Tensor, new_tokens: int) -> dict[str, dict[str, float]]:
    """Where one run of `rt` spends its time on this rank, per phase, in ms (decode: per step).

    Exclusive times: `ungrouped` (layers outside groups), `group` (this rank's member of every group,
    its collectives excluded), `collective` (inside the member-axis collectives, waiting for the
    other ranks included), `head` (LM head + argmax), `rest` (embedding, mask, norm, Python).
    Every rank of a multi-rank runtime calls this together.
    """
    sync = device_sync(ids.device)
    acc: dict[str, float] = {}
    children: list[float] = []  # time of the timed regions inside each open region

    def timed(kind: str, fn):
        def wrapper(*args, **kwargs):
            sync()
            children.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                dt = time.perf_counter() - t0
                acc[kind] = acc.get(kind, 0.0) + dt - children.pop()
                if children:
                    children[-1] += dt
        return wrapper

    def kind(stage) -> str | None:  # a state stage is a broadcast: its collective is timed
        return {"ungrouped": "ungrouped", "group": "group"}.get(getattr(stage, "kind", None))

    stages, comms = rt.stages, list({id(c): c for c in rt.comms.values()}.values())
    rt.stages = [timed(k, s) if (k := kind(s)) else s for s in stages]
    rt.greedy = timed("head", rt.greedy)
    for comm in comms:
        for op in ("all_reduce", "broadcast", "all_gather"):
            setattr(comm, op, timed("collective", getattr(comm, op)))
    try:
        result = {}
        for phase in ("prefill", "decode"):
            acc.clear()
            t0 = time.perf_counter()
            if phase == "prefill":
                token, state = rt.prefill(ids, max_new_tokens=new_tokens + 1)
                steps = 1
            else:
                for _ in range(new_tokens):
                    token, state = rt.decode(token, state)
                steps = new_tokens
            sync()
            total = (time.perf_counter() - t0) / steps
            ms = {k: acc.get(k, 0.0) / steps * 1e3 for k in ("ungrouped", "group", "collective", "head")}
            result[phase] = {**ms, "rest": total * 1e3 - sum(ms.values())}
        return result
    finally:  # back to the class's methods
        rt.stages = stages
        del rt.greedy
        for comm in comms:
            for op in ("all_reduce", "broadcast", "all_gather"):
                delattr(comm, op)


def comm_times(comm, b: int, t: int, hidden: int, dtype: torch.dtype, device: torch.device,
               repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median ms of one all-reduce and one broadcast of the hidden state [B, T, H] (decode: [B, 1, H]).

    Every rank of the communicator's group calls this together (they are collectives)."""
    sync = device_sync(device)
    result = {}
    for phase, tokens in (("prefill", t), ("decode", 1)):
        x = torch.zeros(b, tokens, hidden, dtype=dtype, device=device)
        row = {"comm_bytes": x.numel() * x.element_size()}
        for key, op in (("allreduce_ms", comm.all_reduce), ("broadcast_ms", comm.broadcast)):
            ms = []
            for i in range(repeats + 3):  # 3 untimed
                sync()
                t0 = time.perf_counter()
                op(x)
                sync()
                ms += [(time.perf_counter() - t0) * 1e3] if i >= 3 else []
            row[key] = float(np.median(ms))
        result[phase] = row
    return result


def results_table(shapes: dict[tuple[int, int], ShapeResult], names: list[str], pinning: str, cfg: DictConfig,
                  built: Setups, memory: dict, device_type: str) -> pd.DataFrame:
    """One row per (setup, phase, T, B): median over rounds (its interval), p90, the paired reduction against
    the original on one device run the same way (`baseline`: (a) eager for eager rows, (a) compiled in the same
    mode for compiled rows; median over rounds, its interval), for compiled rows the paired reduction against
    the same setup eager (`compile_reduction`) and the first run's seconds (`compile_s`, compile included) and
    graphs; fraction of ideal, the protocol (rounds, warm-up, what ended the rounds, pinning), the latency
    model's inputs (the original's eager components on every row; the setup's collectives), and memory."""
    device = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    prov = provenance(device)
    plan, n = built.plan, built.config.num_hidden_layers
    sizes = {"hidden_size": built.config.hidden_size, "dtype_bytes": built.dtype.itemsize, **memory}
    level, resamples = cfg.confidence, cfg.bootstrap_resamples
    rows = []
    for (t, b), shape in shapes.items():
        rounds = shape.rounds
        figures = {setup: round_figures([r[setup] for r in rounds]) for setup in names}
        for setup in names:
            runs = [r[setup] for r in rounds]
            mode = built.columns[setup]["compile"]
            baseline = compiled_name(ORIGINAL, mode)
            for phase, per_round in figures[setup].items():
                raw = [ttft for ttft, _ in runs] if phase == "prefill" else [s for _, steps in runs for s in steps]
                lo, hi = bootstrap_ci(per_round, level, resamples)
                compiled = {}
                if mode != "none":
                    c = reduction_stats(figures[built.eager_of[setup]][phase], per_round, level, resamples)
                    compiled = {"compile_reduction": c["reduction"], "compile_reduction_ci_low": c["reduction_ci_low"],
                                "compile_reduction_ci_high": c["reduction_ci_high"], **shape.compiling.get(setup, {})}
                rows.append({"model": cfg.model.name, **plan_columns(plan), "n_layers": n, "groups": len(plan.groups),
                             "devices": cfg.devices, "tp": cfg.tp, "setup": setup, "phase": phase,
                             "prompt_tokens": t, "batch_size": b, "new_tokens": cfg.new_tokens,
                             "warmup": shape.warmup, "warmup_ended_by": shape.warmup_ended_by,
                             "repeats": cfg.repeats, "stopped_by": shape.stopped_by, "samples": len(raw),
                             "median_ms": float(np.median(per_round)), "median_ci_low_ms": lo, "median_ci_high_ms": hi,
                             "p90_ms": float(np.percentile(raw, 90)), "baseline": baseline,
                             **reduction_stats(figures[baseline][phase], per_round, level, resamples), **compiled,
                             **shape.load, **sizes, **built.columns.get(setup, {}), **shape.parts[ORIGINAL, phase],
                             **shape.parts.get((setup, phase), {})})
    df = pd.DataFrame(rows)
    df["ideal_reduction"] = ideal = plan.ideal_latency_reduction(n)
    df["fraction_of_ideal"] = np.where(df.setup.str.startswith("cqil"), df.reduction / ideal, np.nan)
    df["confidence"] = level
    df["ci_width_target"] = cfg.stop.ci_width if cfg.repeats == "auto" else np.nan
    df["budget_s"] = cfg.stop.budget_s if cfg.repeats == "auto" else np.nan
    df["pinning"] = pinning
    df["backend"] = dist.get_backend()
    df["cpus"] = os.cpu_count()
    df["threads_per_rank"] = cfg.threads_per_rank
    df["layouts"] = built.layouts  # the latency model's ranking behind `ungrouped: auto`
    for k, v in prov.items():
        df[k] = v
    return df


def _points(lo: float, hi: float) -> str:
    return "" if np.isnan(lo) else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def summary(df: pd.DataFrame) -> str:
    """The human table: median ms per setup; the paired reduction [interval] (fraction of ideal) against the
    original run the same way (eager or compiled); for compiled setups also against themselves eager."""
    r0 = df.iloc[0]
    lines = [f"{r0.model}, plan {r0.plan} ({r0.groups} groups of {r0.n_layers} layers), "
             f"ideal latency reduction {r0.ideal_reduction:.1%}; {r0.device}, backend {r0.backend}; pinning: {r0.pinning}",
             f"reductions: median over rounds of the paired reduction against {ORIGINAL} run the same way (eager, or "
             f"compiled in the same mode) [{r0.confidence:.0%} bootstrap interval, points]; compiled: also against "
             "the same setup eager"]
    for (phase, t, b), g in df.groupby(["phase", "prompt_tokens", "batch_size"], sort=False):
        busy = g.other_cpu_load.iloc[0] + g.steal.iloc[0]
        warn = f"  (WARNING: other processes took {busy:.0%} of the CPUs meanwhile)" if busy > 0.05 else ""
        c = g.iloc[0]  # where (a)'s time goes: the profile behind the ideal and the latency model
        lines.append(f"{phase:7s} T={t:<4d} B={b}: {c.rounds} rounds (ended by {c.stopped_by}) after {c.warmup} warm-up ({c.warmup_ended_by}){warn}"
                     f"  (a) = {c.n_layers} layers x {c.layer_ms:.2f} ms + head {c.head_ms:.2f} ms + rest {c.rest_ms:.2f} ms")
        for r in g.itertuples():
            frac = f", {r.fraction_of_ideal:.0%} of ideal" if r.setup.startswith("cqil") else ""
            red = ("" if r.setup == r.baseline else
                   f"  reduction {r.reduction:+.1%}{_points(r.reduction_ci_low, r.reduction_ci_high)}{frac}")
            if r.compile != "none":
                red += (f"  vs eager {r.compile_reduction:+.1%}"
                        f"{_points(r.compile_reduction_ci_low, r.compile_reduction_ci_high)}")
            comm = (f"  member 0: outside groups {r.rank0_ungrouped_ms:.1f}, in groups {r.rank0_group_ms:.1f}, "
                    f"collectives {r.rank0_collective_ms:.2f} ms" if r.setup.startswith("cqil") and r.compile == "none" else "")
            lines.append(f"    {r.setup:60s} median {r.median_ms:8.2f} ms  p90 {r.p90_ms:8.2f} ms{red}{comm}")
    return "\n".join(lines)
