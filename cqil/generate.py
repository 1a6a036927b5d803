"""`cqil generate`: text from prompts on P devices through the multi-device runtime, streamed, timed.

What a user runs to use the speed-up. Prompts come from the command line (`prompt=<text>`, any text
verbatim, or `prompt=[a, b]`) or a file (`prompt_file=`: one prompt a line, or .jsonl rows
{"prompt": ...}). The model runs on a devices x tp mesh through cqil.runtime (every rank reads only
its own weights from the checkpoint; KV cache): `cqil generate devices=P` launches
`torchrun --standalone --nproc_per_node P -m cqil generate ...` itself; devices=1 runs in this process.
The plan is the converted directory's own (a `cqil convert` or `cqil finetune` output), or the `plan`
config group's for any other model; devices must equal its group size P.

Decoding: greedy (sampling.temperature=0; the runtime's greedy head, which all-gathers one
(max logit, token id) pair per sequence: the same tokens as transformers' generate(do_sample=False) of
the converted model), or sampling with temperature / top_k / top_p (transformers' own logits warpers,
in generate()'s order). Sampling must pick the same token on every rank, or the ranks' KV caches would
silently drift apart: the runtime hands every rank the same full logits (`with_logits=True`), and prompt i
samples on the CPU with its own generator seeded `seed + i`, so every rank draws the same token, and a
prompt's sample does not depend on the batch it is in. At the end every rank's token ids are compared
(one gather on the mesh's gloo group) and a difference is an error, not a silent garbage completion.
A sequence stops at the model's EOS token(s) (generation_config.json, else config.json) or after
max_new_tokens; a batch (batch_size > 1, left-padded) runs until all its sequences stopped.

Output: rank 0 streams the text to stdout (batch_size=1: token by token, transformers' TextStreamer;
larger batches: each completion when its batch is done) and prints to stderr what ran and, at the end,
TTFT (prefill + first token, on the host) and decode speed (ms per step, tokens/s per sequence and in
all) measured around the runtime calls only (printing is not timed); optionally the completions
(`out`, .jsonl) and one results row with provenance (`results`, CSV).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from transformers import GenerationConfig, LogitsProcessorList, TextStreamer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from . import CqilError, console, costs, models
from .config import plan_config
from .inputs import prompt_list, read_prompts as read_prompts_file
from .outputs import write_text
from .plan import Plan
from .results import plan_columns, provenance, update_table
from .runtime import Runtime, init_distributed, launch, make_mesh, shutdown, under_torchrun
from .schedule import Variant


# ---- the prompts (every config value was checked before the job: cqil.checks.CHECKS["generate"]) ----------
def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of `prompt` (a text or a list) or `prompt_file` (.txt: one a line; .jsonl: {"prompt": ...})."""
    if cfg.prompt_file is None:
        return prompt_list(list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [cfg.prompt])
    return read_prompts_file(Path(str(cfg.prompt_file)).expanduser())


# ---- what runs: model config, plan, tokenized prompts ------------------------------------------------
@dataclass
class Job:
    """What every rank (and the launcher, to check before starting processes) derives from the config."""
    config: object
    plan: Plan
    tokenizer: object
    prompts: list[str]
    ids: list[list[int]]  # token ids of every prompt (chat template applied if asked)
    eos: set[int]


def job_plan(cfg: DictConfig, config) -> Plan:
    """The converted directory's own plan, else the plan config group's; refused if they disagree or if
    the plan does not fit devices x tp."""
    n = config.num_hidden_layers
    wanted = plan_config(cfg.plan).given(n)
    saved = getattr(config, "cqil_plan", None)
    own = Plan.from_dict(saved, n) if saved else Plan()
    if own.groups and wanted.groups and own != wanted:
        raise CqilError(f"the model is converted with plan {own.describe()} but the config asks for {wanted.describe()}; "
                        "pass plan=none to run it with its own plan")
    plan = own if own.groups else wanted
    if not plan.groups and cfg.devices > 1:
        raise CqilError(f"devices={cfg.devices} runs the members of the plan's groups concurrently, but there is no plan; "
                        "give one (plan=manual plan.start=.. plan.end=.. plan.group_size=.., plan=file) or a converted "
                        "directory, or run devices=1 (tp=N: tensor parallelism alone)")
    if plan.groups and plan.group_size != cfg.devices and (cfg.devices, cfg.tp) != (1, 1):
        raise CqilError(f"the plan {plan.describe()} has groups of {plan.group_size} layers but devices={cfg.devices}; "
                        f"run it with devices={plan.group_size} (or devices=1 tp=1: one process)")
    return plan


