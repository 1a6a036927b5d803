"""Result tables: every job writes CSV rows that carry their provenance (model, versions, command)."""
from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch
import transformers

from . import CqilError, __version__


def command() -> str:
    """The command line that produced a result, as a user would retype it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cqil", "__main__.py", "cli.py")):
        argv[0] = "cqil"
    return " ".join(shlex.quote(a) for a in argv)


def provenance(device: str = "cpu") -> dict:
    """Columns added to every result row."""
    return {
        "device": device if device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "cqil": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command(),
    }


def write_csv(rows: pd.DataFrame | list[dict], path: str | Path) -> Path:
    """Write atomically (temporary file, then rename): a crash never leaves half a table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CqilError(f"results file {path} does not exist; run the job that writes it first")
    return pd.read_csv(path)


def upsert_csv(rows: list[dict], path: str | Path, key: list[str]) -> Path:
    """Add rows to a results table, replacing earlier rows with the same key (a rerun updates its row)."""
    new = pd.DataFrame(rows)
    if Path(path).is_file():
        old = read_csv(path)
        if set(key) <= set(old.columns):
            keys = set(map(tuple, new[key].astype(str).to_numpy()))
            old = old[[tuple(k) not in keys for k in old[key].astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True)
    return write_csv(new, path)
