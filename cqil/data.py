"""Text corpora -> fixed-length token blocks, with disjoint calibration / training / evaluation splits.

A corpus (conf/data/*.yaml) is a list of documents: local .txt/.jsonl files (a relative name is looked
up in the working directory first, then among the offline texts that `make install` assembles under
$CQIL_CACHE/texts: cqil.inputs.locate_text), or a HF data set by name (needs network). Each document is tokenized into one stream and split by TOKENS,
contiguously:

    calibration = its first  calibration_fraction of tokens   (cqil analyze, plan choice)
    evaluation  = its last   evaluation_fraction  of tokens   (held-out perplexity, agreement)
    training    = the tokens in between                       (cqil finetune)

so no token is in two splits, whatever window length each job cuts its split into: every split is
cut into non-overlapping blocks of `block_size` tokens (default `data.block_size`; the fine-tune
trains on shorter blocks, yet its held-out perplexity uses the same 512-token windows as every
other job). Blocks of all documents are interleaved round-robin, so a `max_tokens` cap still draws
from every document.
"""
from __future__ import annotations

import random

import torch

from . import CqilError
from .config import DataConfig, data_config
from .inputs import check_tokens, locate_text, read_text

SPLITS = ("calibration", "training", "evaluation")


def documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(name, text) of every document of the corpus."""
    docs = []
    for f in cfg.files:
        path = locate_text(f)
        docs.append((path.name, read_text(path)))
    if cfg.hf:
        try:
            import datasets
            ds = datasets.load_dataset(cfg.hf["path"], cfg.hf.get("name"), split=cfg.hf.get("split", "train"))
        except Exception as e:  # offline, unknown name, ...: one clear line
            raise CqilError(f"cannot load data set {cfg.hf['path']!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); offline, use data=english or local files") from None
        docs.append((cfg.hf["path"], "\n\n".join(t for t in ds[cfg.hf.get("text_field", "text")] if t.strip())))
    if not docs:
        raise CqilError(f"data set {cfg.name!r} names no files and no HF data set")
    return docs


def split_ranges(n_tokens: int, cfg: DataConfig) -> dict[str, range]:
    """Token index ranges of each split within one document of n_tokens tokens."""
    n_cal = int(n_tokens * cfg.calibration_fraction)
    n_eval = int(n_tokens * cfg.evaluation_fraction)
    return {"calibration": range(0, n_cal), "training": range(n_cal, n_tokens - n_eval),
            "evaluation": range(n_tokens - n_eval, n_tokens)}


def token_blocks(cfg: DataConfig | dict, tokenizer, split: str, max_tokens: int | None = None,
                 block_size: int | None = None, what: str = "max_tokens") -> torch.Tensor:
    """LongTensor [n_blocks, block_size] of the split, round-robin over documents, exactly max_tokens if given.

    block_size: window length (default cfg.block_size); `what` names the config key of max_tokens in errors.
    """
    cfg = cfg if isinstance(cfg, DataConfig) else data_config(cfg)
    block_size = block_size or cfg.block_size
    if split not in SPLITS:
        raise CqilError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(block_size, int) or block_size < 2:
        raise CqilError(f"block size {block_size!r} must be an integer >= 2 (tokens per window)")
    check_tokens(max_tokens, block_size, what)
    per_doc = []
    for _, text in documents(cfg):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        part = ids[list(split_ranges(len(ids), cfg)[split])]
        per_doc.append(part[: len(part) // block_size * block_size].view(-1, block_size))
    order = [doc[i] for i in range(max(len(d) for d in per_doc)) for doc in per_doc if i < len(doc)]
    if not order:
        raise CqilError(f"the {split} split of {cfg.name!r} has no block of {block_size} tokens; "
                        f"use more text or a larger {split}_fraction")
    if max_tokens is not None:
        n = max_tokens // block_size
        if n > len(order):
            raise CqilError(f"{what}={max_tokens} asks for more {split} tokens than {cfg.name!r} has in "
                            f"{block_size}-token blocks ({len(order) * block_size}); lower it or add text")
        order = order[:n]
    return torch.stack(order)


def addition_problems(digits: list[int], questions: int, shots: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The held-out addition set of the cqil_arithmetic task (cqil/tasks/cqil_arithmetic.yaml's metadata.build), one
    seeded draw: `shots` few-shot examples, then `questions` questions per digit count, none repeating a shot or
    another question; digit counts take turns. Rows {"a", "b", "answer"}. Here (not in the eval job) because the
    teacher-written training text (cqil.teacher_text) must leave exactly these questions out."""
    rng, seen = random.Random(seed), set()

    def draw(d: int) -> dict:
        while True:
            a, b = rng.randint(10 ** (d - 1), 10 ** d - 1), rng.randint(10 ** (d - 1), 10 ** d - 1)
            if (a, b) not in seen:
                seen.add((a, b))
                return {"a": a, "b": b, "answer": str(a + b)}

    examples = [draw(digits[k % len(digits)]) for k in range(shots)]  # drawn first: the test never repeats them
    test = [draw(digits[k % len(digits)]) for k in range(questions * len(digits))]  # interleaved: `limit` sees all
    return examples, test
