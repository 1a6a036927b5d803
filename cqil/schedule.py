"""The schedule: what every rank of a P x T device mesh runs, holds and exchanges, as one pure function.

    make_schedule(plan, n_layers, P, T, variant) -> Schedule

is the one description of a CQIL (or tensor-parallel) run that three consumers read:
  - cqil.runtime builds its stage objects from `Schedule.stages` (and loads `Schedule.parts(rank)`);
  - memory accounting: `shares(schedule, rank, shapes)` (which tensor slices a rank holds) and
    `rank_bytes(...)`, with shapes from a checkpoint or from `llama_shapes(config)`;
  - the latency model sums costs over the stages and their `Collective.nbytes`.
No torch, no torch.distributed: standard library only, so it can be evaluated for a 70B shape anywhere.

The mesh. World size P*T; rank r has member coordinate k = r // T and tp coordinate t = r % T (tp
varies fastest, so a member's T ranks are neighbours, on one host/NVLink island). Axes of collectives:
    "member"  the P ranks with the same t (k = 0..P-1)
    "tp"      the T ranks of one member (t = 0..T-1)
    "world"   all P*T ranks
Collectives over an axis of size 1 are left out of the schedule (they do nothing).

Stages (`Stage.kind`), in execution order:
    "embed"  embedding lookup, whole embedding matrix on the ranks of `members`
    "layer"  one decoder layer outside groups, on the ranks of `members`, weights cut by `split`:
             "full" (whole layer), "tp" (1/T, shard t), "world" (1/(P*T), shard r). A cut layer is
             tensor parallel: q,k,v,gate,up column-parallel (output features; heads and KV heads
             split), o,down row-parallel (input features), so it ends each half with an all-reduce
             of partial sums: (attention) after o_proj, (mlp) after down_proj, over the cut's axis.
             A shard holds whole KV heads with their query heads; where the KV heads do not divide
             evenly, the MLP columns balance the shards' bytes (tp_cuts).
    "group"  a plan group. Member k runs layers[k] (None if the group is shorter than P; with P=1,
             in one process, all of them: the single-process definition) on its T ranks, cut "tp":
               (attention) all-reduce over tp of the o_proj partial sums: member k's MLP norm needs a_k whole
               (bypass)    D > 0: all-gather over member of the a_k (ranks with the same t)
               (group)     ONE all-reduce over world of every rank's down_proj partial sums plus a_k
                           from the rank with t = 0 (so each a_k is counted once):
                           y = x + sum_k (a_k + MLP_k)
    "state"  broadcast over member of member 0's hidden state (variant ungrouped="rank0", before a
             stage that needs it on every member)
    "head"   final norm + LM head on the last position, on the ranks of `members`, `split`:
             "vocab": vocabulary rows cut over all P*T ranks (shard r of ceil(V/(P*T)) rows); greedy
                      decoding all-gathers one (max logit, token id) pair per sequence over world
             "full":  whole head; ungrouped="rank0": member 0 broadcasts the token ids over member
             (Full logits, for sampling, use the same op and axis with payload "logits".)

Variants (`Variant`):
    lm_head    "sharded" (vocabulary-parallel over all P*T ranks) | "replicated" (whole head)
    ungrouped  where the embedding, layers outside groups and a replicated head run:
               "replicated": on every member, each member's copy cut over its T ranks (T=1: whole
                             layers on every rank, no communication at all);
               "rank0": on member 0's T ranks only, whose hidden state is broadcast over member
                        before the next group (one broadcast per run of ungrouped layers);
               "tp": tensor parallel over all P*T ranks (2 world all-reduces per layer).
               With P = 1 the three coincide: tensor parallelism over T.
    comm       the communicator ("auto" | "torch" | "shm"): no effect on the stages, carried for costs.
The plan's bypass D is the plan's own. The tensor-parallel baseline on N devices is
make_schedule(Plan(), n_layers, 1, N, Variant(lm_head=...)).

Bytes. `Collective.nbytes(batch, tokens, hidden, dtype_bytes, vocab)` is the size of the tensor each
rank hands to the collective (all-reduce, broadcast: the whole tensor; all-gather: its own part):
"hidden"/"attention" [B, tokens, H] in the model dtype (tokens = prompt length for a prefill, 1 for a
decode step), "pairs" [B, 2] float32, "token_ids" [B] int64, "logits" [B, vocab shard] model dtype.

Weights. `Schedule.parts(rank)` lists what a rank materializes (embed / norm / head shard / layer
shard); `shares(schedule, rank, shapes)` turns that into the slice of every checkpoint tensor (names
of the LLaMA family: model.embed_tokens, model.layers.<i>.*, model.norm, lm_head). A tied head reads
its rows from the embedding matrix and costs nothing where the whole embedding is held (a view).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from .plan import Plan, PlanError

LM_HEADS = ("sharded", "replicated")
UNGROUPED = ("replicated", "rank0", "tp")
COMMS = ("auto", "torch", "shm")
COMPILES = ("auto", "none", "default", "reduce-overhead")  # cqil.runtime's step: eager, or torch.compile in a mode
AXES = ("member", "tp", "world")
PAYLOAD_DTYPES = {"pairs": 4, "token_ids": 8}  # bytes per element of the fixed-dtype payloads


@dataclass(frozen=True)
class Variant:
    """How a plan runs on the mesh: LM head placement, where ungrouped work runs, the communicator."""
    lm_head: str = "sharded"
    ungrouped: str = "replicated"
    comm: str = "auto"

    def __post_init__(self):
        for key, allowed in (("lm_head", LM_HEADS), ("ungrouped", UNGROUPED), ("comm", COMMS)):
            if getattr(self, key) not in allowed:
                raise PlanError(f"runtime {key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Collective:
    """One collective of a stage, run by every rank of the stage on its own group of `axis`."""
    op: str       # "all_reduce" | "all_gather" | "broadcast" (src: member 0)
    axis: str     # "member" | "tp" | "world"
    payload: str  # "hidden" | "attention" | "pairs" | "token_ids" | "logits"
    role: str     # "attention" | "mlp" | "bypass" | "group" | "state" | "head"

    def nbytes(self, batch: int, tokens: int, hidden: int, dtype_bytes: int, vocab: int = 0) -> int:
        """Bytes of the tensor each rank hands in (see the module docstring); vocab: its logits shard."""
        if self.payload in ("hidden", "attention"):
            return batch * tokens * hidden * dtype_bytes
        if self.payload == "logits":
            return batch * vocab * dtype_bytes
        return batch * (2 if self.payload == "pairs" else 1) * PAYLOAD_DTYPES[self.payload]


@dataclass(frozen=True)
class Stage:
    """One step of the forward; the ranks of `members` (all T ranks of each) compute, others skip it."""
    kind: str                      # "embed" | "layer" | "group" | "state" | "head"
    layers: tuple[int, ...] = ()   # "layer": (i,); "group": the group's layers, member k runs layers[k]
    members: tuple[int, ...] = ()  # member coordinates whose ranks run it
    split: str = "full"            # "full" | "tp" (1/T) | "world" (1/(P*T)) | "vocab" (head rows, 1/(P*T))
    collectives: tuple[Collective, ...] = ()


@dataclass(frozen=True)
class Part:
    """Something a rank materializes: shard `index` of `count` (count 1: whole)."""
    kind: str               # "embed" | "norm" | "head" | "layer"
    layer: int | None = None
    index: int = 0
    count: int = 1


@dataclass(frozen=True)
class Schedule:
    """The stages of a plan on a P x T mesh (see the module docstring); build it with make_schedule."""
    plan: Plan
    n_layers: int
    P: int
    T: int
    variant: Variant
    stages: tuple[Stage, ...] = field(default=())

    @property
    def world(self) -> int:
        return self.P * self.T

    def coords(self, rank: int) -> tuple[int, int]:
        """(member k, tp t) of a rank."""
        return rank // self.T, rank % self.T

    def axis_size(self, axis: str) -> int:
        return {"member": self.P, "tp": self.T, "world": self.world}[axis]

    def axis_ranks(self, axis: str, rank: int) -> tuple[int, ...]:
        """The ranks of `rank`'s group on `axis`, in group-rank order."""
        k, t = self.coords(rank)
        if axis == "member":
            return tuple(m * self.T + t for m in range(self.P))
        if axis == "tp":
            return tuple(k * self.T + u for u in range(self.T))
        return tuple(range(self.world))

    def shard(self, split: str, rank: int) -> tuple[int, int]:
        """(index, count) of `rank`'s share under a stage's split."""
        k, t = self.coords(rank)
        return {"full": (0, 1), "tp": (t, self.T), "world": (rank, self.world), "vocab": (rank, self.world)}[split]

    def parts(self, rank: int) -> tuple[Part, ...]:
        """What `rank` materializes: exactly what its stages run, nothing else."""
        k, _ = self.coords(rank)
        out: list[Part] = []
        for s in self.stages:
            if k not in s.members:
                continue
            index, count = self.shard(s.split, rank)
            if s.kind == "embed":
                out.append(Part("embed"))
            elif s.kind == "layer":
                out.append(Part("layer", s.layers[0], index, count))
            elif s.kind == "group":
                mine = s.layers if self.P == 1 else s.layers[k:k + 1]
                out += [Part("layer", i, index, count) for i in mine]
            elif s.kind == "head":
                out += [Part("norm"), Part("head", None, index, count)]
        return tuple(out)

    def count(self, op: str | None = None, axis: str | None = None, role: str | None = None) -> int:
        """Collective rounds in one forward pass (a stage's collective counts once: its groups run it together)."""
        return sum(1 for s in self.stages for c in s.collectives
                   if op in (None, c.op) and axis in (None, c.axis) and role in (None, c.role))

    def counts(self) -> Counter:
        """Collective rounds per (op, axis, role) in one forward pass."""
        return Counter((c.op, c.axis, c.role) for s in self.stages for c in s.collectives)


