"""`cqil bench`: latency of CQIL on P devices against honest baselines, side by side in one run.

Setups, for every (prompt length T, batch size B):
  (a) original, 1 device       the original model, one process (CPU: 1 thread)
  (b) cqil (...)               the plan on P processes/devices (cqil.runtime; CPU: 1 thread each),
                               once per runtime variant in `cqil` (collectives, LM head, where
                               the layers outside groups run)
  (c) original, P threads      what a user would otherwise do with the same P devices: on CPU one
      tensor parallel, P GPUs  process with P threads; on CUDA tensor parallelism over P GPUs

Protocol: `warmup` untimed rounds, then `repeats` timed rounds; a round runs every setup once,
in turn, so slow drift of the machine hits all setups alike. A run is the prefill of the prompt
(time to first token, TTFT, includes choosing that token) followed by `new_tokens` greedy decode
steps (time per output token, TPOT, each step timed). Reported: median and p90 over runs (TTFT)
or over all timed steps (TPOT), the latency reduction of every setup against (a) (medians), and
for CQIL its fraction of the plan's ideal reduction g*(P-1)/n. While rank 0 times (a) and (c)
alone, the other ranks sleep in a barrier. Prompts are real text (the data set's evaluation split).

Profiles, from `profile_runs` extra runs per setup after the timed rounds (medians; cqil.latency's inputs):
layer_ms / head_ms / rest_ms, where a run of (a) spends its time (timers around every decoder layer,
the head + argmax, and the rest); for every CQIL setup, rank0_*_ms, where member 0 spends its time
(layers outside groups, its group members, inside collectives including waiting, head, rest), and
allreduce_ms / broadcast_ms, one collective of a [B, T, H] hidden state (decode: [B, 1, H]) alone.

`cqil bench devices=P` launches `torchrun --standalone --nproc_per_node P -m cqil bench ...`
itself; starting that torchrun line directly works the same.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import CqilError, data, models
from .plan import Plan, plan_from_config
from .planning import resolve_plan
from .plots import bench_latency
from .results import BENCH_BASELINE as ORIGINAL, plan_columns, provenance, write_csv
from .runtime import Runtime, _MemberStage, init_distributed, make_mesh, under_torchrun


def run(cfg: DictConfig) -> None:
    """Outside torchrun: launch it with this command's overrides. Inside: be one rank of the bench."""
    if under_torchrun():
        return worker(cfg)
    world = cfg.devices * cfg.tp
    if cfg.devices < 2:
        raise CqilError(f"devices={cfg.devices}: CQIL needs at least 2 devices to run group members concurrently")
    plan_cfg = OmegaConf.to_object(cfg.plan)
    if plan_cfg.get("mode", "manual") != "auto":  # a given plan can be checked before starting processes
        check_devices(plan_from_config(plan_cfg, None), cfg.devices)
    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        raise CqilError("cqil bench launches torchrun with its command-line overrides; start it as `cqil bench ...`")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "cqil", *sys.argv[1:]]
    if not str(cfg.model.device).startswith("cuda") and world * cfg.threads_per_rank > (os.cpu_count() or 1):
        print(f"warning: {world} ranks x {cfg.threads_per_rank} threads on {os.cpu_count()} CPUs: ranks share cores, "
              "so the timings say little (fine for checking that it runs)", file=sys.stderr)
    # each failing rank appends `exit-code line` here (cqil.cli.report_error): its line is repeated last
    fd, errors = tempfile.mkstemp(prefix="cqil-bench-", suffix=".errors")
    os.close(fd)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads_per_rank), CQIL_ERROR_FILE=errors)
    print("launching:", " ".join(cmd[1:]), flush=True)
    try:
        rc = subprocess.run(cmd, env=env).returncode
        first = (Path(errors).read_text().splitlines() or [""])[0]
    finally:
        os.unlink(errors)
    if rc and first:
        code, _, line = first.partition(" ")
        if code == "2":
            raise CqilError(line)
        print(f"cqil bench: error: {line}", file=sys.stderr)
        sys.exit(int(code))
    if rc:
        raise CqilError(f"the {world}-process run failed (torchrun exit code {rc}); the failing rank's error is above")


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


