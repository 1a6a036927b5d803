"""Training text written by the original model (sequence-level distillation data), cached with its provenance.

The teacher (the original model: the weights with the plan off, or the separate teacher of a fine-tuned input)
continues `samples` prompts with its own sampled text (transformers' generate, batched, KV cache, `temperature`),
each up to its end of turn (EOS, kept) or until prompt and text fill train.block_size tokens; the samples, in a
seeded order, are packed one after the other into blocks of train.block_size tokens (the last partial block is
dropped), as pre-training packs documents: teacher and student read the same packed context. The prompts are
deterministic (`seed`) and never come from an evaluation split:

  continuation  `prompt_tokens`-token windows of the TRAINING split of `data` (cqil.data), a seeded choice;
  instruction   chat requests (the tokenizer's chat template, when it has one) made from training-split passages
                and their words: summarize, explain, continue, ask and answer, ...;
  arithmetic    few-shot sums, differences and products of small numbers ("a + b = c" lines, the last one left for
                the teacher) and word questions; every addition of the cqil_arithmetic eval task (its questions
                and shots, cqil.data.addition_problems with the task's own build settings) is left out.

`kinds` shares the samples among the three. The corpus is cached under $CQIL_CACHE/teacher_text/<key>/, key = a hash
of everything that decides it (the teacher's weights and tokenizer, the documents of `data` and its split settings,
the settings here, the prompt builders' version), built once under a file lock (concurrent runs and DDP ranks wait
for it), written atomically: tokens.safetensors (`input_ids` [blocks, block_size]), samples.jsonl (kind, prompt and
text of each sample, for reading) and provenance.json (the model, the prompts' source, seed, settings, the sha256 of
the tokens, generation time and tokens/s, versions, command). A later run with the same key reads it back, checked
against its sha256. `cqil finetune teacher_text.samples=N` trains on these blocks beside the text's.
"""
from __future__ import annotations

import hashlib
import operator
import json
import random
import re
import time
from pathlib import Path

import torch
import yaml
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import CqilError, data, outputs
from .paths import cache_dir
from .metrics import continue_tokens
from .modeling import plan_disabled
from .results import provenance

KINDS = ("continuation", "instruction", "arithmetic")
KIND = "cqil teacher text"  # the kind of directory in its manifest (cqil.outputs)
VERSION = 2  # of the prompt builders below: a change that alters prompts bumps it (and so every cache key)
ARITHMETIC_TASK = Path(__file__).resolve().parent / "tasks" / "cqil_arithmetic.yaml"
INSTRUCTIONS = (
    "Summarize this passage in one sentence:\n\n{passage}",
    "What is the following text about? Explain briefly.\n\n{passage}",
    "Rewrite this text in simpler words:\n\n{passage}",
    "Continue this text for a few sentences:\n\n{passage}",
    "Write a question about this passage, then answer it.\n\n{passage}",
    "List three facts stated in this text.\n\n{passage}",
    "What does the word \"{word}\" mean? Use it in a sentence.",
    "Write a short paragraph about {word}.",
    "Give two synonyms of \"{word}\" and explain the difference.",
)
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
WORD_QUESTIONS = (
    "What is {a} plus {b}?",
    "What is {a} minus {b}?",
    "What is {a} times {b}?",
    "I have {a} apples and buy {b} more. How many apples do I have now?",
    "A train travels {a} kilometres, then {b} more. How far does it travel in all?",
)


# ---- prompts -----------------------------------------------------------------------------------
def shares(samples: int, kinds: dict[str, float]) -> dict[str, int]:
    """`samples` split by the shares of `kinds` (largest remainders; each kind a whole number of samples)."""
    exact = {k: samples * kinds.get(k, 0.0) for k in KINDS}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: counts[k] - exact[k])[: samples - sum(counts.values())]:
        counts[k] += 1
    return counts


