"""`make gpu-check`: the GPU path of cqil in a few minutes on CUDA GPUs; numbers -> results/gpu_check/.

Steps (each writes rows `step, check, value, limit, ok, seconds, detail` to
results/gpu_check/gpu_check_<gpu>.csv, with the GPU name and provenance, after every step):
  forward    the grouped forward (cqil.modeling.apply_plan) in fp32 and bf16 against the sequential
             reference formula y = x + sum_k (L_k(x) - x), written out below independently of cqil;
             fp32 must agree to 1e-4 of the logit scale, bf16 must stay within twice the reference
             formula's own bf16 error (both measured against the fp32 reference)
  runtime    cqil.runtime in one process: greedy tokens (fp32) equal transformers' generate() of the
             converted model; bf16 logits within twice the converted model's own bf16 error
  layer_step the layer-step microbenchmark (cqil/layerstep.py): one decode step of a LLaMA-2-7B and a 70B
             decoder layer (random bf16 weights, 512-token KV cache, batch 1), whole and as the 1/2, 1/4, 1/8
             shards TP=2/4/8 run per GPU, eager and compiled (CUDA graphs); fits the fixed cost per layer step
             t = c0 + bytes / bandwidth -> results/gpu_check/layer_step_<gpu>.csv, which `cqil latency
             layer_step.csv=...` projects with; the compiled step must equal the eager one, without graph
             breaks or CUDA-graph skips
  finetune   4 steps of `cqil finetune` in bf16 with gradient checkpointing (train.bf16=true,
             train.gradient_checkpointing=true)
  generate   `cqil generate` in bf16, one GPU: TTFT and tokens/s
  generate_compiled   `cqil generate runtime.compile=auto` in fp32, one GPU (the static-cache step under
             torch.compile with CUDA graphs): tokens equal transformers' generate() of the converted model
  with >= 2 GPUs (NCCL):
  generate_p2 / generate_p4   `cqil generate devices=2` (and 4 with >= 4 GPUs) in fp32: tokens equal
             transformers' generate() of the converted model
  torchrun_tests   tests/test_generate.py's torchrun equivalence tests with CQIL_TEST_DEVICE=cuda
  bench      a short `cqil bench devices=2`: original, CQIL and TP=2 (head whole), eager and compiled
Without CUDA it says so and exits 0. `--device cpu` runs the same steps on the CPU (a dry run of the
structure, tests/test_gpu_check.py). Self-contained: no network; the model is the bundled one when its
checkpoint is cached or its package installed, else a tiny random LLaMA saved to a temporary
directory (`--model tiny` forces it; `--model <dir>` takes any LLaMA-family checkpoint with a tokenizer).
Exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPTS = ["the cat sat on the mat and", "a dog ran past the old mill while"]
NEW_TOKENS = 24


# ---- the model, the plan and the text ---------------------------------------------------------------
def pick_model(choice: str, work: Path) -> tuple[str, str]:
    """(checkpoint, label): the bundled model if available (`auto`), a tiny random one, or a given path."""
    from cqil import CqilError, models

    if choice == "auto":
        try:
            return str(models.bundled_checkpoint("smollm2-135m")), "smollm2-135m"
        except CqilError as e:
            print(f"bundled model unavailable ({e}); using a tiny random LLaMA", flush=True)
            choice = "tiny"
    if choice != "tiny":
        return choice, Path(choice).name
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer, make_tiny_llama  # the tests' tiny model (no network)

    path = work / "tiny-llama"
    make_tiny_llama(layers=8).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path), "tiny-random-llama"


def group_plan(n_layers: int, P: int):
    """Groups of P layers over the middle of the stack ([0.4 n, 0.8 n), cut to a multiple of P): S12 E24 for 30 layers."""
    from cqil.plan import Plan

    start = round(0.4 * n_layers)
    return Plan.from_range(start, start + P * ((round(0.8 * n_layers) - start) // P), P, num_layers=n_layers)


def plan_overrides(plan) -> list[str]:
    return [f"plan.start={plan.groups[0][0]}", f"plan.end={plan.groups[-1][-1] + 1}",
            f"plan.group_size={plan.group_size}", "plan.bypass=0"]


def text_file() -> Path:
    """Real English text for the fine-tune and the bench: an offline text if installed, else the longest of the
    repository's own pages (the README alone is too short for the fine-tune's three splits)."""
    from cqil.paths import cache_dir

    alice = cache_dir() / "texts" / "alice29.txt"
    pages = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("results/reports/*.md")]
    return alice if alice.is_file() else max(pages, key=lambda p: p.stat().st_size)


# ---- the independent reference -----------------------------------------------------------------------
@torch.no_grad()
def sequential_reference(model, plan, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the plan computed straight from its definition with the model's own decoder layers:
    every layer of a group reads the group's input x and the group outputs x + sum_k (L_k(x) - x)."""
    dec = model.model
    x = dec.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    rope = dec.rotary_emb(x, pos)
    starts = {g[0]: g for g in plan.groups}
    i = 0
    while i < len(dec.layers):
        members = starts.get(i, (i,))
        outs = [dec.layers[j](x, attention_mask=None, position_ids=pos, position_embeddings=rope) for j in members]
        x = x + sum(out - x for out in outs)  # no mask, no padding: causal attention (sdpa)
        i += len(members)
    return model.lm_head(dec.norm(x))


