"""cqil generate: greedy output equals transformers' generate() of the converted model (cqil.modeling.apply_plan),
on 1, 2 and 4 processes (torchrun, gloo); sampling with a seed is reproducible and the same on every rank.

Two torchrun launches: `cqil generate devices=2` through the CLI (it launches torchrun itself; a prompt file, a
left-padded batch and a prompt that stops at EOS), and one 4-rank launch of this file's __main__, which runs the
job's worker for several configs in one process group (P4 greedy, P2 x T2 greedy, P4 sampling). The one-process
cases run here. CQIL_TEST_DEVICE=cuda runs the torchrun cases on GPUs (NCCL; scripts/gpu_check.py does).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cqil import CqilError, cli, generate
from cqil.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the cat sat", "a dog ran past the old mill", "birds sang"]
P2, P4 = Plan(((1, 2), (3, 4)), 1), Plan(((1, 2, 3, 4),), 2)
NEW = 10
SAMPLING = ["sampling.temperature=0.9", "sampling.top_k=20", "sampling.top_p=0.95", "sampling.seed=3"]
DEVICE = os.environ.get("CQIL_TEST_DEVICE", "cpu")


def plan_overrides(plan: Plan) -> list[str]:
    groups = ",".join("[" + ",".join(map(str, g)) + "]" for g in plan.groups)
    return [f"plan.groups=[{groups}]", f"plan.bypass={plan.bypass}"]


# name -> overrides of the cases of the 4-rank launch
WORLD4 = {
    "P4 greedy": ["devices=4", *plan_overrides(P4), "batch_size=3"],
    "P2xT2 greedy": ["devices=2", "tp=2", *plan_overrides(P2), "batch_size=2", "runtime.ungrouped=replicated",
                     "runtime.lm_head=replicated"],
    "P4 sampling": ["devices=4", *plan_overrides(P4), "batch_size=2", "runtime.comm=torch", *SAMPLING],
}


def job_overrides(ckpt: Path, *extra: str, prompts: bool = True) -> list[str]:
    given = [f"prompt=[{','.join(repr(p) for p in PROMPTS)}]"] if prompts else []
    return [f"model.path={ckpt}", "model.name=tiny", f"model.device={DEVICE}", *given, f"max_new_tokens={NEW}",
            "warmup=0", "threads=1", *extra]


# ---- the 4-rank worker: `torchrun --nproc_per_node 4 tests/test_generate.py <checkpoint> <out dir>` ----
def worker(ckpt: Path, out: Path) -> None:
    from cqil.runtime import shutdown

    try:
        results = {name: [c.token_ids for c in generate.worker(cli.compose("generate", job_overrides(ckpt, *extra)))]
                   for name, extra in WORLD4.items()}
        torch.save(results, out / f"rank{os.environ['RANK']}.pt")
    finally:
        shutdown()


def torchrun_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")


# ---- fixtures and the reference --------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random 8-layer LLaMA with a character tokenizer (EOS id 2, which greedy decoding of the P2 plan
    reaches on the third prompt)."""
    from conftest import char_tokenizer, make_tiny_llama

    path = tmp_path_factory.mktemp("generate") / "tiny"
    make_tiny_llama(layers=8).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@functools.cache
def reference(ckpt: Path, plan: Plan, batch_size: int) -> list[list[int]]:
    """transformers' greedy generate() of the converted model, batched (left-padded) as the job batches, each
    sequence cut after its EOS."""
    from transformers import LlamaForCausalLM

    from cqil import models
    from cqil.modeling import apply_plan

    model = apply_plan(LlamaForCausalLM.from_pretrained(ckpt).eval(), plan)
    tok = models.load_tokenizer(str(ckpt))
    eos = model.generation_config.eos_token_id
    out = []
    for first in range(0, len(PROMPTS), batch_size):
        ids, mask = generate.left_pad([tok(p).input_ids for p in PROMPTS[first:first + batch_size]], 0, torch.device("cpu"))
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def one_process(ckpt: Path, *extra: str) -> list[list[int]]:
    return [c.token_ids for c in generate.run(cli.compose("generate", job_overrides(ckpt, "model.device=cpu", *extra)))]