def render(tokenizer, request: str) -> str:
    """A user request as the model's own chat format (its chat template), or a plain question-answer form."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                             tokenize=False)
    return f"Question: {request}\nAnswer:"


def held_out_additions() -> set[tuple[int, int]]:
    """Every (a, b) of the cqil_arithmetic eval task, its shots included, in both orders."""
    build = yaml.safe_load(ARITHMETIC_TASK.read_text())["metadata"]["build"]
    pairs = set()
    for args in build.values():
        for rows in data.addition_problems(**args):
            pairs |= {(r["a"], r["b"]) for r in rows} | {(r["b"], r["a"]) for r in rows}
    return pairs


def continuation_prompts(windows: torch.Tensor, n: int, rng: random.Random) -> list[list[int]]:
    """n training-split windows, a seeded choice (cycling when n exceeds them: each prompt is sampled anew)."""
    order = list(range(len(windows)))
    rng.shuffle(order)
    return [windows[order[k % len(order)]].tolist() for k in range(n)]


def instruction_prompts(windows: torch.Tensor, tokenizer, n: int, rng: random.Random) -> list[list[int]]:
    """n chat requests about training-split passages (windows decoded) or one of their words."""
    prompts = []
    for k in range(n):
        passage = tokenizer.decode(windows[rng.randrange(len(windows))].tolist()).strip()
        words = [w for w in re.findall(r"[A-Za-z]+", passage) if len(w) >= 6] or ["language"]
        request = INSTRUCTIONS[k % len(INSTRUCTIONS)].format(passage=passage, word=rng.choice(words).lower())
        prompts.append(tokenizer(render(tokenizer, request), add_special_tokens=False).input_ids)
    return prompts


def arithmetic_requests(n: int, rng: random.Random, excluded: set[tuple[int, int]]) -> list[tuple[str, bool]]:
    """n arithmetic prompts as (text, chat?): few-shot lines "a op b = c" ending in one the teacher answers, or a word
    question (chat). No addition of the eval task (`excluded`) appears, as an example or as the question."""

    def pair(op: str) -> tuple[int, int]:
        while True:
            d = rng.choice((1, 2, 3) if op != "*" else (1, 2))
            a, b = rng.randint(10 ** (d - 1), 10**d - 1), rng.randint(1, 10**d - 1)
            if op == "-":
                a, b = max(a, b), min(a, b)
            if (a, b) not in excluded:  # (all ops: a pair of the eval never appears at all)
                return a, b

    requests = []
    for k in range(n):
        if k % 3 == 2:  # a word question in the chat format
            template = WORD_QUESTIONS[rng.randrange(len(WORD_QUESTIONS))]
            op = "-" if "minus" in template else "*" if "times" in template else "+"
            a, b = pair(op)
            requests.append((template.format(a=a, b=b), True))
        else:
            op = rng.choice("++-*")
            lines = []
            for _ in range(rng.randint(2, 5)):
                a, b = pair(op)
                lines.append(f"{a} {op} {b} = {OPS[op](a, b)}")
            a, b = pair(op)
            requests.append(("\n".join(lines + [f"{a} {op} {b} ="]), False))
    return requests


def arithmetic_prompts(tokenizer, n: int, rng: random.Random, excluded: set[tuple[int, int]]) -> list[list[int]]:
    """arithmetic_requests as token ids (the word questions in the model's chat format)."""
    return [tokenizer(render(tokenizer, text) if chat else text, add_special_tokens=False).input_ids
            for text, chat in arithmetic_requests(n, rng, excluded)]


def build_prompts(settings: dict, block_size: int, tokenizer, data_cfg: data.DataConfig) -> list[tuple[str, list[int]]]:
    """(kind, prompt ids) of every sample, in a fixed order. Reads the training split of data_cfg only."""
    counts = shares(settings["samples"], settings["kinds"])
    rng = random.Random(settings["seed"])
    windows = data.token_blocks(data_cfg, tokenizer, "training", None, settings["prompt_tokens"])
    prompts = [("continuation", p) for p in continuation_prompts(windows, counts["continuation"], rng)]
    prompts += [("instruction", p) for p in instruction_prompts(windows, tokenizer, counts["instruction"], rng)]
    prompts += [("arithmetic", p) for p in arithmetic_prompts(tokenizer, counts["arithmetic"], rng, held_out_additions())]
    longest = max((len(p) for _, p in prompts), default=0)
    if longest > block_size - 8:
        raise CqilError(f"teacher_text: a prompt of {longest} tokens leaves the teacher under 8 tokens of a "
                        f"train.block_size={block_size} block; raise train.block_size or lower teacher_text.prompt_tokens")
    return prompts


# ---- the cache key -----------------------------------------------------------------------------
def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights (every tensor of its state dict, by name, bytes as stored)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((text + str(getattr(tokenizer, "chat_template", None))).encode()).hexdigest()


def data_fingerprint(data_cfg: data.DataConfig) -> dict:
    """The training text's source: the data config and the sha256 of each document."""
    return {"name": data_cfg.name, "files": list(data_cfg.files), "hf": data_cfg.hf,
            "calibration_fraction": data_cfg.calibration_fraction, "evaluation_fraction": data_cfg.evaluation_fraction,
            "documents": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in data.documents(data_cfg)}}


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


