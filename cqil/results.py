"""Result tables: every job writes CSV rows that carry their provenance (model, versions, command)."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch
import transformers

from . import CqilError, __version__
from .plan import Plan

BENCH_BASELINE = "original, 1 device"  # setup (a) of cqil bench: what latency reductions are measured against


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


def plan_columns(plan: Plan, num_layers: int | None = None) -> dict:
    """The columns that name a plan in every results table: `plan` (its short name, for people) and
    `plan_json` (what `Plan.from_dict(json.loads(...))` reads back: no table is parsed by regex);
    with num_layers also its ideal latency reduction g(P-1)/n."""
    cols = {"plan": plan.describe(), "plan_json": json.dumps(plan.to_dict(), separators=(",", ":"))}
    if num_layers is not None:
        cols["ideal_latency_reduction"] = round(plan.ideal_latency_reduction(num_layers), 4)
    return cols


def plan_of(row) -> Plan:
    """The plan of a results row (a dict, a pandas row or namedtuple with `plan_json`)."""
    text = row["plan_json"] if isinstance(row, dict) else getattr(row, "plan_json", None)
    if not isinstance(text, str):
        raise CqilError("this results table has no plan_json column (made by an older cqil); rerun the job that wrote it")
    return Plan.from_dict(json.loads(text))


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
        # a key column that older rows lack (added since) reads as empty, as an empty value does
        keys = set(map(tuple, new.reindex(columns=key).fillna("").astype(str).to_numpy()))
        old = old[[tuple(k) not in keys for k in old.reindex(columns=key).fillna("").astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True)
    return write_csv(new, path)