# ---- torchrun ---------------------------------------------------------------------------------------
def test_cli_on_two_processes_equals_generate(ckpt, tmp_path):
    """`cqil generate devices=2` from a prompt file: the completions (a padded batch of 2, then one prompt that
    stops at EOS, streamed) equal transformers' generate() of the converted model; timings and the row written."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out, results = tmp_path / "completions.jsonl", tmp_path / "generate.csv"
    overrides = job_overrides(ckpt, "devices=2", *plan_overrides(P2), f"prompt_file={prompts}", "batch_size=2",
                              f"out={out}", f"results={results}", prompts=False)
    run = subprocess.run([sys.executable, "-m", "cqil", "generate", *overrides], env=torchrun_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in rows] == reference(ckpt, P2, 2)
    assert [r["finish_reason"] for r in rows] == ["length", "length", "eos"]
    assert [r["prompt"] for r in rows] == PROMPTS and rows[2]["text"] and rows[2]["text"] in run.stdout
    assert PROMPTS[2] + rows[2]["text"] in run.stdout  # streamed right after its prompt
    assert "TTFT" in run.stderr and "tokens/s" in run.stderr
    from cqil.results import read_csv

    row = read_csv(results).iloc[0]
    assert (row.devices, row.backend, row.plan, row.n_prompts) == (2, "gloo" if DEVICE == "cpu" else "nccl", "S1 E5 P2 D1", 3)
    assert row.ttft_ms_median > 0 and row.decode_tokens_per_s > 0 and row.command.startswith("cqil generate")


@pytest.fixture(scope="module")
def world4(ckpt, tmp_path_factory) -> list[dict]:
    """Every case of WORLD4 in one 4-rank torchrun launch: each rank's token ids per case."""
    out = tmp_path_factory.mktemp("world4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", __file__, str(ckpt), str(out)]
    run = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


def test_four_ranks_greedy_equals_generate(ckpt, world4):
    """P4 (bypass 2, a batch of 3) and P2 x T2 (tensor parallel members, whole head): transformers' tokens on every rank."""
    for name, plan, batch in (("P4 greedy", P4, 3), ("P2xT2 greedy", P2, 2)):
        expected = reference(ckpt, plan, batch)
        for r, ranks in enumerate(world4):
            assert ranks[name] == expected, f"{name}, rank {r}"


def test_sampling_is_the_same_on_every_rank_and_reproducible(ckpt, world4):
    """P4 sampling: every rank drew the same tokens, which are one process's draws with the same seed (the
    logits agree to float precision; each prompt has its own generator, so the batch size does not matter);
    another seed draws others, top_k=1 is greedy."""
    drawn = world4[0]["P4 sampling"]
    assert all(ranks["P4 sampling"] == drawn for ranks in world4)
    alone = one_process(ckpt, *plan_overrides(P4), *SAMPLING)  # batch_size 1
    assert alone == drawn and one_process(ckpt, *plan_overrides(P4), *SAMPLING) == alone
    assert alone != reference(ckpt, P4, 1)  # it samples
    assert one_process(ckpt, *plan_overrides(P4), *SAMPLING[:-1], "sampling.seed=4") != alone
    top1 = ["sampling.temperature=0.7", "sampling.top_k=1", "sampling.seed=5"]
    assert one_process(ckpt, *plan_overrides(P4), *top1) == reference(ckpt, P4, 1)


# ---- one process -------------------------------------------------------------------------------
def test_one_process_greedy_equals_generate_and_streams(ckpt, capsys):
    assert one_process(ckpt) == reference(ckpt, Plan(), 1)  # no plan: the original model
    assert one_process(ckpt, *plan_overrides(P2), "batch_size=3") == reference(ckpt, P2, 3)
    # the host reads the tokens every step, or every 3 (EOS of the third prompt inside a chunk): the same tokens
    assert one_process(ckpt, *plan_overrides(P2), "batch_size=3", "sync_every=1") == reference(ckpt, P2, 3)
    assert one_process(ckpt, *plan_overrides(P2), "batch_size=3", "sync_every=3") == reference(ckpt, P2, 3)
    stdout = capsys.readouterr().out  # batches print each completion after its prompt
    assert all(p in stdout for p in PROMPTS)