def mean_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# ---- the steps -----------------------------------------------------------------------------------
class Check:
    """The rows of one gpu-check run, written to the CSV after every step."""

    def __init__(self, out: Path, device: str, label: str):
        from cqil.results import provenance

        self.gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.slug = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        self.path = out / f"gpu_check_{self.slug}.csv"
        self.common = {"gpu": self.gpu, "gpus": self.gpus, "model": label, **provenance(self.gpu)}
        self.rows: list[dict] = []

    def add(self, step: str, check: str, value, limit=None, ok: bool | None = None, seconds: float | None = None,
            detail: str = "") -> None:
        self.rows.append({"step": step, "check": check, "value": value, "limit": limit, "ok": ok,
                          "seconds": None if seconds is None else round(seconds, 2), "detail": detail, **self.common})
        mark = {True: "ok  ", False: "FAIL", None: "    "}[ok]
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"[{mark}] {step:15s} {check:34s} {shown}" + (f" (limit {limit})" if limit is not None else "")
              + (f"  {detail}" if detail else ""), flush=True)

    def save(self) -> None:
        from cqil.results import write_csv

        write_csv(self.rows, self.path)

    @property
    def failed(self) -> bool:
        return any(r["ok"] is False for r in self.rows)


def step_forward(check: Check, ckpt: str, device: str, plan) -> dict:
    """The grouped forward against the sequential reference, fp32 and bf16; returns tensors for step_runtime."""
    from cqil import models
    from cqil.modeling import apply_plan

    model, tok = models.load({"name": "check", "path": ckpt, "dtype": "float32", "device": device})
    ids = torch.tensor([tok(text_file().read_text(encoding="utf-8", errors="replace")[:4000]).input_ids[:128]] * 2,
                       device=device)
    ids[1] = ids[1].roll(7)  # two different rows
    ref32 = sequential_reference(model, plan, ids)
    scale = ref32.abs().max().item()
    apply_plan(model, plan)
    with torch.no_grad():
        cqil32 = model(ids).logits
        check.add("forward", "fp32: max |cqil - reference| / scale", (cqil32 - ref32).abs().max().item() / scale, 1e-4,
                  (cqil32 - ref32).abs().max().item() / scale < 1e-4, detail=f"plan {plan.describe()}, ids {tuple(ids.shape)}")
        model.to(torch.bfloat16)
        cqil16 = model(ids).logits
    ref16 = sequential_reference(model, plan, ids)
    budget = mean_err(ref16, ref32)
    check.add("forward", "bf16: mean |cqil - ref fp32|", mean_err(cqil16, ref32), round(2 * budget, 5),
              mean_err(cqil16, ref32) <= 2 * budget, detail=f"the reference formula in bf16: {budget:.4g}")
    agree = (cqil16.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    check.add("forward", "bf16: argmax agreement with fp32", agree, detail="reference formula in bf16: "
              f"{(ref16.argmax(-1) == ref32.argmax(-1)).float().mean().item():.4f}")
    del model
    return {"ids": ids, "cqil32": cqil32, "cqil16": cqil16}


def hf_greedy(ckpt: str, device: str, plan) -> list[list[int]]:
    """transformers' greedy generate() of the converted model (fp32, EOS off) for every prompt."""
    from cqil import models
    from cqil.modeling import apply_plan

    model, tok = models.load({"name": "check", "path": ckpt, "dtype": "float32", "device": device})
    apply_plan(model, plan)
    model.generation_config.eos_token_id = None
    out = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p).input_ids], device=device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def step_runtime(check: Check, ckpt: str, device: str, plan, forward: dict) -> list[list[int]]:
    """cqil.runtime in one process on the device: tokens equal generate() (fp32), bf16 logits within budget."""
    from cqil import models
    from cqil.runtime import Runtime

    expected = hf_greedy(ckpt, device, plan)
    tok = models.load_tokenizer(ckpt)
    rt = Runtime(ckpt, plan, None, dtype=torch.float32, device=device)
    got = [rt.generate(torch.tensor([tok(p).input_ids], device=device), max_new_tokens=NEW_TOKENS)[0].tolist()
           for p in PROMPTS]
    same = sum(a == b for a, b in zip(got, expected))
    check.add("runtime", "fp32 greedy tokens == generate()", f"{same}/{len(PROMPTS)} prompts", ok=same == len(PROMPTS),
              detail=f"{NEW_TOKENS} new tokens each")
    del rt
    rt = Runtime(ckpt, plan, None, dtype=torch.bfloat16, device=device)
    start = time.perf_counter()
    logits = rt.forward(forward["ids"])
    seconds = time.perf_counter() - start
    budget = mean_err(forward["cqil16"], forward["cqil32"])
    err = mean_err(logits, forward["cqil32"])
    check.add("runtime", "bf16: mean |runtime - cqil fp32|", err, round(2 * budget, 5), err <= 2 * budget, seconds,
              detail=f"the converted model in bf16: {budget:.4g}")
    return expected


