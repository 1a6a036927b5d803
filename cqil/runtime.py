"""Multi-device CQIL on a P x T mesh: one process per device (torch.distributed, torchrun).

What runs where is cqil.schedule's (read its docstring first): `make_schedule(plan, n_layers, P, T,
variant)` lists the stages; this module turns them into computations on this rank. Started by torchrun
(`cqil bench devices=P tp=T` launches it). Backend gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK):
one code path, only the backend and the device differ.

    launch(job, world, threads_per_rank)                        re-run `cqil <job> ...` under torchrun
    init_distributed(P, T, device_type, startup_timeout_s)     join the job -> this rank's device
    make_mesh(P, T, device, timeout_s)                         process groups of the axes member/tp/world
    Runtime(checkpoint or model, plan, mesh, variant, compile)  this rank's weights and stages; rt.compiled(mode): its twin
    rt.prefill / rt.decode / rt.generate / rt.forward           (every rank calls the same, in the same order)
    shutdown()                                                  destroy the process groups (call in a finally)

Rank-local weights. `Runtime(path, ...)` builds the model on the `meta` device (no memory) and reads
from the safetensors checkpoint only the tensor slices this rank's stages use (cqil.schedule.shares,
partial reads through cqil.models.SafetensorsReader): its members' layers (1/T of each matrix under
tensor parallelism), the ungrouped layers where the variant runs them, its vocabulary rows of the head,
the embedding and final norm where used. Everything else stays on `meta` and never leaves disk.
`Runtime(model, ...)` copies the same slices out of an in-memory model (tests, one-process jobs).
Timeouts: joining the job and the barrier after loading wait up to `startup_timeout_s` (ranks start
and finish loading minutes apart on big models); the mesh's own process groups, which carry every
collective of the forward, time out after `timeout_s` (a dead or stuck peer ends the run quickly).

The computation on rank (k, t), with the layers cut as gpt-fast's tp.py cuts them (q,k,v,gate,up by
output features, o,down by input features; whole KV heads with their query heads per shard, see
cqil.schedule.tp_cuts; the HF attention reshapes with -1, so its shard of heads just works) and plain
collectives on explicit process groups (no DTensor on the hot path):
    ungrouped layer, cut over an axis:  a = Attn(x) partial; all-reduce; r = x + a;
                                        m = MLP(r) partial; all-reduce; r + m
    group, member k on its T ranks:     a_k = Attn_k(x) partial; all-reduce over tp (MLP_k's norm needs it whole)
                                        (D > 0) all-gather of the a_j over member: bypass
                                        y = x + all-reduce over world of (MLP_k partial + [t = 0] a_k)
                                        (a_k added by one of its T ranks rather than a_k / T by each:
                                        counted once either way, and no rounding)
    state (ungrouped="rank0"):          member 0's hidden state broadcast over member
    head:                               final norm + head rows of this rank; greedy: all-gather of
                                        (max logit, token id) pairs over world; logits: all-gather of the shards
With P = 1 in one process (mesh=None) a group runs cqil.modeling's single-process definition itself.
Every rank ends a step with the same token ids (the collectives return identical results everywhere),
so no token broadcast is needed except where one member alone runs a replicated head. Sampling: take
`with_logits=True` (identical logits on every rank), sample with the same seed on every rank and pass the
token ids to `decode`.

Communicators (`comm`): "torch" (torch.distributed: gloo/nccl), or "shm" for CPU ranks of one x86-64
host: gloo's TCP all-reduce of one decode token's hidden state costs ~1-2 ms here, about what a decoder
layer computes; a shared-memory segment with spin-waiting does it in microseconds. The shm communicator
works on any process group (it sets itself up with that group's own collectives), so each axis group
(member, tp, world) gets its own segment and no collective falls back to TCP. "auto" picks shm on one
x86-64 host with gloo, else torch; "shm" is refused elsewhere (nccl tensors live on GPUs; weaker memory
orders than x86's would need fences).

GPU-grade execution (what gpt-fast does; DESIGN.md "Scale"). At batch-1 decode an eager step is mostly host
time (~40 small ops a layer), so every setup runs one step function (`Runtime._step`: embedding, this rank's
stages with their collectives, head) either eagerly or compiled whole per rank (`compile`):
  - static KV cache (StaticKV): keys/values of every layer this rank runs, preallocated for the run's prompt +
    new tokens (rounded up to CACHE_BLOCK slots, reused by later runs of the same shape), written in place at
    the step's slots; the slot and the next positions live on the device, so a decode step reads no host value
    and a caller syncs only when it reads the tokens. The mask (causal, left padding, sliding window for models
    whose layers all use one: Mistral, Qwen2 with use_sliding_window) and the rotary tables are made once per
    cache and indexed by slot and position. tests: equal to transformers' DynamicCache and generate().
  - torch.compile(fullgraph=True) of the whole step: a graph break raises instead of slowing down silently;
    static shapes (a graph per batch size and cache length for decode, per batch size and prompt length for
    prefill: callers bucket prompt lengths by left padding); mode "reduce-overhead" replays CUDA graphs. Collectives stay inside the graph: torch's go through the functional collectives dynamo traces
    (gloo and nccl); the shm communicator's spin-wait cannot be traced, so its collectives are torch custom
    ops (opaque to dynamo, ordered effects: never dropped, merged or reordered). Compiled runs keep the eager
    run's communicator, so a setup's eager and compiled rows differ in compilation alone.

Failure: every collective times out after `timeout_s` (shm: the spin-wait has the same deadline) with a
CqilError naming the rank; a dead peer breaks gloo/nccl sockets at once; the launcher (`launch`, or torchrun)
ends the other ranks when one fails. No path waits forever.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import platform
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch._library.effects import EffectType

from . import CqilError, JobFailed, models
from .modeling import _Group, bypass_input, check_supported, decoder, member_attention, member_mlp
from .plan import Plan
from .schedule import COMPILES, HEAD, ROW_PARALLEL, Schedule, Stage, Variant, check_shardable, make_schedule, shares

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
_RUNTIMES = itertools.count()  # Runtimes built by this process: every rank builds them in the same order


# ---- process groups ------------------------------------------------------------------------
def under_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(job: str, world: int, threads_per_rank: int) -> None:
    """Run this `cqil <job> ...` command again on `world` processes of this host, as `torchrun --standalone
    --nproc_per_node <world> -m cqil <job> ...` would (torch's elastic agent, run here in this process), with
    the same command-line overrides, so every rank composes the same config.

    Ctrl-C, SIGTERM or SIGHUP ends every rank (and what it started) before this returns, so nothing is
    written after the exit; then KeyboardInterrupt (cqil.cli: one line, exit 130). The first sign of a
    failure ends the job at once (_Ranks): a rank's own line ($CQIL_ERROR_FILE, cqil.cli.report_error) is
    raised again here, as CqilError (exit 2) for bad input only a rank could see, else JobFailed (exit 1);
    a rank that died without a word (killed, crashed) is named with its signal or exit code (JobFailed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if len(sys.argv) < 2 or sys.argv[1] != job:
        raise CqilError(f"cqil {job} launches torchrun with its command-line overrides; start it as `cqil {job} ...`")
    print("launching the equivalent of: torchrun --standalone --nproc_per_node", world, "-m cqil",
          shlex.join(sys.argv[1:]), file=sys.stderr, flush=True)
    fd, errors = tempfile.mkstemp(prefix=f"cqil-{job}-", suffix=".errors")
    os.close(fd)
    ranks = _Ranks(errors)
    # the ranks inherit os.environ; the agent handles only SIGUSR2 (its own Ctrl-C handling waits 30 s for a
    # stopped rank): SIGINT/SIGTERM/SIGHUP are this launcher's
    env = {"OMP_NUM_THREADS": str(threads_per_rank), "CQIL_ERROR_FILE": errors, "TORCHELASTIC_SIGNALS_TO_HANDLE": None}
    saved_env = {k: os.environ.get(k) for k in env}
    # the agent's warnings repeat what cqil says in one line (its loggers set their own levels: each is quieted)
    quiet = {log: log.level for name, log in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed.elastic") and isinstance(log, logging.Logger)}

    def interrupted(signum, frame):
        ranks.end()
        raise KeyboardInterrupt

    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                          signals_to_handle="SIGUSR2")
    agent_saw = None
    try:
        for sig in saved_signals:
            signal.signal(sig, interrupted)
        os.environ.update({k: v for k, v in env.items() if v is not None})
        for log in quiet:
            log.setLevel(logging.CRITICAL)
        ranks.start()
        elastic_launch(config, sys.executable)("-u", "-m", "cqil", *sys.argv[1:])
    except ChildFailedError as e:  # a failure the watch did not see first (no /proc, or reaped in between)
        rank, first = e.get_first_failure()
        agent_saw = f"1 rank {rank}: {_death(-first.exitcode if first.exitcode < 0 else first.exitcode << 8)}"
    finally:
        for sig in saved_signals:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        ranks.stop()
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        for log, level in quiet.items():
            log.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.unlink(errors)
    cause = ranks.cause or agent_saw
    if cause:
        code, _, line = cause.partition(" ")
        raise (CqilError if code == "2" else JobFailed)(line)


def _death(status: int) -> str:
    """A wait status (signal in the low 7 bits, else exit code << 8) in words."""
    if status & 0x7F:
        return f"killed by {signal.Signals(status & 0x7F).name} (no cqil error line)"
    return f"exited with code {status >> 8} without a cqil error line"


class _Ranks(threading.Thread):
    """The processes of one launch (those whose $CQIL_ERROR_FILE is `errors`), watched while they run.

    Every 50 ms: a rank that has exited non-zero without a line (Linux: its status is read from /proc while
    it waits to be reaped), else the first line in `errors`, is the cause of the failure (`cause`, "code line");
    the job is then ended at once (`end`: SIGKILL to every rank's process group; a stopped or blocked rank
    does not hold it up, and no rank prints the C++ frames of a collective whose peer is gone). The agent
    polls every 0.5 s, so this sees a failure first and the other ranks' consequences are not mistaken for it."""

    def __init__(self, errors: str):
        super().__init__(daemon=True, name="cqil-ranks")
        self.errors, self.cause = errors, None
        self.known: dict[int, int] = {}  # pid -> rank, of every rank seen
        self._done = threading.Event()

    def procs(self) -> list:
        import psutil

        mine = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                env = p.environ()
                if env.get("CQIL_ERROR_FILE") == self.errors:
                    mine.append(p)
                    if env.get("RANK", "").isdigit():
                        self.known.setdefault(p.pid, int(env["RANK"]))
        return mine

    def run(self) -> None:
        while not self._done.wait(0.05) and self.cause is None:
            self.procs()
            silent = [f"1 rank {rank}: {_death(status)}" for pid, rank in sorted(self.known.items(), key=lambda x: x[1])
                      if (status := _exit_status(pid)) and not self._said(rank)]
            self.cause = (silent or self._lines() or [None])[0]
        if self.cause:
            self.end()

    def _lines(self) -> list[str]:
        """The lines the ranks wrote ("code rank R: message"), in the order they failed."""
        try:
            return Path(self.errors).read_text().splitlines()
        except OSError:
            return []

    def _said(self, rank: int) -> bool:
        return any(line.split(" ")[1:3] == ["rank", f"{rank}:"] for line in self._lines())

    def end(self, wait: bool = False) -> None:
        """SIGKILL every rank's process group (and any other process of the launch); with `wait`, reap them."""
        import psutil

        self._done.set()  # what follows is not a failure of the job
        procs = self.procs()
        for pid in {*self.known, *(p.pid for p in procs)}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pid in self.known:  # a rank leads its own process group (the agent starts it in a new session)
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        if wait:
            psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        """Stop watching; end and reap whatever of the launch is still alive (the agent has reaped its ranks)."""
        self._done.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        self.end(wait=True)


def _exit_status(pid: int) -> int:
    """The wait status of an exited child not yet reaped (Linux /proc: field 52 of stat); 0 if running, gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[49]) if fields[0] == "Z" and len(fields) > 49 else 0


def check_world_size(devices: int, tp: int = 1) -> int:
    """The world size torchrun started, which must be devices * tp; else a clear CqilError."""
    if not under_torchrun():
        raise CqilError("not started by torchrun (WORLD_SIZE/RANK unset); use `cqil bench devices=P`, "
                        "which launches it, or `torchrun --nproc_per_node P -m cqil bench devices=P`")
    world = int(os.environ["WORLD_SIZE"])
    if world != devices * tp:
        raise CqilError(f"torchrun started {world} processes but devices={devices} x tp={tp} needs "
                        f"{devices * tp}; run torchrun --nproc_per_node {devices * tp} or set devices={world // tp or 1}")
    return world


def init_distributed(devices: int, tp: int = 1, device_type: str = "cpu", startup_timeout_s: float = 1800.0) -> torch.device:
    """Join the torchrun job (gloo on CPU, nccl on CUDA) and return this rank's device (cuda:LOCAL_RANK).

    The default process group waits up to startup_timeout_s (ranks start at different times); the
    collectives of the forward run on make_mesh's groups, with their own short timeout."""
    check_world_size(devices, tp)
    if device_type not in BACKENDS:
        raise CqilError(f"device {device_type!r} is not supported by the runtime; use cpu or cuda")
    device = torch.device("cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise CqilError("model.device=cuda but CUDA is not available here; use model.device=cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # before anything allocates: every rank on its own GPU
    if not dist.is_initialized():
        store, rank, world = join(startup_timeout_s)
        dist.init_process_group(BACKENDS[device_type], store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=startup_timeout_s))
    return device


def join(timeout_s: float) -> tuple[dist.Store, int, int]:
    """Wait until every rank of the job has reached its key-value store (env://, as init_process_group would);
    JobFailed naming the ranks that have not within `timeout_s` (stopped, stuck or still loading), instead
    of a store timeout that names nobody. Returns (store for the default group, rank, world size)."""
    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    arrive(store, "cqil/joined", rank, world, timeout_s, "join the job")
    return dist.PrefixStore("default_pg", store), rank, world


def arrive(store: dist.Store, key: str, rank: int, world: int, timeout_s: float, what: str) -> None:
    """A barrier on the job's key-value store: mark `rank` at `key`, wait for every rank; JobFailed naming the
    ranks that have not arrived within `timeout_s` (stopped, stuck or still loading). Polled: store.wait's
    timeout prints C++ warnings, and a gloo barrier's names nobody."""
    store.set(f"{key}/{rank}", "1")
    deadline = time.monotonic() + timeout_s
    while late := [r for r in range(world) if not store.check([f"{key}/{r}"])]:
        if time.monotonic() > deadline:
            raise JobFailed(f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} did not {what} "
                            f"within startup_timeout_s={timeout_s:g} s (stopped, stuck, or still loading); if loading "
                            "takes longer, raise startup_timeout_s")
        time.sleep(0.1)


def shutdown() -> None:
    """Destroy the process groups (call in a finally: no leaked sockets, no NCCL warnings at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Mesh:
    """This rank's place in a P x T mesh (rank = k * T + t) and its process group on each axis."""
    P: int
    T: int
    rank: int
    device: torch.device
    groups: dict[str, dist.ProcessGroup]  # "member" / "tp" / "world" -> this rank's group (axes of size > 1)

    @property
    def k(self) -> int:
        return self.rank // self.T

    @property
    def t(self) -> int:
        return self.rank % self.T


def make_mesh(P: int, T: int = 1, device: torch.device | str = "cpu", timeout_s: float = 60.0) -> Mesh:
    """The (member, tp) mesh over all ranks, its groups with collective timeout `timeout_s`; every rank
    calls this together (it creates process groups)."""
    world = dist.get_world_size()
    if P * T != world:
        raise CqilError(f"a {P} x {T} mesh needs {P * T} processes but the job has {world}")
    timeout = timedelta(seconds=timeout_s)
    whole = dist.new_group(timeout=timeout) if world > 1 else None
    layouts = {"member": [[k * T + t for k in range(P)] for t in range(T)],
               "tp": [[k * T + t for t in range(T)] for k in range(P)]}
    groups: dict[str, dist.ProcessGroup] = {}
    for axis, ranks in layouts.items():
        if len(ranks[0]) > 1:
            groups[axis] = whole if len(ranks[0]) == world else dist.new_subgroups_by_enumeration(ranks, timeout)[0]
    if world > 1:
        groups["world"] = whole
    return Mesh(P, T, dist.get_rank(), torch.device(device), groups)


# ---- communicators ---------------------------------------------------------------------------
class TorchComm:
    """all_reduce / broadcast / all_gather over one process group with torch.distributed (gloo or nccl).

    Eager: the in-place torch.distributed calls (error messages name the rank). Inside a compiled step:
    torch's functional collectives, which dynamo traces into the graph (no graph break; gloo and nccl)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.name = dist.get_backend(group)

    def _fail(self, op: str, e: Exception) -> CqilError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return CqilError(f"rank {dist.get_rank()}: {op} failed: {first} (if another rank died or timed out, its error is above)")

    def set_timeout(self, seconds: float) -> None:
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), self.group)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the group (eager: in place, so `t` holds it too)."""
        if torch.compiler.is_compiling():
            return funcol.all_reduce(t, "sum", self.group)
        try:
            dist.all_reduce(t, group=self.group)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("all_reduce", e) from None
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank src's `t` (eager: written into `t`)."""
        if torch.compiler.is_compiling():
            return funcol.broadcast(t, src, self.group)
        try:
            dist.broadcast(t, group=self.group, group_src=src)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("broadcast", e) from None
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
        if torch.compiler.is_compiling():
            return funcol.all_gather_tensor(t.contiguous().view(1, *t.shape), 0, self.group)
        out = t.new_empty(self.size * t.numel())  # flat: gloo wants the concatenated form
        try:
            dist.all_gather_single(out, t.contiguous().view(-1), group=self.group)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("all_gather", e) from None
        return out.view(self.size, *t.shape)


class ShmComm:
    """all_reduce_ / broadcast_ / all_gather for the ranks of one host through a shared-memory segment.

    A collective: copy my tensor into my slot, publish a sequence number in my flag (its own cache
    line), spin until every rank has published it, then read all slots (every rank reduces them in
    the same order, so results are bitwise identical on every rank). Slots alternate between two
    sets, so one rendezvous per collective suffices: a rank can only reuse a set after every rank
    has posted the following collective, i.e. finished reading this one. Large tensors go in
    chunks of `slot_bytes`. Flags are plain stores and loads; x86's total store order makes the
    data visible before the flag (that is why `auto` picks this only on x86-64).
    """

    FLAG_STRIDE = 8  # int64 per flag: one 64-byte cache line each, no false sharing
    name = "shm"

    def __init__(self, group: dist.ProcessGroup, timeout_s: float = 60.0, slot_bytes: int = 1 << 22):
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.timeout_s, self.slot_bytes = timeout_s, slot_bytes
        flag_bytes = 64 * self.size
        total = flag_bytes + 2 * self.size * slot_bytes
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        name = [os.path.join(shm_dir, f"cqil-{uuid.uuid4().hex}") if self.rank == 0 else None]
        dist.broadcast_object_list(name, group=group, group_src=0)
        mem = torch.from_file(name[0], shared=True, size=total, dtype=torch.uint8)
        dist.barrier(group=group)  # every rank has mapped it: the name can go (no leak on any exit)
        if self.rank == 0:
            os.unlink(name[0])
        self.flags = mem[:flag_bytes].view(torch.int64).numpy()  # numpy scalar access: ~100 ns
        self.slots = mem[flag_bytes:].view(2, self.size, slot_bytes)
        self.seq = 0
        dist.barrier(group=group)
        self._peers = [p * self.FLAG_STRIDE for p in range(self.size) if p != self.rank]
        self.handle = id(self)  # how the compiled step's custom ops find it
        _SHM[self.handle] = self

    def set_timeout(self, seconds: float) -> None:
        self.timeout_s = seconds

    def _wait(self, op: str) -> None:
        """Spin until every peer has posted collective number self.seq; then yield, then time out."""
        flags, seq, start = self.flags, self.seq, None
        for i in self._peers:
            spins = 0
            while flags[i] < seq:
                spins += 1
                if spins < 2000:
                    continue  # hot spin: a waiting peer is usually microseconds away
                if start is None:
                    start = time.monotonic()
                elif time.monotonic() - start > self.timeout_s:
                    raise CqilError(f"rank {dist.get_rank()}: timed out after {self.timeout_s:g} s waiting for "
                                    f"rank {i // self.FLAG_STRIDE} of its group in {op} (a rank died or is stuck)")
                # more ranks than free cores (tests): give the core away instead of burning it
                os.sched_yield() if spins < 20000 else time.sleep(50e-6)

    def _exchange(self, chunk: torch.Tensor, op: str, contribute: bool = True) -> torch.Tensor:
        """Post `chunk` (flat), wait for all ranks; return the [size, n] view of everybody's chunk."""
        self.seq += 1
        n = chunk.numel()
        slots = self.slots[self.seq % 2].view(chunk.dtype)[:, :n]
        if contribute:
            slots[self.rank].copy_(chunk)
        self.flags[self.rank * self.FLAG_STRIDE] = self.seq
        self._wait(op)
        return slots

    def _chunks(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return flat.split(self.slot_bytes // flat.element_size())

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the group (eager: in place if `t` is contiguous)."""
        if torch.compiler.is_compiling():
            return torch.ops.cqil.shm_all_reduce(t, self.handle)
        t = t.contiguous()
        for chunk in self._chunks(t.view(-1)):
            torch.sum(self._exchange(chunk, "all_reduce"), dim=0, out=chunk)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank src's `t` (eager: written into `t` if it is contiguous)."""
        if torch.compiler.is_compiling():
            return torch.ops.cqil.shm_broadcast(t, src, self.handle)
        t = t.contiguous()
        for chunk in self._chunks(t.view(-1)):
            slots = self._exchange(chunk, "broadcast", contribute=self.rank == src)
            if self.rank != src:
                chunk.copy_(slots[src])
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
        if torch.compiler.is_compiling():
            return torch.ops.cqil.shm_all_gather(t, self.handle)
        out = t.new_empty((self.size, t.numel()))
        offset = 0
        for chunk in self._chunks(t.contiguous().view(-1)):
            out[:, offset:offset + chunk.numel()] = self._exchange(chunk, "all_gather")
            offset += chunk.numel()
        return out.view(self.size, *t.shape)


# The shm collectives inside a compiled step. The spin-wait on numpy flags cannot be traced, so each collective
# is a torch custom op: opaque to dynamo (no graph break), called from the compiled graph as one extern call,
# which runs the eager method above. Registered as ORDERED effects: the compiler keeps them in program order
# and never drops or merges one (every rank must post the same collectives in the same order, or they deadlock).
_SHM: "weakref.WeakValueDictionary[int, ShmComm]" = weakref.WeakValueDictionary()  # handle -> communicator


@torch.library.custom_op("cqil::shm_all_reduce", mutates_args=())
def _shm_all_reduce(t: torch.Tensor, handle: int) -> torch.Tensor:
    return _SHM[handle].all_reduce(t.clone(memory_format=torch.contiguous_format))


@torch.library.custom_op("cqil::shm_broadcast", mutates_args=())
def _shm_broadcast(t: torch.Tensor, src: int, handle: int) -> torch.Tensor:
    return _SHM[handle].broadcast(t.clone(memory_format=torch.contiguous_format), src)


@torch.library.custom_op("cqil::shm_all_gather", mutates_args=())
def _shm_all_gather(t: torch.Tensor, handle: int) -> torch.Tensor:
    return _SHM[handle].all_gather(t)


@_shm_all_reduce.register_fake
def _(t, handle):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@_shm_broadcast.register_fake
def _(t, src, handle):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@_shm_all_gather.register_fake
def _(t, handle):
    return t.new_empty((_SHM[handle].size, *t.shape))


for _op in (_shm_all_reduce, _shm_broadcast, _shm_all_gather):
    _op.register_effect(EffectType.ORDERED)


Comm = TorchComm | ShmComm


def make_comm(group: dist.ProcessGroup, kind: str = "auto", timeout_s: float = 60.0) -> Comm:
    """A communicator on `group`: shm for CPU ranks on one x86-64 host under `auto`, else torch."""
    if kind == "torch":
        return TorchComm(group)
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    fits = dist.get_backend(group) == "gloo" and len(set(hosts)) == 1 and platform.machine() in ("x86_64", "AMD64")
    if kind == "shm" and not fits:
        raise CqilError(f"comm=shm needs the gloo backend (CPU) on one x86-64 host, but this run uses "
                        f"{dist.get_backend(group)} on {platform.machine()} across {len(set(hosts))} host(s); "
                        "use comm=torch or comm=auto")
    return ShmComm(group, timeout_s) if fits else TorchComm(group)


# ---- the stages on this rank ------------------------------------------------------------------
class _LayerStage:
    """An ungrouped layer: whole (comm None) or tensor parallel, its two partial sums all-reduced over `comm`."""
    kind = "ungrouped"

    def __init__(self, layer: nn.Module, comm: Comm | None):
        self.layer, self.comm = layer, comm

    def __call__(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        attn = member_attention(self.layer, x, **attn_kwargs)
        if self.comm is not None:
            attn = self.comm.all_reduce(attn)
        mlp = member_mlp(self.layer, x, attn)  # MLP(norm(x + a)): the decoder layer's second half
        if self.comm is not None:
            mlp = self.comm.all_reduce(mlp)
        return x + attn + mlp


class _GroupStage:
    """Member k's layer of a group on rank (k, t) (None if the group is shorter than P) and its collectives."""
    kind = "group"

    def __init__(self, layer: nn.Module | None, k: int, t: int, bypass: int, attn: Comm | None,
                 gather: Comm | None, total: Comm):
        self.layer, self.k, self.t, self.bypass = layer, k, t, bypass
        self.attn, self.gather, self.total = attn, gather, total

    def __call__(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.layer is None:  # no member here: zeros into the member-axis and world exchanges
            part = torch.zeros_like(x)
            if self.gather is not None:  # my own zeros back from the gather: the all-reduce then depends on it,
                part = self.gather.all_gather(part)[self.k]  # so no compiler can run the two out of order
            return x + self.total.all_reduce(part)
        attn = member_attention(self.layer, x, **attn_kwargs)
        if self.attn is not None:  # o_proj partial sums of the member's T ranks: a_k whole on each
            attn = self.attn.all_reduce(attn)
        bypass_in = None
        if self.gather is not None:  # bypass: the MLP of member k reads the attention of k-D..k-1
            bypass_in = bypass_input(list(self.gather.all_gather(attn).unbind(0)), self.k, self.bypass)
        part = member_mlp(self.layer, x, attn, bypass_in)  # down_proj partial sums
        if self.t == 0:
            part = part + attn  # a_k once per member, inside the one all-reduce of the group
        return x + self.total.all_reduce(part)


class _StateStage:
    """ungrouped="rank0": the hidden state member 0 computed alone reaches the other members."""
    kind = "state"

    def __init__(self, comm: Comm):
        self.comm = comm

    def __call__(self, x: torch.Tensor, **_) -> torch.Tensor:
        return self.comm.broadcast(x.contiguous())


def uses_sliding_window(config) -> bool:
    """Whether every layer attends within a sliding window (Mistral; Qwen2 with use_sliding_window)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[0] == "sliding_attention"  # mixed layer types are refused by check_supported
    return getattr(config, "sliding_window", None) is not None


class _ModuleReader:
    """SafetensorsReader's interface over an in-memory model's tensors (slices are copied)."""

    def __init__(self, model: nn.Module):
        self.tensors = model.state_dict()

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        t = self.tensors[name].detach()
        part = t if dim is None else t[start:stop] if dim == 0 else t[:, start:stop]
        return part.clone(memory_format=torch.contiguous_format)


# ---- the static KV cache ------------------------------------------------------------------------
CACHE_BLOCK = 64  # cache slots are rounded up to a multiple of this: runs of nearby lengths share a cache and a graph


class StaticKV:
    """This rank's KV cache for batches of one shape: keys and values [B, its KV heads, L, head_dim] of every
    layer it runs, allocated once and written in place; and the tables a step reads, also made once:
        valid  [B, L]   which slots hold real tokens (left padding: False); set by each prefill
        causal [L, L]   slot i may attend to slot j: j <= i (and j > i - window for sliding-window models)
        cos, sin [L, head_dim]  rotary tables of positions 0..L-1 (a position never exceeds its slot)
    transformers' attention modules call `update(k, v, layer_idx)` (all of the cache interface they use) and
    attend over all L slots under `mask(slots)`; `slots` (on the device) says where this step's tokens go."""

    def __init__(self, kv_heads: dict[int, int], batch: int, length: int, head_dim: int, window: int | None,
                 rotary: nn.Module, dtype: torch.dtype, device: torch.device):
        self.length = length
        self.keys = {i: torch.zeros(batch, h, length, head_dim, dtype=dtype, device=device) for i, h in kv_heads.items()}
        self.values = {i: torch.zeros_like(k) for i, k in self.keys.items()}
        self.valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        j = torch.arange(length, device=device)
        self.causal = j[None, :] <= j[:, None]
        if window is not None:
            self.causal &= j[None, :] > j[:, None] - window
        cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), j[None])
        self.cos, self.sin = cos[0], sin[0]
        self.slots = j[:1]
        for t in (*self.keys.values(), *self.values.values(), self.valid, self.causal, self.cos, self.sin):
            torch._dynamo.mark_static_address(t)  # CUDA graphs read them where they are (no copy per replay)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Write this step's keys/values [B, h, q, d] at `slots`; return the whole layer cache (all L slots)."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key)
        v.index_copy_(2, self.slots, value)
        return k, v

    def mask(self, slots: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, L] boolean: the queries at `slots` see the real tokens of earlier slots (window), and
        themselves (a padding slot sees only itself: an empty row is NaN in some attention kernels)."""
        own = torch.arange(self.length, device=slots.device)[None, :] == slots[:, None]
        return (self.causal[slots][None] & (self.valid[:, None, :] | own[None]))[:, None]

    def reset(self, attention_mask: torch.Tensor | None, prompt: int) -> None:
        """A new batch: zero keys and values (stale slots stay masked, but must hold no NaN), mark its padding."""
        for t in (*self.keys.values(), *self.values.values()):
            t.zero_()
        self.valid.fill_(True)
        if attention_mask is not None:
            self.valid[:, :prompt] = attention_mask.bool()


@dataclass
class Sequences:
    """Decoding state of a batch, on the device (a decode step reads no host value): this rank's cache, the
    slot the next token goes to (0-d), the tokens' next positions [B, 1]; and, on the host, the steps left."""
    cache: StaticKV
    slot: torch.Tensor
    next_position: torch.Tensor
    room: int


# ---- compiling ----------------------------------------------------------------------------------
COMPILE_MODES = COMPILES[1:]  # none (eager) or a torch.compile mode; reduce-overhead: + CUDA graphs
RECOMPILE_LIMIT = 64  # graphs per compiled function (dynamo's default 8 is shared by every Runtime of a process)


def compile_mode(mode: str, device_type: str) -> str:
    """The torch.compile mode of `runtime.compile`: "auto" is reduce-overhead (CUDA graphs) on CUDA and on the
    CPU "default" (measured here: compiled decode beats eager; reduce-overhead has no graphs to capture on a CPU)."""
    if mode == "auto":
        return "reduce-overhead" if device_type == "cuda" else "default"
    if mode not in COMPILE_MODES:
        raise CqilError(f"runtime compile={mode!r} is not one of auto, {', '.join(COMPILE_MODES)}")
    return mode


class Runtime:
    """CQIL (or tensor-parallel, or original) inference on this rank's share of a P x T mesh.

    `source`: a checkpoint (bundled name or safetensors directory: rank-local partial reads) or an
    in-memory model (its slices are copied). mesh=None: one process. Every rank builds a Runtime with
    the same arguments and then calls the same methods in the same order (they contain collectives).

    One step function runs every setup (`_step`: embedding, this rank's stages with their collectives,
    the head), eager or compiled whole per rank (`compile`: none | default | reduce-overhead | auto;
    `compiled(mode)` gives a twin sharing weights, communicators and caches). Compiled: fullgraph (a graph
    break is an error, not a slowdown), static shapes (what CUDA graphs replay): a decode graph per batch size
    and cache length (CACHE_BLOCK), a prefill graph per batch size and prompt length (callers with prompts of
    many lengths bucket them by left padding, which is masked: cqil generate pads to a multiple of 32 tokens).
    """

    def __init__(self, source: str | nn.Module, plan: Plan, mesh: Mesh | None = None, variant: Variant = Variant(),
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 timeout_s: float = 60.0, trust_remote_code: bool = False, compile: str = "none",
                 startup_timeout_s: float = 1800.0):
        dtype = models.dtype_of(dtype) if isinstance(dtype, str) else dtype
        if isinstance(source, nn.Module):
            check_supported(source)
            config, reader = source.config, _ModuleReader(source)
            skel = models.skeleton(config, type(source))
            self.dtype = dtype or next(source.parameters()).dtype
        else:
            config = models.load_config(source, trust_remote_code)
            reader = models.SafetensorsReader(source)
            skel = models.skeleton(config, trust_remote_code=trust_remote_code)
            check_supported(skel)
            models.check_checkpoint(source, skel, reader)
            self.dtype = dtype or torch.float32
        self.device = mesh.device if mesh is not None else torch.device(device or "cpu")
        self.config, self.mesh = config, mesh
        P, T = (mesh.P, mesh.T) if mesh is not None else (1, 1)
        self.rank = mesh.rank if mesh is not None else 0
        self.k, self.t = self.rank // T, self.rank % T
        self.schedule: Schedule = make_schedule(plan, config.num_hidden_layers, P, T, variant)
        check_shardable(self.schedule, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        self.plan, self.variant = plan, variant
        self.window = getattr(config, "sliding_window", None) if uses_sliding_window(config) else None

        dec = decoder(skel)
        with torch.device(self.device):  # rotary buffers: computed, not read
            self.rotary = type(dec.rotary_emb)(config=config)
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise CqilError(f"rope type {self.rotary.rope_type!r} changes its frequencies with the sequence length; "
                            "the runtime's rotary tables are computed once per cache, so it does not support it")
        self._load(skel, dec, reader)
        if mesh is not None and (world := dist.get_world_size()) > 1:  # every rank has loaded: collectives may start
            arrive(dist.distributed_c10d._get_default_store(), f"cqil/loaded/{next(_RUNTIMES)}", self.rank, world,
                   startup_timeout_s, "finish loading its weights")
        self.comms: dict[str, Comm] = {}  # axis -> communicator, for every axis of size > 1
        by_group: dict[int, Comm] = {}
        for axis, group in (mesh.groups if mesh is not None else {}).items():
            if id(group) not in by_group:  # T = 1: member and world are one group, one communicator
                by_group[id(group)] = make_comm(group, variant.comm, timeout_s)
            self.comms[axis] = by_group[id(group)]
        self.stages = [s for st in self.schedule.stages if (s := self._stage(st, list(dec.layers))) is not None]
        head = next(st for st in self.schedule.stages if st.kind == "head")
        self.head_split = head.split
        self.head_comm = self.comms[head.collectives[0].axis] if head.collectives else None
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_heads = {i: dec.layers[i].self_attn.k_proj.weight.shape[0] // self.head_dim for i in self.layer_ids}
        self.caches: dict[tuple[int, int], StaticKV] = {}  # (batch, slots) -> cache, reused run after run
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self._set_compile(compile)

    # ---- building ------------------------------------------------------------------------
    def _load(self, skel: nn.Module, dec: nn.Module, reader) -> None:
        """Materialize exactly this rank's shares on its device; everything else stays on `meta`."""
        shapes = {n: tuple(p.shape) for n, p in skel.named_parameters()}
        self.model_bytes = sum(math.prod(s) for s in shapes.values()) * self.dtype.itemsize  # all parameters
        tied = HEAD not in shapes  # the head is the embedding matrix (named_parameters lists it once)
        mine = shares(self.schedule, self.rank, shapes, tied, self.config.num_attention_heads,
                      self.config.num_key_value_heads)
        head = None
        for s in mine:
            if s.name == HEAD:
                head = s
                continue
            module_name, _, attr = s.name.rpartition(".")
            tensor = reader.read(s.source, s.dim, s.start, s.stop).to(self.device, self.dtype)
            setattr(skel.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
        runs = {p.layer for p in self.schedule.parts(self.rank) if p.kind == "layer"}
        self.layer_ids = sorted(runs)
        for i in runs:  # row-parallel biases live on tp shard 0 only; elsewhere the module has none
            for name in ROW_PARALLEL:
                module = dec.layers[i].get_submodule(name)
                if module.bias is not None and module.bias.is_meta:
                    module.bias = None
        kinds = {p.kind for p in self.schedule.parts(self.rank)}
        self.embed = dec.embed_tokens if "embed" in kinds else None
        self.norm = dec.norm if "norm" in kinds else None
        used = [dec.layers[i] for i in runs] + [m for m in (self.embed, self.norm) if m is not None]
        missing = [n for m in used for n, p in m.named_parameters() if p.is_meta]
        if missing:
            raise CqilError(f"the checkpoint does not provide {missing[0]} (and {len(missing) - 1} more) in the "
                            "layout cqil expects (LLaMA-family parameter names); is it a complete checkpoint?")
        self.vocab = self.config.vocab_size
        self.head, self.vocab_offset, self.head_rows = None, 0, self.vocab
        if head is not None:
            if head.view:  # tied, and the whole embedding is here: the head is a view of it
                weight = dec.embed_tokens.weight
                self.head = weight if head.dim is None else weight[head.start:head.stop]
            else:
                self.head = reader.read(head.source, head.dim, head.start, head.stop).to(self.device, self.dtype)
            if head.dim is not None:
                self.vocab_offset, self.head_rows = head.start, -(-self.vocab // self.schedule.world)
        self._held = used

    def _stage(self, st: Stage, layers: list[nn.Module]):
        """This rank's computation of one schedule stage (None: it takes no part)."""
        if self.k not in st.members or st.kind in ("embed", "head"):
            return None  # embed and head run in _step()
        comms = {c.role: self.comms[c.axis] for c in st.collectives}
        if st.kind == "layer":
            return _LayerStage(layers[st.layers[0]], comms.get("attention"))
        if st.kind == "state":
            return _StateStage(comms["state"])
        if self.schedule.P == 1:  # one process: the single-process definition itself
            return _Group([layers[i] for i in st.layers], self.plan.bypass)
        mine = st.layers[self.k] if self.k < len(st.layers) else None
        return _GroupStage(layers[mine] if mine is not None else None, self.k, self.t, self.plan.bypass,
                           comms.get("attention"), comms.get("bypass"), comms["group"])

    def _set_compile(self, mode: str) -> None:
        """Eager steps (none), or steps compiled whole with torch.compile in `mode` (see the class docstring)."""
        self.mode = compile_mode(mode, self.device.type)
        self._prefill_fn, self._decode_fn = self._prefill_step, self._decode_step
        self._shapes: set[tuple] = set()  # (step, shapes) this twin has run: a new one compiles first
        if self.mode != "none":
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            options = dict(fullgraph=True, mode=self.mode)
            self._prefill_fn = torch.compile(self._prefill_step, dynamic=False, **options)
            self._decode_fn = torch.compile(self._decode_step, dynamic=False, **options)

    def compiled(self, mode: str) -> "Runtime":
        """A twin of this runtime (the same weights, communicators and caches) that runs its steps in `mode`."""
        twin = copy.copy(self)
        twin._set_compile(mode)
        return twin

    @property
    def comm(self) -> Comm | None:
        """The communicator of all ranks (world axis; None in one process)."""
        return self.comms.get("world")

    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers this rank materialized (each storage once; `meta` holds none)."""
        tensors = [t for m in self._held for t in (*m.parameters(), *m.buffers())]
        tensors += [t for t in (self.head, *self.rotary.buffers()) if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not t.is_meta}
        return sum(storages.values())

    def cache(self, batch: int, slots: int) -> StaticKV:
        """This rank's cache for `batch` sequences of up to `slots` tokens (rounded up to CACHE_BLOCK), made once."""
        slots = -(-slots // CACHE_BLOCK) * CACHE_BLOCK
        if (batch, slots) not in self.caches:
            self.caches[batch, slots] = StaticKV(self.kv_heads, batch, slots, self.head_dim, self.window, self.rotary,
                                                 self.dtype, self.device)
        return self.caches[batch, slots]

    # ---- the step: one function for every setup, eager or compiled ------------------------
    def _hidden(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> torch.Tensor:
        """Hidden states [B, q, H] after the last layer (before the final norm) of tokens [B, q] at cache
        `slots` [q] and rotary `positions` [B, q], on the ranks that run the head."""
        kv.slots = slots
        if self.embed is not None:
            x = self.embed(tokens)
        else:  # filled by member 0's broadcast before this rank's first stage
            x = torch.zeros(*tokens.shape, self.config.hidden_size, dtype=self.dtype, device=tokens.device)
        kwargs = dict(attention_mask=kv.mask(slots), position_ids=positions, past_key_values=kv, use_cache=True,
                      position_embeddings=(kv.cos[positions], kv.sin[positions]))
        for stage in self.stages:
            x = stage(x, **kwargs)
        return x

    def _next(self, x: torch.Tensor, with_logits: bool):
        """The next tokens [B] of pre-norm states [B, H] (and the full logits [B, V] if asked)."""
        if with_logits:
            logits = self.logits(x)
            return logits.argmax(-1), logits
        return self.greedy(x), None

    def _step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv: StaticKV,
              with_logits: bool):
        """One step of every rank: tokens [B, q] in, the next tokens [B] (and logits [B, V] or None) out."""
        return self._next(self._hidden(tokens, slots, positions, kv)[:, -1], with_logits)

    # two code objects, so that dynamo keeps prefill's graphs (dynamic shapes) apart from decode's (static)
    def _prefill_step(self, *args):
        return self._step(*args)

    def _decode_step(self, *args):
        return self._step(*args)

    def _run(self, fn, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv: StaticKV,
             with_logits: bool):
        """Run a step. Compiled: a step's first call at a shape compiles it first, seconds to minutes, each rank
        at its own speed, so its collectives wait up to startup_timeout_s (then timeout_s again); a collective
        that fails inside the graph ends with one line naming the rank."""
        if self.mode == "none":
            return fn(tokens, slots, positions, kv, with_logits)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs were consumed (or cloned)
        key = (fn, tuple(tokens.shape), kv.length, with_logits)
        first = key not in self._shapes
        comms = list({id(c): c for c in self.comms.values()}.values()) if first else []
        for c in comms:
            c.set_timeout(self.startup_timeout_s)
        try:
            out = fn(tokens, slots, positions, kv, with_logits)
        except dist.DistError as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CqilError(f"rank {self.rank}: a collective of the compiled step failed: {line} "
                            "(if another rank died or timed out, its error is above)") from None
        finally:
            for c in comms:
                c.set_timeout(self.timeout_s)
        self._shapes.add(key)
        return out

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's logits [..., head_rows] (its vocabulary shard, or all of them) of pre-norm states."""
        return nn.functional.linear(self.norm(x), self.head)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full logits [..., V] on every rank, from pre-norm hidden states."""
        if self.head is None:  # member 0 runs the whole head and sends the logits
            return self.head_comm.broadcast(x.new_zeros((*x.shape[:-1], self.vocab)))
        out = self.local_logits(x)
        if self.head_split != "vocab":
            return self.head_comm.broadcast(out.contiguous()) if self.head_comm is not None else out
        out = nn.functional.pad(out, (0, self.head_rows - out.shape[-1]), value=float("-inf"))  # short last shard
        parts = self.head_comm.all_gather(out)  # [P*T, ..., rows]
        return torch.cat(parts.unbind(0), dim=-1)[..., :self.vocab]

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """argmax token ids [B] of pre-norm hidden states [B, H]; sharded head: (max, id) pairs only."""
        if self.head is None:
            return self.head_comm.broadcast(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        local = self.local_logits(x)
        if self.head_split != "vocab":
            ids = local.argmax(-1)
            return self.head_comm.broadcast(ids) if self.head_comm is not None else ids
        best, idx = local.max(-1)
        pairs = torch.stack([best.float(), (idx + self.vocab_offset).float()], -1)  # ids < 2^24: exact
        everyone = self.head_comm.all_gather(pairs)  # [P*T, B, 2]
        winner = everyone[..., 0].argmax(0)  # ties: the lowest rank, i.e. the lowest id, as argmax does
        return everyone[winner, torch.arange(x.shape[0], device=x.device), 1].long()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits [B, T, V] of a (left-padded) batch (eager; a cache of exactly T slots, used once)."""
        B, T = input_ids.shape
        kv = StaticKV(self.kv_heads, B, T, self.head_dim, self.window, self.rotary, self.dtype, self.device)
        kv.reset(attention_mask, T)
        slots = torch.arange(T, device=input_ids.device)
        return self.logits(self._hidden(input_ids, slots, _positions(input_ids, attention_mask), kv))

    # ---- generation ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                with_logits: bool = False, *, max_new_tokens: int):
        """Run the prompt [B, T] (left-padded if masked) into a cache with room for `max_new_tokens` new tokens
        (this first one and max_new_tokens - 1 decode steps): (first new token [B], state[, logits [B, V]])."""
        if max_new_tokens < 1:
            raise CqilError(f"max_new_tokens={max_new_tokens}: a run makes at least one new token")
        B, T = input_ids.shape
        kv = self.cache(B, T + max_new_tokens - 1)
        kv.reset(attention_mask, T)
        positions = _positions(input_ids, attention_mask)
        slots = torch.arange(T, device=input_ids.device)
        token, logits = self._run(self._prefill_fn, input_ids, slots, positions, kv, with_logits)
        state = Sequences(kv, torch.tensor(T, device=input_ids.device), positions[:, -1:] + 1, kv.length - T)
        return (token.clone(), state, logits.clone()) if with_logits else (token.clone(), state)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, state: Sequences, with_logits: bool = False):
        """One decoding step for tokens [B]: (next token [B], state[, logits [B, V]]). No host sync: the slot and
        positions advance on the device; the outputs are fresh tensors (a CUDA graph's own are reused)."""
        if state.room < 1:
            raise CqilError(f"the KV cache of this batch is full ({state.cache.length} slots); "
                            "prefill with a larger max_new_tokens")
        token, logits = self._run(self._decode_fn, tokens[:, None], state.slot.view(1), state.next_position,
                                  state.cache, with_logits)
        state.slot += 1
        state.next_position += 1
        state.room -= 1
        return (token.clone(), state, logits.clone()) if with_logits else (token.clone(), state)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, with_logits: bool = False):
        """Greedy generation: new tokens [B, max_new_tokens] (and their logits [B, N, V] if asked)."""
        out = self.prefill(input_ids, attention_mask, with_logits, max_new_tokens=max_new_tokens)
        tokens, logits = [out[0]], [out[2]] if with_logits else []
        for _ in range(max_new_tokens - 1):
            out = self.decode(tokens[-1], out[1], with_logits)
            tokens.append(out[0])
            logits += [out[2]] if with_logits else []
        new = torch.stack(tokens, 1)
        return (new, torch.stack(logits, 1)) if with_logits else new


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position ids as transformers' generate() makes them (left padding: count real tokens only)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
