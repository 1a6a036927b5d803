"""Text corpora -> fixed-length token blocks, with disjoint calibration / training / evaluation splits.

A corpus (conf/data/*.yaml) is a list of documents: offline text files assembled at install
(`scripts/fetch_texts.py`, under $CQIL_CACHE/texts), local .txt/.jsonl files, or a HF data set
by name (needs network). Each document is tokenized into one stream and cut into blocks of
`block_size` tokens (the ragged tail is dropped). Splits are contiguous per document:

    calibration = its first  calibration_fraction of blocks   (cqil analyze, plan choice)
    evaluation  = its last   evaluation_fraction  of blocks   (held-out perplexity)
    training    = the blocks in between                       (cqil finetune)

so no token is in two splits. Blocks of all documents are interleaved round-robin, so a
`max_tokens` cap still draws from every document.
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


def split_ranges(n_blocks: int, cfg: DataConfig) -> dict[str, range]:
    """Block index ranges of each split within one document of n_blocks blocks."""
    n_cal = int(n_blocks * cfg.calibration_fraction)
    n_eval = int(n_blocks * cfg.evaluation_fraction)
    return {"calibration": range(0, n_cal), "training": range(n_cal, n_blocks - n_eval),
            "evaluation": range(n_blocks - n_eval, n_blocks)}


def token_blocks(cfg: DataConfig | dict, tokenizer, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """LongTensor [n_blocks, block_size] of the split, round-robin over documents, capped at max_tokens."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**cfg)
    if split not in SPLITS:
        raise CqilError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    per_doc = []
    for _, text in documents(cfg):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        blocks = ids[: len(ids) // cfg.block_size * cfg.block_size].view(-1, cfg.block_size)
        per_doc.append(blocks[list(split_ranges(len(blocks), cfg)[split])])
    order = [doc[i] for i in range(max(len(d) for d in per_doc)) for doc in per_doc if i < len(doc)]
    if not order:
        raise CqilError(f"the {split} split of {cfg.name!r} is empty; use more text or a larger {split}_fraction")
    if max_tokens is not None:
        n = max(1, max_tokens // cfg.block_size)
        if n > len(order):
            raise CqilError(f"asked for {max_tokens} {split} tokens but {cfg.name!r} has {len(order) * cfg.block_size}; "
                            "lower the token count or add text")
        order = order[:n]
    return torch.stack(order)