def make_schedule(plan: Plan, n_layers: int, P: int = 1, T: int = 1, variant: Variant = Variant()) -> Schedule:
    """The stages of `plan` on n_layers layers, on a P x T mesh, under `variant` (module docstring)."""
    for name, v in (("P", P), ("T", T)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"mesh size {name} must be an integer >= 1, got {v!r}")
    plan.validate(n_layers)
    if plan.groups and P == 1 and T > 1:
        raise PlanError("a plan with groups on one member (P=1) runs in one process only; use P = the group size")
    if plan.groups and P > 1 and plan.group_size != P:
        raise PlanError(f"the plan's groups have up to {plan.group_size} layers but the mesh has P={P} members; "
                        f"run it with devices={plan.group_size}")
    if not plan.groups and P > 1:
        raise PlanError(f"P={P} members need a plan with groups of {P} layers (without groups only T, "
                        "tensor parallelism, spreads the work)")
    world = P * T
    everyone = tuple(range(P))
    outside = (0,) if variant.ungrouped == "rank0" else everyone  # members running ungrouped work
    if variant.ungrouped == "tp" and P > 1:
        layer_split, layer_axis = "world", "world"
    else:  # replicated / rank0: each running member's copy cut over its T ranks (P=1: all three coincide)
        layer_split, layer_axis = ("tp" if T > 1 else "full"), "tp"

    def on(axis: str, *cs: tuple[str, str, str]) -> tuple[Collective, ...]:
        size = {"member": P, "tp": T, "world": world}[axis]
        return tuple(Collective(op, axis, payload, role) for op, payload, role in cs) if size > 1 else ()

    state = Stage("state", members=everyone, collectives=on("member", ("broadcast", "hidden", "state")))
    stages = [Stage("embed", members=outside)]
    holders = outside  # members that hold the current hidden state
    for g in plan.stages(n_layers):
        if len(g) == 1:
            tp_layer = on(layer_axis, ("all_reduce", "attention", "attention"), ("all_reduce", "hidden", "mlp"))
            stages.append(Stage("layer", g, outside, layer_split, tp_layer))
            holders = outside
            continue
        if holders != everyone:
            stages.append(state)
        collectives = on("tp", ("all_reduce", "attention", "attention"))
        collectives += on("member", ("all_gather", "attention", "bypass")) if plan.bypass else ()
        collectives += on("world", ("all_reduce", "hidden", "group"))
        stages.append(Stage("group", g, everyone, "tp" if T > 1 else "full", collectives))
        holders = everyone
    if variant.lm_head == "sharded" and world > 1:
        if holders != everyone:
            stages.append(state)
        stages.append(Stage("head", (), everyone, "vocab", on("world", ("all_gather", "pairs", "head"))))
    else:  # the whole head where the final state is; rank0: member 0, which sends the token ids
        stages.append(Stage("head", (), outside, "full",
                            on("member", ("broadcast", "token_ids", "head")) if outside != everyone else ()))
    return Schedule(plan, n_layers, P, T, variant, tuple(stages))


