"""Where cqil's own files live: its configs and its cache. Any module, job or library, may import this one;
it imports nothing from cqil (and neither torch nor transformers)."""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path


def conf_dir() -> Path:
    """The configs: $CQIL_CONF if set; in a checkout (editable install or PYTHONPATH) its top-level conf/, the
    source of truth; in an installed wheel the copy shipped as the package's `conf` resource (pyproject.toml)."""
    if "CQIL_CONF" in os.environ:
        return Path(os.environ["CQIL_CONF"])
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return checkout / "conf"
    return Path(str(importlib.resources.files("cqil") / "conf"))


def cache_dir() -> Path:
    """Where cqil keeps dequantized models, offline texts, eval data and teacher text ($CQIL_CACHE, default
    ~/.cache/cqil)."""
    return Path(os.environ.get("CQIL_CACHE", Path.home() / ".cache" / "cqil"))
