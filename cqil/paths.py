"""Where cqil's own files live: its configs and its cache. Any module, job or library, may import this one;
it imports nothing from cqil (and neither torch nor transformers)."""
from __future__ import annotations

import os
from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config directory: $CQIL_CONF, default the repository's conf/."""
    return Path(os.environ.get("CQIL_CONF", Path(__file__).resolve().parent.parent / "conf"))


def cache_dir() -> Path:
    """Where cqil keeps dequantized models, offline texts, eval data and teacher text ($CQIL_CACHE, default
    ~/.cache/cqil)."""
    return Path(os.environ.get("CQIL_CACHE", Path.home() / ".cache" / "cqil"))