def tp_schedule(n_layers: int, N: int, lm_head: str = "sharded", comm: str = "auto") -> Schedule:
    """The tensor-parallel baseline on N devices: no groups, every layer cut over N ranks."""
    return make_schedule(Plan(), n_layers, 1, N, Variant(lm_head=lm_head, comm=comm))


# ---- weights: which slice of which tensor a rank holds -------------------------------------
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYER_PREFIX = "model.layers."
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")  # cut by input features: their bias lives on shard 0


@dataclass(frozen=True)
class Share:
    """Rows/columns [start, stop) along `dim` (dim None: whole) of checkpoint tensor `source`, held as `name`.

    view: True when the rank holds `source` whole anyway (a tied head inside the embedding): no own bytes."""
    name: str
    source: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    view: bool = False

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        return tuple(self.stop - self.start if d == self.dim else n for d, n in enumerate(full))


def vocab_rows(vocab: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of head shard `index` of `count`: ceil(V/count) rows each, the last ones shorter."""
    rows = -(-vocab // count)
    return min(vocab, index * rows), min(vocab, (index + 1) * rows)


def tp_cuts(count: int, heads: int, kv_heads: int, head_dim: int, hidden: int,
            intermediate: int) -> list[dict[str, tuple[int, int]]]:
    """[start, stop) per tensor-parallel shard of a layer: "q" (query rows = o_proj columns), "kv" (key and
    value rows), "mlp" (gate/up rows = down_proj columns).

    Each shard holds whole KV heads with their query heads (GQA groups stay together), split as evenly as
    the KV heads allow; the MLP columns then balance every shard's parameter count, so an uneven head split
    (SmolLM2: 3 KV heads on 2 ranks -> 2 and 1) still gives every rank the same bytes to stream. With
    heads, KV heads and intermediate size divisible by `count` this is the usual even cut."""
    group = heads // kv_heads
    kv = [kv_heads // count + (i < kv_heads % count) for i in range(count)]
    attn = [2 * hidden * head_dim * (group * n + n) for n in kv]  # q + o, k + v parameters
    per_column = 3 * hidden  # gate, up, down
    target = (sum(attn) + per_column * intermediate) / count
    mlp = [max(0.0, (target - a) / per_column) for a in attn]
    scale = intermediate / sum(mlp)
    bounds = [round(sum(mlp[:i]) * scale) for i in range(count + 1)]
    out, k0 = [], 0
    for i, n in enumerate(kv):
        out.append({"q": (k0 * group * head_dim, (k0 + n) * group * head_dim),
                    "kv": (k0 * head_dim, (k0 + n) * head_dim), "mlp": (bounds[i], bounds[i + 1])})
        k0 += n
    return out


CUT_OF = {"self_attn.q_proj": ("q", 0), "self_attn.k_proj": ("kv", 0), "self_attn.v_proj": ("kv", 0),
          "self_attn.o_proj": ("q", 1), "mlp.gate_proj": ("mlp", 0), "mlp.up_proj": ("mlp", 0),
          "mlp.down_proj": ("mlp", 1)}  # module -> (cut, weight dim it cuts)


def _layer_share(name: str, cut: dict[str, tuple[int, int]] | None, index: int) -> Share | None:
    """The slice of one layer tensor in tensor-parallel shard `index` with cut `cut` (None: whole layer)."""
    if cut is None:
        return Share(name, name)
    module, _, kind = name.rpartition(".")
    for suffix, (part, dim) in CUT_OF.items():
        if module.endswith(suffix):
            if kind == "bias" and dim == 1:  # a row-parallel bias is added once, by shard 0
                return Share(name, name) if index == 0 else None
            return Share(name, name, 0 if kind == "bias" else dim, *cut[part])
    return Share(name, name)  # norms: whole


def shares(schedule: Schedule, rank: int, shapes: Mapping[str, tuple[int, ...]], tied: bool,
           heads: int | None = None, kv_heads: int | None = None) -> list[Share]:
    """Every tensor slice `rank` holds, from the parameter shapes of the whole model (name -> shape).

    `shapes` are the model's parameters (a checkpoint's header or a meta model's named_parameters, or
    llama_shapes(...)); a tied model's head is read from the embedding (`tied`). heads / kv_heads: the
    attention heads, for tensor-parallel cuts (tp_cuts); None: even cuts (heads, KV heads, MLP divisible)."""
    parts = schedule.parts(rank)
    whole_embed = any(p.kind == "embed" for p in parts)
    layers: dict[int, tuple[int, int]] = {p.layer: (p.index, p.count) for p in parts if p.kind == "layer"}
    out: list[Share] = []
    for p in parts:
        if p.kind == "embed":
            out.append(Share(EMBED, EMBED))
        elif p.kind == "norm":
            out.append(Share(NORM, NORM))
        elif p.kind == "head":
            source = EMBED if tied else HEAD
            if p.count == 1:
                out.append(Share(HEAD, source, view=tied and whole_embed))
            else:
                start, stop = vocab_rows(shapes[source][0], p.index, p.count)
                out.append(Share(HEAD, source, 0, start, stop, view=tied and whole_embed))
    cuts: dict[tuple[int, int], dict] = {}
    for name, shape in shapes.items():
        if not name.startswith(LAYER_PREFIX):
            continue
        i = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
        if i not in layers:
            continue
        index, count = layers[i]
        if count > 1 and (i, index) not in cuts:
            p = f"{LAYER_PREFIX}{i}."
            q, k, gate = shapes[p + "self_attn.q_proj.weight"], shapes[p + "self_attn.k_proj.weight"], shapes[p + "mlp.gate_proj.weight"]
            if heads:
                cuts[i, index] = tp_cuts(count, heads, kv_heads, k[0] // kv_heads, q[1], gate[0])[index]
            else:  # even cuts of the rows
                cuts[i, index] = {c: (n // count * index, n // count * (index + 1))
                                  for c, n in (("q", q[0]), ("kv", k[0]), ("mlp", gate[0]))}
        if (s := _layer_share(name, cuts.get((i, index)), index)) is not None:
            out.append(s)
    return out


def rank_bytes(schedule: Schedule, rank: int, shapes: Mapping[str, tuple[int, ...]], tied: bool,
               dtype_bytes: int, heads: int | None = None, kv_heads: int | None = None) -> int:
    """Bytes of the weights `rank` materializes (views of tensors it holds whole cost nothing)."""
    return sum(math.prod(s.shape(shapes[s.source])) * dtype_bytes
               for s in shares(schedule, rank, shapes, tied, heads, kv_heads) if not s.view)


def llama_shapes(n_layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 head_dim: int | None = None, tied: bool = False, attention_bias: bool = False,
                 mlp_bias: bool = False, qkv_bias: bool = False) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a LLaMA-family model (HF names), e.g. for a 70B projection without its weights.
    attention_bias: every attention projection has a bias (Llama's option); qkv_bias: q, k and v only (Qwen2)."""
    hd = head_dim or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {EMBED: (vocab, hidden)}
    for i in range(n_layers):
        p = f"{LAYER_PREFIX}{i}."
        linear = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv_heads * hd, hidden),
                  "self_attn.v_proj": (kv_heads * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}
        for module, shape in linear.items():
            shapes[p + module + ".weight"] = shape
            qkv = module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            if (attention_bias or (qkv_bias and qkv)) if module.startswith("self_attn") else mlp_bias:
                shapes[p + module + ".bias"] = (shape[0],)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes[NORM] = (hidden,)
    if not tied:
        shapes[HEAD] = (vocab, hidden)
    return shapes


def config_shapes(config) -> dict[str, tuple[int, ...]]:
    """llama_shapes of a transformers-style config object (attributes as in LlamaConfig; Qwen2's q/k/v biases,
    which its config does not state, from its model_type)."""
    return llama_shapes(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                        config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
                        getattr(config, "head_dim", None), bool(getattr(config, "tie_word_embeddings", False)),
                        bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)),
                        getattr(config, "model_type", None) == "qwen2")


def check_shardable(schedule: Schedule, heads: int, kv_heads: int, intermediate: int) -> None:
    """Every tensor-parallel cut gives each shard whole KV heads (with their query heads) and MLP columns."""
    count = max((p.count for r in range(schedule.world) for p in schedule.parts(r) if p.kind == "layer"), default=1)
    if count > kv_heads or heads % kv_heads or count > intermediate:
        raise PlanError(f"tensor parallelism over {count} devices needs at least {count} KV heads (each device "
                        f"holds whole KV heads with their query heads), but the model has {kv_heads} (of {heads} "
                        "heads); choose a smaller tp or another ungrouped variant")