# The compiled step against the eager one: max |difference| / max |eager output| (bf16: a few rounding steps)
STEP_AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def step_layer_step(check: Check, device: str, *, timeout: float) -> None:
    """The layer-step microbenchmark (cqil.layerstep) -> layer_step_<gpu>.csv beside the check's CSV: on a GPU the
    LLaMA-2-7B and 70B layer shapes in bf16, TP shards 1, 2, 4, 8; the dry run: the tiny shape in fp32, few steps.
    Rows: c0 and bandwidth per shape and mode, and the compiled step's checks."""
    from cqil import layerstep
    from cqil.results import write_csv

    start = time.perf_counter()
    if device == "cuda":
        d = layerstep.DEFAULTS["cuda"]
        shapes, dtype, depth, shards, reps = d["shapes"], torch.bfloat16, d["depth"], None, (10, 20, 10)
    else:
        shapes, dtype, depth, shards, reps = ("tiny",), torch.float32, 2, [1, 2, 4], (2, 3, 3)
    planned = sum(len(shards or layerstep.default_shards(layerstep.SHAPES[s], device)) for s in shapes) * 2
    warmup, blocks, steps = reps
    df = layerstep.run(list(shapes), device, dtype, shards, depth=depth, warmup=warmup, blocks=blocks, steps=steps,
                       deadline=time.monotonic() + timeout - 30)  # the slowest shard's compile and timing fit in 30 s
    if df.empty:
        check.add("layer_step", "measured rows", f"0/{planned}", ok=False, detail="out of time before the first shard")
        return
    path = write_csv(df, check.path.with_name(f"layer_step_{check.slug}.csv"))
    seconds = time.perf_counter() - start
    check.add("layer_step", "measured rows", f"{len(df)}/{planned}", ok=len(df) == planned, seconds=seconds,
              detail=f"depth {depth}, {blocks} blocks of {steps} steps -> {path.name}")
    for (shape, mode), g in df.groupby(["shape", "mode"], sort=False):
        r = g.iloc[0]
        check.add("layer_step", f"{shape} {mode}: fixed cost c0 (us)", float(r.fit_c0_us),
                  detail=f"bandwidth {r.fit_bandwidth_gbs:.1f} GB/s over shards {','.join(map(str, g['shard']))}; "
                         f"largest |residual| {g.fit_residual_us.abs().max():.1f} us")
    compiled = df[df["mode"] == "compiled"]
    diff = float(compiled.max_rel_diff_vs_eager.max())
    check.add("layer_step", "compiled vs eager: max rel diff", diff, STEP_AGREEMENT[dtype], diff <= STEP_AGREEMENT[dtype],
              detail=f"{dtype}, {compiled.compile_mode.iloc[0]}")
    breaks, skips = int(compiled.graph_breaks.sum()), int(compiled.cudagraph_skips.sum())
    check.add("layer_step", "graph breaks, CUDA-graph skips", f"{breaks}, {skips}", ok=breaks == 0 and skips == 0)