def test_quiet_prints_the_completions_alone(ckpt, tmp_path, monkeypatch, capfd):
    """-q silences the job's lines and bars, not what it is run for: every prompt and its completion on stdout."""
    monkeypatch.chdir(tmp_path)
    cli.main(["generate", "-q", *job_overrides(ckpt, "model.device=cpu", "batch_size=3", f"out={tmp_path / 'c.jsonl'}",
                                               f"results={tmp_path / 'g.csv'}")])
    out, err = capfd.readouterr()
    texts = [json.loads(line)["text"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert err == "" and out == "".join(p + t + "\n" for p, t in zip(PROMPTS, texts)) + "\n"


def test_compiled_generate_equals_generate(ckpt):
    """runtime.compile=default (inductor, prompts padded to PROMPT_BLOCK tokens, static cache): transformers' tokens."""
    assert one_process(ckpt, *plan_overrides(P2), "batch_size=3", "runtime.compile=default") == reference(ckpt, P2, 3)


def test_a_converted_directory_runs_its_own_plan(ckpt, tmp_path):
    from transformers import LlamaForCausalLM

    from cqil import models
    from cqil.modeling import apply_plan, save_converted

    converted = tmp_path / "converted"
    save_converted(apply_plan(LlamaForCausalLM.from_pretrained(ckpt), P2), models.load_tokenizer(str(ckpt)), converted)
    assert one_process(converted) == reference(ckpt, P2, 1)
    with pytest.raises(CqilError, match="converted with plan S1 E5 P2 D1 but the config asks for S1 E5 P4 D2; pass plan=none"):
        one_process(converted, *plan_overrides(P4))


# ---- bad input: one line, exit 2, before any process starts -------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (None, "no prompt: give prompt=<text>"),
    (["prompt_file=/nonexistent/prompts.txt"], "give prompt or prompt_file, not both"),
    ([None, "prompt_file=/nonexistent/prompts.txt"], "prompt_file=/nonexistent/prompts.txt: does not exist"),
    ([None, "prompt=[]"], "the prompt list holds no prompt"),
    ([None, "prompt= "], "prompt 1 of the prompt list is empty"),
    (["devices=2"], "devices=2 runs the members of the plan's groups concurrently, but there is no plan"),
    (["devices=4", "plan.groups=[[1,2],[3,4]]"], "groups of 2 layers but devices=4; run it with devices=2"),
    (["plan=auto"], "plan=auto chooses a plan from data"),
    (["sampling.top_p=0.9"], "sampling.temperature=0 decodes greedily"),
    (["sampling.temperature=-1"], "sampling.temperature=-1: must be a number >= 0"),
    (["sampling.top_p=0", "sampling.temperature=1"], "sampling.top_p=0: must be a number > 0 and <= 1"),
    (["max_new_tokens=0"], "max_new_tokens=0: must be an integer >= 1"),
    (["max_new_tokens=300"], "exceeds the model's 256 positions"),
    (["runtime.lm_head=half"], "runtime.lm_head=half: must be one of sharded, replicated"),
    (["runtime.compile=fast"], "runtime.compile=fast: must be one of auto, none, default, reduce-overhead"),
    (["sync_every=0"], "sync_every=0: must be an integer >= 1"),
    (["model.device=cuda"], "CUDA is not available here|has no CUDA GPU"),
    (["chat=true"], "has no chat template"),
])
def test_bad_input_is_one_line(ckpt, extra, message, capsys):
    extra = extra or [None]
    if "model.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    given = extra[0] is not None  # None first: no prompt from job_overrides
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *job_overrides(ckpt, "model.device=cpu", *extra[not given:], prompts=given)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    import re

    assert re.search(message, err), err


def test_prompt_files(tmp_path):
    cfg = cli.compose("generate")
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second, with a comma  \n")
    cfg.prompt_file = str(txt)
    assert generate.read_prompts(cfg) == ["first prompt", "  second, with a comma"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "also ok"}\n{"other": 1}\n')
    cfg.prompt_file = str(bad)
    with pytest.raises(CqilError, match=r"p.jsonl:3: no 'prompt' \(or 'text'\) field"):
        generate.read_prompts(cfg)
    bad.write_text('{"prompt": "ok"\n')
    with pytest.raises(CqilError, match=r"p.jsonl:1: not valid JSON"):
        generate.read_prompts(cfg)


def test_any_prompt_text_reaches_the_job_verbatim():
    """Hydra's grammar would split commas, reject quotes and parentheses, resolve ${...}: the CLI quotes prompt=."""
    for text in ["It's here, (really): a = b?", "back\\", "say \"hi\" ${model.name}", "x\\'y", "", "null", "42"]:
        assert cli.compose("generate", [f"prompt={text}"]).prompt == text
    assert list(cli.compose("generate", ["prompt=[one, 'two, three']"]).prompt) == ["one", "two, three"]


def test_ranks_that_disagree_are_an_error():
    generate.compare_ranks([[[1, 2, 3], [4]], [[1, 2, 3], [4]]])
    with pytest.raises(CqilError, match="rank 1 generated other tokens than rank 0 for prompt 2 \\(from new token 1\\)"):
        generate.compare_ranks([[[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
