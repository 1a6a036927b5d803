"""Multi-device CQIL: one process per device, member k of every group on rank k (torch.distributed).

Started by torchrun (`cqil bench devices=P` launches it; `torchrun --nproc_per_node P -m cqil bench
devices=P` works too). Backend gloo on CPU, nccl on CUDA. The ranks form a 2-D device mesh
(torch.distributed.device_mesh) with axes

    member  size P: member k of every group runs on the ranks with member coordinate k;
    tp      size T: tensor parallelism inside every layer a rank runs (T=1: off).

A group (cqil.modeling's definition, reused here: member_attention, bypass_input, member_delta):

    a_k   = Attn_k(RMSNorm_k(x))                   on member k; updates only its own KV cache entry
    (D>0) all-gather of the a_j over `member`       the bypass: the MLP of member k reads a_{k-D..k-1}
    d_k   = member_delta(layer_k, x, a_k, bypass)   on member k
    y     = x + all-reduce_member(d_k)              one all-reduce per group

Where everything else runs, and why (`ungrouped`, measured in `cqil bench`): layers outside
groups, the embedding and the final norm either run
  - "replicated" on every rank: after a group's all-reduce every rank holds the full hidden state,
    so the next ungrouped layers cost no communication at all. Best where each device has its own
    memory (GPUs): nothing is shared, nothing waits. Price: every rank holds every weight.
  - "rank0" on member 0 only, which broadcasts its hidden state to the other members before the
    next group (one broadcast per run of ungrouped layers). Best where the devices share one
    memory bus (CPU cores): replicated ranks stream the same weights twice and slow each other
    (~10% per decode step measured on this 2-core machine), while here the other ranks only wait.
Never "rank 0 and a broadcast of every layer": that only adds communication.
The LM head is the largest single matrix of a small model (SmolLM2-135M: 28M of 135M parameters,
~1/6 of a decode step on one CPU core) and decoding reads all of it per token, so by default
(`lm_head="sharded"`) it is split by vocabulary rows over the member axis and greedy decoding
exchanges only one (max logit, token id) pair per sequence and rank. `lm_head="replicated"` runs
it whole on every rank (with ungrouped="rank0": on member 0, which broadcasts the token ids).
Note that the plan's ideal reduction g*(P-1)/n counts layers only: a sharded head can push the
measured reduction past it, so `cqil bench` reports both placements.

Every rank holds a DynamicCache keyed by layer_idx and updates only the layers it runs. Ranks that
compute the head compute the same argmax from bitwise-identical inputs (the collectives return
identical results on every rank), so generated tokens need no broadcast there.

Communication backends for the member axis (`comm`): "torch" (torch.distributed collectives: gloo
or nccl), or "shm" for ranks of one CPU host: gloo's TCP all-reduce of one decode token's hidden
state costs ~1-2 ms here, about what a decoder layer computes, which would eat what a group saves;
a shared-memory segment with spin-waiting does it in microseconds. "auto" picks shm on one x86 host.

Failure: init_process_group and every collective time out after `timeout_s` (shm: the spin-wait
has the same deadline) with a CqilError naming the rank; a dead peer breaks gloo/nccl sockets at
once; torchrun's agent ends the other ranks as soon as one exits non-zero. No path waits forever.

Tensor parallelism (T > 1): every layer a rank runs is sharded over `tp` with torch's
tensor-parallel API (q/k/v/gate/up column-wise, o/down row-wise), the same function that gives the
tensor-parallel baseline (plan without groups, mesh (1, T)). Left for later: fusing the row-wise
all-reduce over `tp` with the member all-reduce (one all-reduce over the whole mesh on partial
sums), a vocabulary-parallel LM head over `tp`, and sequence parallelism.
"""
from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from . import CqilError
from .modeling import _Group, bypass_input, check_supported, decoder, member_attention, member_delta
from .plan import Plan, PlanError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
MESH_AXES = ("member", "tp")


# ---- process group and mesh --------------------------------------------------------------
def under_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


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


