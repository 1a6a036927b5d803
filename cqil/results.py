"""Result tables: every job writes CSV rows that carry their provenance (model, versions, command)."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import CqilError, __version__, outputs
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
        # the installed versions, read without importing them (a table writer need not load torch)
        "torch": importlib.metadata.version("torch"), "transformers": importlib.metadata.version("transformers"),
        "cqil": __version__,
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
    """Write a whole CSV atomically (a unique temporary file, then rename; cqil.outputs.write_file): a crash
    never leaves half a table and a reader never sees one. A job's result tables go through update_table."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return outputs.write_file(path, lambda tmp: df.to_csv(tmp, index=False))


def read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CqilError(f"results file {path} does not exist; run the job that writes it first")
    return pd.read_csv(path)


def _cell(v) -> str:
    """A key cell as text, the same whether it came from this run or was read back from the CSV (5 and 5.0, None and NaN)."""
    if pd.isna(v):
        return ""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _keys(df: pd.DataFrame, key: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(map(_cell, row)) for row in df[list(key)].itertuples(index=False, name=None)]


def update_table(table: str, rows: pd.DataFrame | list[dict], path: str | Path,
                 drop: Callable[[pd.DataFrame], pd.Series] | None = None) -> Path:
    """Add a run's rows to the result table `table` (cqil.outputs.TABLES) at `path`, under the table's lock:
    earlier rows with the key of a new row are replaced, earlier rows where `drop(old)` is True removed,
    every other row (other runs') kept. A file there that is not this table (its header lacks the
    schema's columns) is refused, never overwritten. The rows must have the schema's columns and provenance
    (a writer that drops one would write a table that cqil no longer recognises as its own)."""
    schema = outputs.TABLES[table]
    new = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    with outputs.lock(path):
        exists = outputs.through(path).exists()
        missing = schema.missing(path) if exists else []
        if missing != []:  # a file that is not this table: the user's, never overwritten
            why = f"it lacks the column(s) {', '.join(missing[:4])}" if missing else "it is not a readable CSV"
            raise CqilError(f"{path} is not a cqil {table} table ({why}); cqil never overwrites other files: "
                            "choose another path, or move that file away")
        lacks = schema.lacks(list(new.columns)) if len(new) else []
        assert not lacks, f"rows of the {table} table lack {', '.join(lacks)} (cqil.outputs.TABLES declares them)"
        if exists:
            old = pd.read_csv(outputs.through(path))
            keep = pd.Series(True, index=old.index)
            if len(new) and set(schema.key) <= set(old.columns):  # rows from before a key column never match
                mine = set(_keys(new, schema.key))
                keep &= pd.Series([k not in mine for k in _keys(old, schema.key)], index=old.index)
            if drop is not None and len(old):
                keep &= ~drop(old).astype(bool)
            new = pd.concat([old[keep], new], ignore_index=True) if len(new) and keep.any() else \
                (new if len(new) else old[keep])
        elif not len(new):
            return Path(path)
        return write_csv(new, path)