def cqil_job(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m cqil <job> ...` from this repository (a subprocess, as a user runs it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "cqil", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def failure(run: subprocess.CompletedProcess) -> str:
    """The last lines a failed job printed (its one-line error, or the end of a traceback)."""
    return " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])


def job_step(check: Check, step: str, args: list[str], timeout: float) -> float | None:
    """Run a cqil job: its wall seconds, or None after a failed row (its last lines as the detail)."""
    start = time.perf_counter()
    run = cqil_job(args, timeout)
    seconds = time.perf_counter() - start
    if run.returncode:
        check.add(step, f"cqil {args[0]}", "failed", ok=False, seconds=seconds, detail=failure(run))
        return None
    return seconds


def step_finetune(check: Check, ckpt: str, device: str, plan, work: Path, *, timeout: float) -> None:
    """4 fine-tune steps in bf16 with gradient checkpointing (`cqil finetune`)."""
    from cqil.results import read_csv

    args = ["finetune", "model=hf", f"model.path={ckpt}", "model.name=gpu-check", f"model.device={device}",
            "model.dtype=float32", "plan=manual", *plan_overrides(plan), "data=local", "data.name=gpu-check",
            f"data.files=[{text_file()}]", "data.block_size=128", "train.max_steps=4", "train.batch_size=2",
            "train.block_size=128", "train.train_tokens=1024", "train.bf16=true",
            "train.gradient_checkpointing=true", "~ood_data", "agreement.prompts=0",  # no second text, no decoding
            "train.save_steps=4", "eval_tokens=256", "eval_batch_size=2", f"out_dir={work / 'finetune'}",
            f"loss_csv={work / 'loss.csv'}", f"out={work / 'finetune.csv'}"]
    args += ["threads=1"] if device == "cpu" else []  # the CPU dry run: tiny matrices, thread start-up would dominate
    seconds = job_step(check, "finetune", args, timeout)
    if seconds is None:
        return
    row = read_csv(work / "finetune.csv").iloc[-1]
    losses = read_csv(work / "loss.csv").loss
    check.add("finetune", "optimizer steps", int(row.steps), 4, int(row.steps) == 4, seconds,
              detail=f"train {row.train_seconds} s; gradient_checkpointing on")
    check.add("finetune", "loss finite (first -> last)", f"{losses.iloc[0]:.4g} -> {losses.iloc[-1]:.4g}",
              ok=bool(losses.notna().all() and (losses.abs() < float('inf')).all()))
    check.add("finetune", "peak GPU memory (MiB)", row.peak_gpu_mb)


def step_generate(check: Check, ckpt: str, device: str, plan, work: Path, devices: int = 1,
                  expected: list[list[int]] | None = None, compile: str = "none", *, timeout: float) -> None:
    """`cqil generate` on `devices` GPUs: bf16 timings (one device), or fp32 tokens == generate() (several, or
    compiled: runtime.compile=auto, CUDA graphs of the static-cache step)."""
    from cqil.results import read_csv

    name = ("generate" if devices == 1 else f"generate_p{devices}") + ("" if compile == "none" else "_compiled")
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out, results = work / f"{name}.jsonl", work / f"{name}.csv"
    args = ["generate", "model=hf", f"model.path={ckpt}", "model.name=gpu-check", f"model.device={device}",
            f"model.dtype={'bfloat16' if expected is None else 'float32'}", f"devices={devices}", "plan=manual",
            *plan_overrides(plan), f"prompt_file={prompts}", f"max_new_tokens={NEW_TOKENS}", "ignore_eos=true",
            f"out={out}", f"results={results}", f"runtime.compile={compile}", *(["threads=1"] if device == "cpu" else [])]
    seconds = job_step(check, name, args, timeout)
    if seconds is None:
        return
    row = read_csv(results).iloc[-1]
    if expected is not None:
        got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
        same = sum(a == b for a, b in zip(got, expected))
        check.add(name, f"fp32 tokens == generate(), {row.backend}", f"{same}/{len(PROMPTS)} prompts",
                  ok=same == len(PROMPTS), seconds=seconds, detail=f"plan {plan.describe()}")
    check.add(name, "TTFT median (ms)", float(row.ttft_ms_median), seconds=seconds if expected is None else None,
              detail=f"{row['dtype']}, prompts of ~{row.prompt_tokens_mean:.0f} tokens")
    check.add(name, "decode tokens/s per sequence", float(row.tokens_per_s_per_sequence),
              detail=f"{row.tpot_ms_median:.2f} ms/step")


def step_torchrun_tests(check: Check, *, timeout: float) -> None:
    """tests/test_generate.py's torchrun equivalence tests on NCCL (4-rank cases only with >= 4 GPUs)."""
    which = "two_processes or four_ranks or sampling_is_the_same" if check.gpus >= 4 else "two_processes"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_generate.py",
                          "-k", which], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), CQIL_TEST_DEVICE="cuda"),
                         capture_output=True, text=True, timeout=timeout)
    last = (run.stdout.strip().splitlines() or ["no output"])[-1]
    check.add("torchrun_tests", f"pytest -k '{which}' (NCCL)", last, ok=run.returncode == 0,
              seconds=time.perf_counter() - start, detail="" if run.returncode == 0 else failure(run))


def step_bench(check: Check, ckpt: str, plan, work: Path, *, timeout: float) -> None:
    """A short `cqil bench devices=2` on 2 GPUs (bf16): CQIL and tensor parallelism against one GPU."""
    from cqil.results import read_csv

    out = work / "bench.csv"
    args = ["bench", "devices=2", "model=hf", f"model.path={ckpt}", "model.name=gpu-check", "model.device=cuda",
            "model.dtype=bfloat16", "plan=manual", *plan_overrides(plan), "data=local", "data.name=gpu-check",
            f"data.files=[{text_file()}]", "data.block_size=128", "prompt_tokens=[128]", "batch_sizes=[1]",
            "warmup=2", "repeats=5", "new_tokens=8", "profile_runs=1", f"out={out}", f"figure={work / 'bench.png'}",
            # eager and compiled (CUDA graphs), three setups: five would compile past this step's limit
            "cqil=[{lm_head: replicated, ungrouped: auto}]", "tensor_parallel=[{lm_head: replicated}]"]
    seconds = job_step(check, "bench", args, timeout)
    if seconds is None:
        return
    for r in read_csv(out).itertuples():
        check.add("bench", f"{r.phase} median ms", float(r.median_ms), seconds=seconds,
                  detail=f"{r.setup}; reduction {r.reduction:+.1%}")
        seconds = None


# ---- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of the same steps on the CPU (no GPU numbers)")
    parser.add_argument("--model", default="auto", help="auto (bundled if available, else tiny) | tiny | <checkpoint dir>")
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu_check"), help="folder of the CSV")
    parser.add_argument("--budget-s", type=float, default=450, help="wall-clock budget: later steps get what is left")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check")
        return 0
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="cqil-gpu-check-") as tmp:
        work = Path(tmp)
        ckpt, label = pick_model(args.model, work)
        from cqil import models

        n_layers = models.load_config(ckpt).num_hidden_layers
        plan = group_plan(n_layers, 2)
        check = Check(Path(args.out), args.device, label)
        print(f"gpu-check on {check.gpu} ({check.gpus} GPU(s)), model {label} ({n_layers} layers), plan {plan.describe()}")

        def run_step(name: str, fn, *a, limit_s: float | None = None) -> object:
            """fn(*a) (with timeout= what is left, at most limit_s, if given); a failure is a row, not the end."""
            left = deadline - time.monotonic()
            if left < 20:
                check.add(name, "skipped", "out of time", ok=False, detail=f"--budget-s {args.budget_s:g} spent")
                return None
            try:
                return fn(*a) if limit_s is None else fn(*a, timeout=min(limit_s, left))
            except subprocess.TimeoutExpired:
                check.add(name, "timed out", "timeout", ok=False, detail=f"after {min(limit_s, left):.0f} s")
            except Exception as e:  # a failing step is a row; the other steps still run
                check.add(name, "error", type(e).__name__, ok=False, detail=(str(e).splitlines() or [""])[0][:300])
            finally:
                check.save()
            return None

        forward = run_step("forward", step_forward, check, ckpt, args.device, plan)
        expected = run_step("runtime", step_runtime, check, ckpt, args.device, plan, forward) if forward else None
        run_step("layer_step", step_layer_step, check, args.device, limit_s=200)
        run_step("finetune", step_finetune, check, ckpt, args.device, plan, work, limit_s=240)
        run_step("generate", step_generate, check, ckpt, args.device, plan, work, limit_s=150)
        if args.device == "cuda":  # the compiled step (CUDA graphs) on one GPU: tokens == generate()
            run_step("generate_compiled", step_generate, check, ckpt, "cuda", plan, work, 1, expected, "auto",
                     limit_s=150)
        if check.gpus >= 2:
            run_step("generate_p2", step_generate, check, ckpt, "cuda", plan, work, 2, expected, limit_s=180)
            if check.gpus >= 4:
                plan4 = group_plan(n_layers, 4)
                run_step("generate_p4", step_generate, check, ckpt, "cuda", plan4, work, 4,
                         hf_greedy(ckpt, "cuda", plan4), limit_s=180)
            run_step("torchrun_tests", step_torchrun_tests, check, limit_s=300)
            run_step("bench", step_bench, check, ckpt, plan, work, limit_s=240)
        else:
            print(f"{check.gpus} GPU: the multi-GPU steps (NCCL equivalence, bench) need >= 2")
        check.save()
    print(f"-> {check.path}" + ("  (some checks FAILED)" if check.failed else "  (all checks passed)"))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