def init_distributed(devices: int, tp: int = 1, timeout_s: float = 60.0, device_type: str = "cpu") -> DeviceMesh:
    """Join the torchrun job (gloo on CPU, nccl on CUDA) and return the (member, tp) mesh."""
    check_world_size(devices, tp)
    if device_type not in BACKENDS:
        raise CqilError(f"device {device_type!r} is not supported by the runtime; use cpu or cuda")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device_type], timeout=timedelta(seconds=timeout_s))
    return make_mesh(devices, tp, device_type)


def make_mesh(member: int, tp: int = 1, device_type: str = "cpu") -> DeviceMesh:
    """A (member, tp) mesh over all ranks; tp varies fastest, so a member's tp ranks are neighbours."""
    return init_device_mesh(device_type, (member, tp), mesh_dim_names=MESH_AXES)


# ---- collectives of the member axis --------------------------------------------------------
class TorchComm:
    """all_reduce_ / broadcast_ / all_gather over one process group with torch.distributed (gloo or nccl)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.name = dist.get_backend(group)

    def _fail(self, op: str, e: Exception) -> CqilError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return CqilError(f"rank {dist.get_rank()}: {op} failed: {first} (if another rank died or timed out, its error is above)")

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the group in place."""
        try:
            dist.all_reduce(t, group=self.group)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("all_reduce", e) from None
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` with group rank src's `t`."""
        try:
            dist.broadcast(t, group=self.group, group_src=src)
        except (RuntimeError, dist.DistError) as e:
            raise self._fail("broadcast", e) from None
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
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
                                    f"member rank {i // self.FLAG_STRIDE} in {op} (a rank died or is stuck)")
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

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` (contiguous) over the group in place."""
        for chunk in self._chunks(t.view(-1)):
            torch.sum(self._exchange(chunk, "all_reduce"), dim=0, out=chunk)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` (contiguous) with group rank src's `t`."""
        for chunk in self._chunks(t.view(-1)):
            slots = self._exchange(chunk, "broadcast", contribute=self.rank == src)
            if self.rank != src:
                chunk.copy_(slots[src])
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's `t`, in rank order."""
        out = t.new_empty((self.size, t.numel()))
        offset = 0
        for chunk in self._chunks(t.contiguous().view(-1)):
            out[:, offset:offset + chunk.numel()] = self._exchange(chunk, "all_gather")
            offset += chunk.numel()
        return out.view(self.size, *t.shape)


Comm = TorchComm | ShmComm
COMMS = ("auto", "torch", "shm")
LM_HEADS = ("sharded", "replicated")
UNGROUPED = ("replicated", "rank0")


def make_comm(group: dist.ProcessGroup, kind: str = "auto", timeout_s: float = 60.0) -> Comm:
    """The member-axis communicator: shm for CPU ranks on one x86-64 host under `auto`, else torch."""
    if kind not in COMMS:
        raise CqilError(f"runtime comm {kind!r} is not one of {', '.join(COMMS)}")
    if kind == "auto":
        hosts = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        one_host = len(set(hosts)) == 1
        kind = "shm" if dist.get_backend(group) == "gloo" and one_host and platform.machine() in ("x86_64", "AMD64") else "torch"
    return ShmComm(group, timeout_s) if kind == "shm" else TorchComm(group)