def eos_ids(path: str, config) -> set[int]:
    """The token ids that end a sequence, as transformers' generate() takes them (generation config first)."""
    location, extra = models.resolve(path)
    try:
        eos = GenerationConfig.from_pretrained(location, **extra).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    eos = config.eos_token_id if eos is None else eos
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def prepare(cfg: DictConfig) -> Job:
    """Prompts, model config, plan and token ids, every check that needs no weights (cheap)."""
    prompts = read_prompts(cfg)
    config = models.load_config(cfg.model.path, cfg.model.trust_remote_code)
    plan = job_plan(cfg, config)
    device = str(cfg.model.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CqilError(f"model.device={device} but CUDA is not available here; use model.device=cpu")
        world = cfg.devices * cfg.tp
        if world > torch.cuda.device_count():
            raise CqilError(f"devices={cfg.devices} x tp={cfg.tp} needs {world} GPUs, this host has "
                            f"{torch.cuda.device_count()}")
    elif device != "cpu":
        raise CqilError(f"model.device={device!r}: cqil generate runs on cpu or cuda")
    models.dtype_of(cfg.model.dtype)
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    if cfg.chat and not tokenizer.chat_template:
        raise CqilError(f"chat=true but the tokenizer of {cfg.model.path} has no chat template; use chat=false")
    ids = []
    for i, p in enumerate(prompts, 1):
        if cfg.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            ids.append(tokenizer(p).input_ids)
        if not ids[-1]:
            raise CqilError(f"prompt {i} has no tokens; give text to continue")
    longest = max(map(len, ids))
    limit = getattr(config, "max_position_embeddings", None)
    if limit and longest + cfg.max_new_tokens > limit:
        raise CqilError(f"the longest prompt ({longest} tokens) + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                        f"{limit} positions; shorten it or lower max_new_tokens")
    return Job(config, plan, tokenizer, prompts, ids, set() if cfg.ignore_eos else eos_ids(cfg.model.path, config))


# ---- decoding ---------------------------------------------------------------------------------------
class Sampler:
    """Temperature / top-k / top-p sampling from full logits [B, V], one CPU generator per sequence.

    The warpers are transformers' own, in generate()'s order; drawing on the CPU from a generator seeded per
    prompt makes the draw the same on every rank (and on CPU and GPU runs) given the same logits."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seeds: list[int]):
        warpers = [TemperatureLogitsWarper(temperature)]
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
        self.warpers = LogitsProcessorList(warpers)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = self.warpers(None, logits.float().cpu()).softmax(-1)
        drawn = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)]
        return torch.cat(drawn).to(logits.device)


@dataclass
class Completion:
    """One prompt's result (token_ids: the new tokens, the EOS token included when it ended the sequence)."""
    prompt: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length"


@dataclass
class Timing:
    """One batch's timings (seconds): TTFT, and per chunk of decode steps its time, its steps and the new tokens
    it kept (the host reads the tokens once a chunk; the steps of a chunk are timed together)."""
    ttft: float
    chunks: list[float]
    chunk_steps: list[int]
    chunk_tokens: list[int]
    first_tokens: int


PROMPT_BLOCK = 32  # compiled runtime: prompts left-padded to a multiple of this share a prefill graph (cqil.runtime)


def prompt_block(rt: Runtime) -> int:
    """What prompts are padded to a multiple of: PROMPT_BLOCK for a compiled runtime (few prefill graphs), else 1."""
    return PROMPT_BLOCK if rt.mode != "none" else 1


def left_pad(ids: list[list[int]], pad: int, device: torch.device,
             block: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch [B, T] left-padded to its longest prompt, rounded up to a multiple of `block`, and its mask (None
    when no row is padded)."""
    width = -(-max(map(len, ids)) // block) * block
    batch = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
    if all(len(row) == width for row in ids):
        return batch, None
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    return batch, mask


def decode_batch(rt: Runtime, ids: list[list[int]], max_new_tokens: int, eos: set[int], pad: int,
                 sampler: Sampler | None, sync_every: int = 8, on_tokens=None) -> tuple[list[list[int]], Timing]:
    """New tokens of a batch of prompts (each up to its EOS or max_new_tokens) and the batch's timings.

    Every rank calls this with the same arguments (the runtime's calls are collectives). Greedy decoding never
    waits for the device between steps: which rows have finished is kept on the device (a finished row decodes
    padding from then on, as transformers' generate() does), and the host reads the new tokens once every
    `sync_every` steps, to stream them (`on_tokens(rows)` per step, outside the timed regions) and to stop once
    every row has finished (steps past that in the last chunk are dropped). Sampling draws on the host (the same
    draws on every rank and device), so it reads the logits every step."""
    batch, mask = left_pad(ids, pad, rt.device, prompt_block(rt))
    out: list[list[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    stops = torch.tensor(sorted(eos), dtype=torch.long, device=rt.device)

    def keep(tokens: list[int]) -> int:
        kept = [None if done[b] else t for b, t in enumerate(tokens)]
        for b, t in enumerate(kept):
            if t is not None:
                out[b].append(t)
                done[b] = t in eos
        if on_tokens is not None:
            on_tokens(kept)
        return sum(t is not None for t in kept)

    def step(call, *args, **kwargs):
        """One runtime call (prefill or decode): the next tokens [B] on the device and the decoding state."""
        if sampler is None:
            return call(*args, **kwargs)
        _, state, logits = call(*args, with_logits=True, **kwargs)
        return sampler(logits), state

    start = time.perf_counter()
    token, state = step(rt.prefill, batch, mask, max_new_tokens=max_new_tokens)
    first = token.tolist()  # waits for the device: TTFT ends with the first tokens on the host
    timing = Timing(time.perf_counter() - start, [], [], [], keep(first))
    finished = torch.isin(token, stops)
    left = max_new_tokens - 1
    while left and not all(done):
        start, chunk = time.perf_counter(), []
        for _ in range(min(sync_every, left)):
            token = token.masked_fill(finished, pad)  # finished rows decode padding, as transformers' generate() does
            token, state = step(rt.decode, token, state)
            finished |= torch.isin(token, stops)
            chunk.append(token)
        host = torch.stack(chunk, 1).tolist()  # the one wait for the device in this chunk
        seconds, left = time.perf_counter() - start, left - len(chunk)
        kept = [keep([row[i] for row in host]) for i in range(len(chunk)) if not all(done)]
        timing.chunks.append(seconds)
        timing.chunk_steps.append(len(chunk))
        timing.chunk_tokens.append(sum(kept))
    return out, timing


# ---- the job ----------------------------------------------------------------------------------------
def threads(cfg: DictConfig) -> int:
    """CPU torch threads per process: `threads`, else the CPUs divided among the processes."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // (cfg.devices * cfg.tp))


def run(cfg: DictConfig) -> list[Completion] | None:
    """cqil generate: check what needs the model's config and tokenizer here, then launch torchrun
    (devices x tp > 1) or generate."""
    world = cfg.devices * cfg.tp
    if under_torchrun():
        try:
            return worker(cfg)
        finally:
            shutdown()
    job = prepare(cfg)  # bad input fails here, before any process starts
    if world > 1:
        launch("generate", world, threads(cfg))
        return None
    return worker(cfg, job)


def worker(cfg: DictConfig, job: Job | None = None) -> list[Completion]:
    """Generate on this rank (every rank of a torchrun job runs this; devices x tp = 1: this process alone).
    Returns the completions (the same on every rank); rank 0 prints, streams and writes the outputs."""
    job = job or prepare(cfg)
    torch.set_num_threads(threads(cfg))
    dtype = models.dtype_of(cfg.model.dtype)
    device_type = "cuda" if str(cfg.model.device).startswith("cuda") else "cpu"
    mesh = None
    if under_torchrun():
        device = init_distributed(cfg.devices, cfg.tp, device_type, cfg.startup_timeout_s)
        mesh = make_mesh(cfg.devices, cfg.tp, device, cfg.timeout_s)
    variant, layouts = job_variant(cfg, job, mesh.device if mesh is not None else torch.device(cfg.model.device), dtype)
    lead = mesh is None or mesh.rank == 0
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if lead else (lambda *a: None)
    s = cfg.sampling
    how = "greedy" if s.temperature == 0 else f"sampling (temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, seed {s.seed})"
    world = cfg.devices * cfg.tp
    if layouts["line"]:  # the latency model's ranking behind ungrouped=auto, before the run's own line
        say(layouts["line"])
    say(f"cqil generate: {cfg.model.name}, plan {job.plan.describe()}, {cfg.devices} x {cfg.tp} mesh: {world} "
        f"process{'es' if world > 1 else ''} on {device_type} ({cfg.model.dtype}); {how}; {len(job.prompts)} "
        f"prompt{'s' if len(job.prompts) > 1 else ''}, at most {cfg.max_new_tokens} new tokens each; "
        f"ungrouped {variant.ungrouped} ({layouts['by']}), compile {cfg.runtime.compile}")

    rt = Runtime(cfg.model.path, job.plan, mesh, variant, dtype, cfg.model.device, cfg.timeout_s,
                 cfg.model.trust_remote_code, cfg.runtime.compile, cfg.startup_timeout_s)
    pad = job.tokenizer.pad_token_id
    start = time.perf_counter()
    for _ in range(cfg.warmup):  # untimed first-call costs (allocator, communicators; compiled: the first batch's graphs)
        token, state, *_ = rt.prefill(*left_pad(job.ids[:cfg.batch_size], pad, rt.device, prompt_block(rt)),
                                      with_logits=s.temperature > 0, max_new_tokens=cfg.max_new_tokens)
        rt.decode(token, state, with_logits=s.temperature > 0)
    if cfg.warmup and rt.mode != "none":
        say(f"warm-up, which compiled the first batch's shape: {time.perf_counter() - start:.1f} s (another batch "
            "shape compiles during its first prefill and decode step)")

    with console.product():  # the completions are the job's output: printed even with -q
        completions, timings = _complete(cfg, job, rt, lead, s, pad)
    if mesh is not None:
        check_agreement(completions)
    if lead:
        report(cfg, job, rt, completions, timings, device_type, layouts["by"])
    return completions


def _complete(cfg: DictConfig, job: Job, rt: Runtime, lead: bool, s: DictConfig, pad: int) -> tuple[list[Completion], list[Timing]]:
    """Every prompt's completion, batch by batch; rank 0 (`lead`) prints each as it comes."""
    completions: list[Completion] = []
    timings: list[Timing] = []
    for first in range(0, len(job.ids), cfg.batch_size):
        rows = list(range(first, min(first + cfg.batch_size, len(job.ids))))
        sampler = None if s.temperature == 0 else Sampler(s.temperature, s.top_k, s.top_p, [s.seed + i for i in rows])
        stream = None
        if lead and len(rows) == 1:
            print(_shown(job.prompts[rows[0]], cfg.chat), end="", flush=True)
            stream = TextStreamer(job.tokenizer, skip_special_tokens=True)
        new, timing = decode_batch(rt, [job.ids[i] for i in rows], cfg.max_new_tokens, job.eos, pad, sampler,
                                   cfg.sync_every, stream and (lambda kept: stream.put(torch.tensor(kept))))
        timings.append(timing)
        for i, tokens in zip(rows, new):
            text = job.tokenizer.decode(tokens, skip_special_tokens=True)
            reason = "eos" if tokens and tokens[-1] in job.eos else "length"
            completions.append(Completion(job.prompts[i], len(job.ids[i]), tokens, text, reason))
            if lead and stream is None:
                print(_shown(job.prompts[i], cfg.chat) + text, flush=True)
        if stream is not None:
            stream.end()  # the rest of the text and a newline
        if lead:
            print(flush=True)
    return completions, timings


def job_variant(cfg: DictConfig, job: Job, device: torch.device, dtype: torch.dtype) -> tuple[Variant, dict]:
    """The runtime variant of `runtime.*`; ungrouped=auto: the layout the latency model (cqil.costs) ranks fastest
    for this plan on the devices x tp mesh (a decode step at batch_size with the longest prompt's cache), with
    {"by": how it was chosen, "line": the model's ranking (empty where there is nothing to choose)}."""
    options = {k: cfg.runtime[k] for k in ("comm", "lm_head", "ungrouped")}
    if options["ungrouped"] != "auto":
        return Variant(**options), {"by": "given", "line": ""}
    if not job.plan.groups or cfg.devices == 1:  # one member: the three layouts coincide (tensor parallelism or one process)
        return Variant(**{**options, "ungrouped": "replicated"}), {"by": "one member: all layouts alike", "line": ""}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    hw = costs.hardware(costs.hardware_for(name))
    ranked = costs.rank_layouts(job.config, job.plan, cfg.devices, cfg.tp, hw, options["lm_head"], cfg.batch_size,
                                max(map(len, job.ids)) + cfg.max_new_tokens, dtype.itemsize)
    return Variant(**{**options, "ungrouped": ranked[0]["ungrouped"]}), \
        {"by": "latency model", "line": costs.describe_layouts(ranked, hw, cfg.devices, cfg.tp)}


def _shown(prompt: str, chat: bool) -> str:
    """How a prompt is echoed before its completion."""
    return f"> {prompt}\n" if chat else prompt


def check_agreement(completions: list[Completion]) -> None:
    """Every rank must have generated the same tokens (one gather at the end, on the default group)."""
    mine = [c.token_ids for c in completions]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    compare_ranks(everyone)


def compare_ranks(tokens: list[list[list[int]]]) -> None:
    """Token ids of every prompt on every rank (rank -> prompt -> ids): a CqilError at the first difference."""
    for rank, theirs in enumerate(tokens[1:], 1):
        for i, (a, b) in enumerate(zip(tokens[0], theirs), 1):
            if a != b:
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise CqilError(f"rank {rank} generated other tokens than rank 0 for prompt {i} (from new token {at}): "
                                "their logits differ, so their KV caches drifted apart; the completions are not valid")


def summary(timings: list[Timing]) -> dict:
    """TTFT (median, mean over batches), decode ms per step (median over chunks of a chunk's time per step),
    tokens/s per sequence and in all."""
    per_step = [c / n for tm in timings for c, n in zip(tm.chunks, tm.chunk_steps)]
    steps = sum(n for tm in timings for n in tm.chunk_steps)
    decode_s = sum(c for tm in timings for c in tm.chunks)
    step_tokens = sum(n for tm in timings for n in tm.chunk_tokens)
    tokens = step_tokens + sum(tm.first_tokens for tm in timings)
    seconds = sum(tm.ttft for tm in timings) + decode_s
    tpot = statistics.median(per_step) * 1e3 if per_step else float("nan")
    return {"ttft_ms_median": statistics.median(tm.ttft for tm in timings) * 1e3,
            "ttft_ms_mean": statistics.fmean(tm.ttft for tm in timings) * 1e3,
            "decode_steps": steps, "tpot_ms_median": tpot,
            "tokens_per_s_per_sequence": 1e3 / tpot if per_step else float("nan"),
            "decode_tokens_per_s": step_tokens / decode_s if per_step else float("nan"),
            "new_tokens": tokens, "generate_seconds": seconds, "e2e_tokens_per_s": tokens / seconds}


def report(cfg: DictConfig, job: Job, rt: Runtime, completions: list[Completion], timings: list[Timing],
           device_type: str, ungrouped_by: str) -> None:
    """Rank 0: the timing summary (stderr), the completions (.jsonl) and the results row (CSV) if asked."""
    m = summary(timings)
    lengths = [c.prompt_tokens for c in completions]
    print(f"TTFT {m['ttft_ms_median']:.1f} ms (median of {len(timings)} batch(es) of up to {cfg.batch_size}; prompts of "
          f"{min(lengths)}-{max(lengths)} tokens)   decode {m['tpot_ms_median']:.1f} ms/step = "
          f"{m['tokens_per_s_per_sequence']:.1f} tokens/s per sequence (median of {m['decode_steps']} steps), "
          f"{m['decode_tokens_per_s']:.1f} tokens/s in all   end to end {m['e2e_tokens_per_s']:.1f} tokens/s "
          f"({m['new_tokens']} tokens in {m['generate_seconds']:.2f} s)", file=sys.stderr, flush=True)
    if cfg.out:
        path = Path(cfg.out)
        write_text(path, "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in completions))
        print(f"completions -> {path}", file=sys.stderr)
    if cfg.results:
        device = torch.cuda.get_device_name(rt.device) if device_type == "cuda" else "cpu"
        s = cfg.sampling
        row = {"model": cfg.model.name, **plan_columns(job.plan, job.config.num_hidden_layers), "devices": cfg.devices,
               "tp": cfg.tp, "dtype": cfg.model.dtype, "backend": dist.get_backend() if dist.is_initialized() else "none",
               "comm": rt.comm.name if rt.comm is not None else "none", "lm_head": cfg.runtime.lm_head,
               "ungrouped": rt.variant.ungrouped, "ungrouped_by": ungrouped_by, "compile": rt.mode,
               "sync_every": cfg.sync_every, "n_prompts": len(completions),
               "batch_size": cfg.batch_size, "prompt_tokens_mean": statistics.fmean(lengths),
               "max_new_tokens": cfg.max_new_tokens, "ignore_eos": cfg.ignore_eos, "chat": cfg.chat,
               "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed, "warmup": cfg.warmup,
               "threads": threads(cfg), **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
               **provenance(device)}
        update_table("generate", [row], cfg.results)
        print(f"results -> {cfg.results}", file=sys.stderr)