def _stats(ms: list[float]) -> dict:
    return {"samples": len(ms), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def timed_run(rt: Runtime, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """One run: TTFT (prefill + first token) and the time of each of `new_tokens` decode steps, in ms."""
    sync = device_sync(ids.device)
    start = time.perf_counter()
    token, state = rt.prefill(ids)
    sync()
    ttft = (time.perf_counter() - start) * 1e3
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token, state = rt.decode(token, state)
        sync()
        steps.append((time.perf_counter() - t0) * 1e3)
    return ttft, steps


def worker(cfg: DictConfig) -> None:
    """One rank of the bench (all ranks run this; rank 0 also times the baselines and writes results)."""
    device_type = "cuda" if str(cfg.model.device).startswith("cuda") else "cpu"
    mesh = init_distributed(cfg.devices, cfg.tp, cfg.timeout_s, device_type)
    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    torch.set_num_threads(cfg.threads_per_rank)
    # while rank 0 times the one-device baselines alone, the others wait here (long timeout, no spinning)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.solo_timeout_s))

    model, tokenizer = models.load(OmegaConf.to_object(cfg.model))
    data_cfg = data.DataConfig(**OmegaConf.to_object(cfg.data))
    plan = resolve_plan(OmegaConf.to_object(cfg.plan), model, tokenizer, data_cfg)
    check_devices(plan, cfg.devices)
    if max(cfg.prompt_tokens) > data_cfg.block_size:
        raise CqilError(f"prompt_tokens up to {max(cfg.prompt_tokens)} exceed data.block_size={data_cfg.block_size}")
    prompts = data.token_blocks(data_cfg, tokenizer, "evaluation", max(cfg.batch_sizes) * data_cfg.block_size)
    prompts = prompts.to(model.device)

    original = Runtime(model, Plan())
    setups: dict[str, Runtime] = {}
    variants: dict[str, dict] = {}  # setup -> its runtime options (CSV columns comm, lm_head, ungrouped)
    for variant in cfg.cqil:
        v = {"comm": "auto", "lm_head": "sharded", "ungrouped": "replicated", **variant}
        if set(v) - {"comm", "lm_head", "ungrouped"}:
            raise CqilError(f"bench cqil setup {dict(variant)} has unknown keys; use comm, lm_head, ungrouped")
        rt = Runtime(model, plan, mesh, timeout_s=cfg.timeout_s, **v)
        name = f"cqil ({rt.comm.name}, head {v['lm_head']}, ungrouped {v['ungrouped']})"
        setups[name], variants[name] = rt, {**v, "comm": rt.comm.name}
    if device_type == "cuda":  # (c) on GPUs: the original model, tensor parallel over the same devices
        setups[f"tensor parallel, {world} GPUs"] = Runtime(copy.deepcopy(model), Plan(), make_mesh(1, world, "cuda"))

    def solo(fn) -> None:
        """Rank 0 runs fn alone; the other ranks wait."""
        if lead:
            fn()
        dist.barrier(group=control)

    samples: dict[tuple, tuple[list, list]] = {}

    def record(name: str, t: int, b: int, rt: Runtime, ids: torch.Tensor, timed: bool) -> None:
        ttft, tpot = timed_run(rt, ids, cfg.new_tokens)
        if timed:
            runs = samples.setdefault((name, t, b), ([], []))
            runs[0].append(ttft)
            runs[1].extend(tpot)

    grid = [(t, b) for t in cfg.prompt_tokens for b in cfg.batch_sizes]
    load: dict[tuple, dict] = {}
    parts: dict[tuple, dict] = {}  # (setup, phase, T, B) -> latency-model inputs
    for t, b in tqdm(grid, desc="bench", unit="shape", disable=not lead):
        ids = prompts[:b, :t]
        start = (time.perf_counter(), machine_cpu_s(), time.process_time())
        for i in range(cfg.warmup + cfg.repeats):  # round robin over setups: drift hits all alike
            timed = i >= cfg.warmup

            def baselines() -> None:
                record(ORIGINAL, t, b, original, ids, timed)
                if device_type == "cpu":  # (c) on CPU: one process using the threads of all P ranks
                    torch.set_num_threads(world * cfg.threads_per_rank)
                    record(f"original, {world} threads", t, b, original, ids, timed)
                    torch.set_num_threads(cfg.threads_per_rank)

            solo(baselines)
            for name, rt in setups.items():
                dist.barrier(group=control)  # every rank starts the run together
                record(name, t, b, rt, ids, timed)
        ours = [0.0] * world
        dist.all_gather_object(ours, time.process_time() - start[2], group=control)
        load[t, b] = other_load(start, sum(ours))

        def profile_original() -> None:  # (a)'s parts: the latency model's inputs
            n = model.config.num_hidden_layers
            for phase, v in profile(original, ids, cfg.new_tokens, cfg.profile_runs).items():
                parts[ORIGINAL, phase, t, b] = {"layer_ms": v["ungrouped"] / n, "head_ms": v["head"],
                                                "rest_ms": v["rest"]}

        solo(profile_original)
        for name, rt in setups.items():  # each CQIL setup: member 0's profile and its collectives alone
            dist.barrier(group=control)
            prof = profile(rt, ids, cfg.new_tokens, cfg.profile_runs)
            comm = comm_times(rt.comm, b, t, model.config.hidden_size, model.dtype, model.device) if rt.comm else {}
            for phase in prof:
                parts[name, phase, t, b] = {**{f"rank0_{k}_ms": v for k, v in prof[phase].items()}, **comm.get(phase, {})}
    if not lead:
        return
    table = results_table(samples, load, parts, variants, cfg, plan, model, device_type)
    out = cfg.out or f"results/bench/latency_{cfg.model.name}_{plan.tag()}.csv"
    figure = cfg.figure or f"results/figures/bench_latency_{cfg.model.name}_{plan.tag()}.png"
    write_csv(table, out)
    print(summary(table))
    print(f"-> {out}\n-> {bench_latency(table, figure)}")


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

    def kind(stage) -> str | None:
        if isinstance(stage, nn.Module):
            return "ungrouped"
        return "group" if isinstance(stage, _MemberStage) else None  # a broadcast stage: its collective is timed

    stages, comm = rt.stages, rt.comm
    rt.stages = [timed(k, s) if (k := kind(s)) else s for s in stages]
    rt.greedy = timed("head", rt.greedy)
    if comm is not None:
        for op in ("all_reduce_", "broadcast_", "all_gather"):
            setattr(comm, op, timed("collective", getattr(comm, op)))
    try:
        result = {}
        for phase in ("prefill", "decode"):
            acc.clear()
            t0 = time.perf_counter()
            if phase == "prefill":
                token, state = rt.prefill(ids)
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
        if comm is not None:
            for op in ("all_reduce_", "broadcast_", "all_gather"):
                delattr(comm, op)


def comm_times(comm, b: int, t: int, hidden: int, dtype: torch.dtype, device: torch.device,
               repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median ms of one all-reduce and one broadcast of the hidden state [B, T, H] (decode: [B, 1, H]).

    Every rank of the member axis calls this together (they are collectives)."""
    sync = device_sync(device)
    result = {}
    for phase, tokens in (("prefill", t), ("decode", 1)):
        x = torch.zeros(b, tokens, hidden, dtype=dtype, device=device)
        row = {"comm_bytes": x.numel() * x.element_size()}
        for key, op in (("allreduce_ms", comm.all_reduce_), ("broadcast_ms", comm.broadcast_)):
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


def results_table(samples: dict, load: dict, parts: dict, variants: dict, cfg: DictConfig, plan: Plan,
                  model: torch.nn.Module, device_type: str) -> pd.DataFrame:
    """One row per (setup, phase, T, B): medians, p90, reduction against (a), fraction of ideal, and the
    latency model's inputs (the original's components on every row; the setup's collectives)."""
    device = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    prov = provenance(device)
    n = model.config.num_hidden_layers
    sizes = {"hidden_size": model.config.hidden_size, "dtype_bytes": model.dtype.itemsize}
    rows = []
    for (setup, t, b), (ttft, tpot) in samples.items():
        for phase, ms in (("prefill", ttft), ("decode", tpot)):
            rows.append({"model": cfg.model.name, **plan_columns(plan), "n_layers": n, "groups": len(plan.groups),
                         "devices": cfg.devices, "tp": cfg.tp, "setup": setup, "phase": phase,
                         "prompt_tokens": t, "batch_size": b, "new_tokens": cfg.new_tokens,
                         "warmup": cfg.warmup, "repeats": cfg.repeats, **_stats(ms), **load[t, b], **sizes,
                         **variants.get(setup, {}), **parts[ORIGINAL, phase, t, b], **parts.get((setup, phase, t, b), {})})
    df = pd.DataFrame(rows)
    base = df[df.setup == ORIGINAL].set_index(["phase", "prompt_tokens", "batch_size"]).median_ms
    df["reduction"] = 1 - df.median_ms / base.loc[list(zip(df.phase, df.prompt_tokens, df.batch_size))].to_numpy()
    df["ideal_reduction"] = ideal = plan.ideal_latency_reduction(n)
    df["fraction_of_ideal"] = np.where(df.setup.str.startswith("cqil"), df.reduction / ideal, np.nan)
    df["backend"] = dist.get_backend()
    df["cpus"] = os.cpu_count()
    df["threads_per_rank"] = cfg.threads_per_rank
    for k, v in prov.items():
        df[k] = v
    return df


def summary(df: pd.DataFrame) -> str:
    """The human table: median ms per setup, and reduction (fraction of ideal) for the others."""
    lines = [f"{df.model.iloc[0]}, plan {df.plan.iloc[0]} ({df.groups.iloc[0]} groups of {df.n_layers.iloc[0]} layers), "
             f"ideal latency reduction {df.ideal_reduction.iloc[0]:.1%}; {df.device.iloc[0]}, backend {df.backend.iloc[0]}"]
    for (phase, t, b), g in df.groupby(["phase", "prompt_tokens", "batch_size"], sort=False):
        busy = g.other_cpu_load.iloc[0] + g.steal.iloc[0]
        warn = f"  (WARNING: other processes took {busy:.0%} of the CPUs meanwhile)" if busy > 0.05 else ""
        c = g.iloc[0]  # where (a)'s time goes: the profile behind the ideal and the latency model
        lines.append(f"{phase:7s} T={t:<4d} B={b}:{warn}  (a) = {c.n_layers} layers x {c.layer_ms:.2f} ms "
                     f"+ head {c.head_ms:.2f} ms + rest {c.rest_ms:.2f} ms")
        for r in g.itertuples():
            frac = f", {r.fraction_of_ideal:.0%} of ideal" if r.setup.startswith("cqil") else ""
            red = "" if r.setup == ORIGINAL else f"  reduction {r.reduction:+.1%}{frac}"
            comm = (f"  member 0: outside groups {r.rank0_ungrouped_ms:.1f}, in groups {r.rank0_group_ms:.1f}, "
                    f"collectives {r.rank0_collective_ms:.2f} ms" if r.setup.startswith("cqil") else "")
            lines.append(f"    {r.setup:48s} median {r.median_ms:8.2f} ms  p90 {r.p90_ms:8.2f} ms{red}{comm}")
    return "\n".join(lines)