# ---- tensor parallelism inside layers (the mesh's tp axis) ----------------------------------
def tensor_parallel(layers: list[nn.Module], tp_mesh: DeviceMesh, config) -> None:
    """Shard attention heads and MLP columns of `layers` over `tp_mesh` in place (torch TP API)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = tp_mesh.size()
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, name) % t:
            raise CqilError(f"tensor parallelism over {t} devices needs {name} divisible by {t}, "
                            f"but the model has {getattr(config, name)}; choose tp among its divisors")
    plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan |= {"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
             "self_attn.o_proj": RowwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in layers:
        parallelize_module(layer, tp_mesh, plan)


# ---- the runtime -----------------------------------------------------------------------
class _MemberStage:
    """One group on one rank: member k's layer (None if the group is smaller than P), collectives."""

    def __init__(self, layer: nn.Module | None, k: int, bypass: int, comm: Comm):
        self.layer, self.k, self.bypass, self.comm = layer, k, bypass, comm

    def __call__(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.layer is None:  # no member here: contribute zeros to the exchanges
            if self.bypass:
                self.comm.all_gather(torch.zeros_like(x))
            return x + self.comm.all_reduce_(torch.zeros_like(x))
        attn = member_attention(self.layer, x, **attn_kwargs)
        bypass_in = None
        if self.bypass:  # only with bypass: the MLP of member k reads the attention of k-D..k-1
            bypass_in = bypass_input(list(self.comm.all_gather(attn).unbind(0)), self.k, self.bypass)
        delta = member_delta(self.layer, x, attn, bypass_in)
        return x + self.comm.all_reduce_(delta)


class _FromMember0:
    """ungrouped="rank0": the hidden state that member 0 computed alone reaches the other members."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def __call__(self, x: torch.Tensor, **_) -> torch.Tensor:
        return self.comm.broadcast_(x)


@dataclass
class Sequences:
    """Decoding state of a batch: this rank's KV cache, the 2-D mask (None: no padding), next positions."""
    cache: DynamicCache
    attention_mask: torch.Tensor | None
    next_position: torch.Tensor  # [B, 1]


class Runtime:
    """CQIL inference on this rank's share of a (member, tp) mesh; mesh=None runs in one process.

    Every rank builds a Runtime over the same model and plan and then calls the same methods in
    the same order (they contain collectives). `prefill`/`decode` are the timed steps of greedy
    generation; `generate` chains them; `forward` returns full logits (for checks).
    """

    def __init__(self, model: nn.Module, plan: Plan, mesh: DeviceMesh | None = None,
                 comm: str | Comm = "auto", lm_head: str = "sharded", ungrouped: str = "replicated",
                 timeout_s: float = 60.0):
        check_supported(model)
        if lm_head not in LM_HEADS:
            raise CqilError(f"runtime lm_head {lm_head!r} is not one of {', '.join(LM_HEADS)}")
        if ungrouped not in UNGROUPED:
            raise CqilError(f"runtime ungrouped {ungrouped!r} is not one of {', '.join(UNGROUPED)}")
        self.config = model.config
        dec = decoder(model)
        layers = list(dec.layers)  # the raw layers, also when a plan is already applied to the model
        self.embed, self.norm, self.rotary = dec.embed_tokens, dec.norm, dec.rotary_emb
        n = len(layers)
        plan.validate(n)
        self.plan = plan
        self.size = mesh["member"].size() if mesh is not None else 1
        self.tp = mesh["tp"].size() if mesh is not None else 1
        if plan.groups and self.size > 1 and plan.group_size != self.size:
            raise PlanError(f"the plan's groups have up to {plan.group_size} layers but the runtime has "
                            f"{self.size} devices on the member axis; run with devices={plan.group_size}")
        self.k = mesh["member"].get_local_rank() if mesh is not None else 0
        self.comm = None
        if self.size > 1:
            self.comm = comm if not isinstance(comm, str) else make_comm(mesh["member"].get_group(), comm, timeout_s)

        # ungrouped="rank0": layers outside groups (and a replicated LM head) run on member 0 only
        self.first_only = ungrouped == "rank0" and self.size > 1
        self.stages: list = []
        local: list[int] = []  # layers this rank runs
        stages = plan.stages(n)
        for j, g in enumerate(stages):
            if len(g) == 1:
                if self.k == 0 or not self.first_only:
                    self.stages.append(layers[g[0]])
                    local.append(g[0])
            elif self.size == 1:
                self.stages.append(_Group([layers[i] for i in g], plan.bypass))  # the definition itself
                local.extend(g)
            else:
                if self.first_only and j > 0 and len(stages[j - 1]) == 1:
                    self.stages.append(_FromMember0(self.comm))
                mine = g[self.k] if self.k < len(g) else None
                self.stages.append(_MemberStage(layers[mine] if mine is not None else None, self.k, plan.bypass, self.comm))
                local.extend([mine] if mine is not None else [])
        self.mask_layer = local[0]  # a layer whose cache this rank updates: sizes the attention mask
        if self.tp > 1:
            tensor_parallel([layers[i] for i in local], mesh["tp"], self.config)

        head = model.get_output_embeddings().weight
        self.vocab = head.shape[0]
        self.head_on_first = self.first_only and lm_head == "replicated"  # member 0 computes, tokens broadcast
        if self.first_only and not self.head_on_first and len(stages[-1]) == 1:
            self.stages.append(_FromMember0(self.comm))  # the sharded head needs the final state everywhere
        if lm_head == "sharded" and self.size > 1:
            rows = -(-self.vocab // self.size)
            self.vocab_offset = rows * self.k
            self.head = head[self.vocab_offset:self.vocab_offset + rows]  # a view: tied weights stay tied
            self.head_rows = rows
        else:
            self.vocab_offset, self.head, self.head_rows = 0, head, self.vocab

    # ---- the forward ------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
               cache: DynamicCache | None) -> torch.Tensor:
        """Final-norm hidden states [B, T, H] (all ranks end with the same, replicated)."""
        x = self.embed(input_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=self.mask_layer)
        kwargs = dict(attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=cache is not None, position_embeddings=self.rotary(x, position_ids))
        for stage in self.stages:
            x = stage(x, **kwargs)
        return self.norm(x)

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's logits [..., head_rows] (its vocabulary shard, or all of them)."""
        return nn.functional.linear(h, self.head)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits [..., V] on every rank (gathers the shards if the head is sharded)."""
        if self.head_on_first:
            out = self.local_logits(h) if self.k == 0 else h.new_empty((*h.shape[:-1], self.vocab))
            return self.comm.broadcast_(out)
        out = self.local_logits(h)
        if self.head_rows == self.vocab:
            return out
        pad = self.head_rows - out.shape[-1]  # the last shard may be short
        out = nn.functional.pad(out, (0, pad), value=float("-inf"))
        parts = self.comm.all_gather(out)  # [P, ..., rows]
        return torch.cat(parts.unbind(0), dim=-1)[..., :self.vocab]

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """argmax token ids [B] of hidden states [B, H]; sharded head: exchange (max, id) pairs only."""
        if self.head_on_first:
            ids = self.local_logits(h).argmax(-1) if self.k == 0 else h.new_empty(h.shape[0], dtype=torch.long)
            return self.comm.broadcast_(ids)
        local = self.local_logits(h)
        if self.head_rows == self.vocab:
            return local.argmax(-1)
        best, idx = local.max(-1)
        pairs = torch.stack([best.float(), (idx + self.vocab_offset).float()], -1)  # ids < 2^24: exact
        everyone = self.comm.all_gather(pairs)  # [P, B, 2]
        winner = everyone[..., 0].argmax(0)  # ties: the lowest rank, i.e. the lowest id, as argmax does
        return everyone[winner, torch.arange(h.shape[0]), 1].long()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits [B, T, V] of a (left-padded) batch, no cache."""
        return self.logits(self.hidden(input_ids, attention_mask, _positions(input_ids, attention_mask), None))

    # ---- greedy generation ------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                with_logits: bool = False):
        """Run the prompt [B, T] (left-padded if masked): (first new token [B], state[, logits [B, V]])."""
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, no mask to build or grow
        positions = _positions(input_ids, attention_mask)
        cache = DynamicCache(config=self.config)
        h = self.hidden(input_ids, attention_mask, positions, cache)[:, -1]
        state = Sequences(cache, attention_mask, positions[:, -1:] + 1)
        return self._next(h, state, with_logits)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, state: Sequences, with_logits: bool = False):
        """One decoding step for tokens [B]: (next token [B], state[, logits [B, V]])."""
        if state.attention_mask is not None:
            state.attention_mask = nn.functional.pad(state.attention_mask, (0, 1), value=1)
        h = self.hidden(tokens[:, None], state.attention_mask, state.next_position, state.cache)[:, -1]
        state.next_position = state.next_position + 1
        return self._next(h, state, with_logits)

    def _next(self, h: torch.Tensor, state: Sequences, with_logits: bool):
        if with_logits:
            logits = self.logits(h)
            return logits.argmax(-1), state, logits
        return self.greedy(h), state

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16, with_logits: bool = False):
        """Greedy generation: new tokens [B, max_new_tokens] (and their logits [B, N, V] if asked)."""
        out = self.prefill(input_ids, attention_mask, with_logits)
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
