"""Text corpora -> fixed-length token blocks, with disjoint calibration / training / evaluation splits.

A corpus (conf/data/*.yaml) is a list of documents: offline text files assembled at install
(`scripts/fetch_texts.py`, under $CQIL_CACHE/texts), local .txt/.jsonl files, or a HF data set
by name (needs network). Each document is tokenized into one stream and split by TOKENS,
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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import CqilError
from .models import cache_dir

SPLITS = ("calibration", "training", "evaluation")


@dataclass
class DataConfig:
    """The `data` config group (conf/data/*.yaml)."""
    name: str
    files: list[str] = field(default_factory=list)  # relative names resolve under $CQIL_CACHE/texts
    hf: dict | None = None                            # {path, name, split, text_field}
    block_size: int = 512
    calibration_fraction: float = 0.1
    evaluation_fraction: float = 0.1


def _read_file(path: Path) -> str:
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, row in enumerate(lines) if "text" not in row]
        if missing:
            raise CqilError(f"{path}: line {missing[0] + 1} has no 'text' field; .jsonl rows need {{\"text\": ...}}")
        return "\n\n".join(row["text"] for row in lines)
    return path.read_text(encoding="utf-8")


def documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(name, text) of every document of the corpus."""
    docs = []
    for f in cfg.files:
        path = Path(f).expanduser()
        if not path.is_absolute():
            path = cache_dir() / "texts" / f
        if not path.is_file():
            hint = "run `make install` to assemble the offline texts" if not Path(f).is_absolute() else "check data.files"
            raise CqilError(f"text file {path} does not exist; {hint}")
        docs.append((path.name, _read_file(path)))
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


def check_tokens(n: int | None, block_size: int, what: str = "max_tokens") -> None:
    """A token count is a positive multiple of the block size: used exactly, never silently rounded."""
    if n is None:
        return
    is_int = isinstance(n, int) and not isinstance(n, bool)
    if not is_int or n < block_size or n % block_size:
        near = max(1, n // block_size) * block_size if is_int else block_size
        raise CqilError(f"{what}={n!r} must be a positive multiple of the block size {block_size}; "
                        f"use {near} or {near + block_size}")


def token_blocks(cfg: DataConfig | dict, tokenizer, split: str, max_tokens: int | None = None,
                 block_size: int | None = None, what: str = "max_tokens") -> torch.Tensor:
    """LongTensor [n_blocks, block_size] of the split, round-robin over documents, exactly max_tokens if given.

    block_size: window length (default cfg.block_size); `what` names the config key of max_tokens in errors.
    """
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**cfg)
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