# ---- generating, caching, reading back ----------------------------------------------------------
@torch.no_grad()
def generate(net: nn.Module, prompts: list[tuple[str, list[int]]], block_size: int, settings: dict,
             pad_id: int) -> list[list[int]]:
    """Each prompt's ids followed by the teacher's text, up to its first EOS (kept) or block_size tokens in all.
    Batches of prompts of similar length, left-padded; seeded (torch's generator forked: the caller's stream is
    untouched)."""
    eos = net.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][1]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="teacher writes", unit="sample")
    device = next(net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings["seed"])
        for start in range(0, len(order), settings["batch_size"]):
            batch = order[start:start + settings["batch_size"]]
            ids = [prompts[i][1] for i in batch]
            width = max(map(len, ids))
            padded = torch.tensor([[pad_id] * (width - len(p)) + p for p in ids])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
            new = continue_tokens(net, padded, block_size - min(map(len, ids)), settings["temperature"], mask,
                                  stop_at_eos=True)
            for row, (i, p) in enumerate(zip(batch, ids)):
                text = new[row, : block_size - len(p)].tolist()
                end = next((k + 1 for k, t in enumerate(text) if t in eos), len(text))
                out[i] = p + text[:end]
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(map(len, out)))
    bar.close()
    return out


def pack(samples: list[list[int]], block_size: int, seed: int) -> torch.Tensor:
    """The samples in a seeded order, one after the other, cut into [n, block_size] blocks (the rest dropped)."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    stream = torch.tensor([t for i in order for t in samples[i]], dtype=torch.long)
    n = len(stream) // block_size
    if n == 0:
        raise CqilError(f"teacher_text: the teacher wrote {len(stream)} tokens, less than one block of train.block_size="
                        f"{block_size}; raise teacher_text.samples")
    return stream[: n * block_size].view(n, block_size)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def blocks(settings: dict, block_size: int, model: nn.Module, teacher: nn.Module | None, tokenizer,
           data_cfg: data.DataConfig, teacher_path: str) -> tuple[torch.Tensor, dict]:
    """The teacher-written training blocks [samples, block_size] and their provenance: read from the cache, or
    written now (by the original model: `teacher`, else `model` with its plan off) and cached.

    settings: samples, kinds {continuation, instruction, arithmetic: share}, prompt_tokens, temperature, seed,
    batch_size (conf/finetune.yaml's teacher_text)."""
    net = model if teacher is None else teacher
    decided = {k: settings[k] for k in ("samples", "kinds", "prompt_tokens", "temperature", "seed", "batch_size")}
    parts = {"version": VERSION, "block_size": block_size, "settings": decided, "teacher_weights": weights_sha256(net),
             "tokenizer": tokenizer_sha256(tokenizer), "data": data_fingerprint(data_cfg),
             "held_out": "cqil_arithmetic: " + json.dumps(yaml.safe_load(ARITHMETIC_TASK.read_text())["metadata"]["build"],
                                                          sort_keys=True)}
    key = cache_key(parts)
    where = cache_dir() / "teacher_text" / key[:16]
    where.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(where) + ".lock"):
        if not (where / "provenance.json").is_file():
            outputs.write_dir(where, lambda tmp: write(tmp, net, tokenizer, data_cfg, settings, block_size, key, parts,
                                                       teacher_path), KIND, "finetune")
            record = json.loads((where / "provenance.json").read_text())
            print(f"teacher_text: {record['samples']} samples ({record['written_tokens']} tokens written by the teacher "
                  f"in {record['seconds']:.0f} s, {record['written_tokens_per_s']} tokens/s) -> {record['blocks']} "
                  f"blocks of {block_size} tokens in {where}")
        return read(where)


def write(out: Path, net: nn.Module, tokenizer, data_cfg: data.DataConfig, settings: dict, block_size: int,
          key: str, parts: dict, teacher_path: str) -> None:
    """Build the prompts, let the original model write, and store tokens, texts and provenance in `out`."""
    prompts = build_prompts(settings, block_size, tokenizer, data_cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = net.training
    net.eval()
    begin = time.perf_counter()
    try:
        with plan_disabled(net):  # the original model
            samples = generate(net, prompts, block_size, settings, pad)
    finally:
        net.train(was_training)
    seconds = time.perf_counter() - begin
    ids = pack(samples, block_size, settings["seed"])
    save_file({"input_ids": ids}, str(out / "tokens.safetensors"))
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for (kind, prompt), sample in zip(prompts, samples):
            f.write(json.dumps({"kind": kind, "prompt": tokenizer.decode(prompt),
                                "text": tokenizer.decode(sample[len(prompt):]), "tokens": len(sample)},
                               ensure_ascii=False) + "\n")
    new_tokens = sum(len(s) - len(p) for s, (_, p) in zip(samples, prompts))
    record = {"key": key, "teacher": teacher_path, "teacher_weights_sha256": parts["teacher_weights"],
              "tokenizer_sha256": parts["tokenizer"], "block_size": block_size, "samples": len(prompts),
              "blocks": len(ids), "kinds": {k: sum(1 for kind, _ in prompts if kind == k) for k in KINDS},
              "prompts_source": f"training split of data {data_cfg.name!r} (cqil.data: between its first "
                                f"{data_cfg.calibration_fraction:g} and last {data_cfg.evaluation_fraction:g} of "
                                "every document), instruction templates and arithmetic of cqil.teacher_text "
                                f"(version {VERSION}); left out: {parts['held_out']}",
              "data": parts["data"], "settings": parts["settings"], "seed": settings["seed"],
              "tokens_sha256": tensor_sha256(ids), "written_tokens": new_tokens, "seconds": round(seconds, 1),
              "written_tokens_per_s": round(new_tokens / seconds, 1) if seconds else None,
              **provenance(str(next(net.parameters()).device))}
    (out / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")


def read(where: Path) -> tuple[torch.Tensor, dict]:
    """(ids, provenance) of a cached corpus, its tokens checked against the recorded sha256."""
    try:
        record = json.loads((where / "provenance.json").read_text())
        ids = load_file(str(where / "tokens.safetensors"))["input_ids"]
    except Exception as e:  # any damage: one line naming the way out
        raise CqilError(f"teacher text cache {where} is damaged ({type(e).__name__}); delete it to write it anew") from None
    if tensor_sha256(ids) != record.get("tokens_sha256"):
        raise CqilError(f"teacher text cache {where}: tokens.safetensors does not match its recorded sha256; "
                        "delete the directory to write it anew")
    return ids, record

