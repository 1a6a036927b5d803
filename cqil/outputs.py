"""What cqil writes, and what it promises about it: only over its own outputs, never half-written,
tables updated under a lock, with the user's umask. Imports neither torch nor pandas: cqil.checks uses
the ownership tests before any work.

Directories. A directory cqil writes (a converted or merged model, an adapter: `write_dir`) carries a
manifest, MANIFEST, that lists every entry cqil wrote there, with the kind of directory, the job and
cqil's version. Replacing such a directory is allowed only when its manifest is of the same kind and
lists everything in it: a user's file added inside it, or a directory without a manifest, is refused
with the first foreign entry named (`foreign`), and nothing is deleted. A `cqil finetune` out_dir is
added to, never replaced: its manifest (kind FINETUNE, `claim`) is what makes it one (no file name that
anything could have). The directory is written to a unique temporary sibling (created with the user's
umask, unlike tempfile.mkdtemp's 0700) that replaces the old one in one atomic step.

Files. `write_file` writes a unique temporary sibling (opened normally, so the umask applies) and renames
it over the target: a reader sees the old file or the new one, never an empty or partial one, and two
writers never share a temporary name. A symlink given as an output is written through: the file or
directory it points at is replaced, the link stays (`through`).

Tables. TABLES is the one declaration of every result table: the columns that make a CSV that table
(`Table.ours`: a CSV that lacks them is not cqil's, whatever else it has; every row a job writes has them,
with PROVENANCE), the key of a run's rows (cqil.results replaces only the rows of the key it writes, under
`lock`, a filelock beside the table), and its values (what a run measures). READS declares what each reader of
a table computes with (a figure of cqil plot, cqil latency): the columns it needs and those that must be numbers;
cqil.checks checks a table against it before the reader runs.
"""
from __future__ import annotations

import contextlib
import ctypes
import csv
import glob
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from . import CqilError, __version__

MANIFEST = ".cqil-manifest.json"
MODEL = "cqil model directory"  # cqil convert out_dir, <finetune out_dir>/merged and /converted
ADAPTER = "peft adapter"        # <finetune out_dir>/adapter
FINETUNE = "cqil finetune output"  # a finetune out_dir: checkpoints, run.json and the three above
FINETUNE_PARTS = {"adapter": ADAPTER, "merged": MODEL, "converted": MODEL}


# ---- paths ---------------------------------------------------------------------------------------
def through(path: str | Path) -> Path:
    """Where a write to `path` lands: a symlink is followed (written through), anything else is as given."""
    path = Path(path).expanduser()
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temp(path: Path, suffix: str = "tmp") -> Path:
    """A sibling name no other writer uses: `.<name>.<pid>-<random>.<suffix>` (found again by _remove_stale)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def _remove_stale(out: Path) -> None:
    """Clear what a killed writer of `out` left: its temporary sibling goes; a previous `out` it had
    renamed aside (no atomic swap on this OS) goes back in place if nothing replaced it."""
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(\d+)-\w+\.(tmp|old)", p.name)
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)
            continue  # its writer is still running
        except PermissionError:  # alive, another user's
            continue
        except ProcessLookupError:
            pass
        if m[2] == "old" and not out.exists():
            p.rename(out)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ---- files ---------------------------------------------------------------------------------------
def write_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a new file that then replaces `path` (followed through a symlink) in one rename."""
    path = through(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def lock(path: str | Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the lock of file `path` (a hidden `.<name>.lock` beside it) while reading and rewriting it."""
    path = through(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock"), timeout=timeout_s):
        yield


# ---- directories ---------------------------------------------------------------------------------
def manifest(d: str | Path) -> dict | None:
    """The manifest cqil left in directory `d`, or None (none, unreadable, not cqil's form)."""
    try:
        m = json.loads((Path(d) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("kind"), str) and isinstance(m.get("files"), list)
    return m if ok else None


def entries(d: Path) -> list[str]:
    """Every entry under `d` but the manifest, as relative paths (directories end in '/'; links are not followed)."""
    out = []
    for root, dirs, files in os.walk(d):
        rel = Path(root).relative_to(d)
        for name in list(dirs):
            if (Path(root) / name).is_symlink():
                dirs.remove(name)
                files.append(name)
            else:
                out.append(f"{(rel / name).as_posix()}/")
        out += [(rel / name).as_posix() for name in files]
    return sorted(e for e in out if e != MANIFEST)


def foreign(d: str | Path, kind: str) -> str | None:
    """The first entry of `d` that cqil did not write there as a `kind` directory; None when `d` is absent,
    empty, or all cqil's (then it may be replaced)."""
    d = through(d)
    if not d.exists():
        return None
    if not d.is_dir():
        return d.name
    found = entries(d)
    m = manifest(d)
    if m is None or m["kind"] != kind:
        return next((e for e in found if "/" not in e.rstrip("/")), None)  # a top-level entry
    listed = set(m["files"])
    return next((e for e in found if e not in listed), None)


def owned(d: str | Path, kind: str) -> bool:
    """`d` holds a manifest of `kind` (an output cqil adds to, such as a finetune out_dir)."""
    m = manifest(through(d))
    return m is not None and m["kind"] == kind


def refuse_foreign(d: str | Path, kind: str) -> None:
    """CqilError unless `d` may be written as a `kind` directory (see `foreign`)."""
    first = foreign(d, kind)
    if first is not None:
        raise CqilError(f"{d} holds {first!r}, which cqil did not write there (no {MANIFEST} of a {kind} "
                        "lists it); cqil never deletes or mixes into a user's files: choose a new or empty directory, "
                        "or move that away")


def _manifest_text(kind: str, job: str, files: list[str]) -> str:
    return json.dumps({"cqil": __version__, "kind": kind, "job": job, "files": files}, indent=1) + "\n"


def claim(d: str | Path, kind: str, job: str, files: list[str]) -> None:
    """Mark directory `d` (created if needed) as a `kind` output of `job` that cqil adds `files` to."""
    d = through(d)
    d.mkdir(parents=True, exist_ok=True)
    write_text(d / MANIFEST, _manifest_text(kind, job, files))


def add_file(d: str | Path, name: str, text: str, kind: str) -> Path:
    """Write `name` (a model card) into `d`, a `kind` directory cqil wrote, and list it in the manifest first (a
    crash in between leaves a listed name without its file, which no ownership check minds)."""
    d = through(d)
    m = manifest(d)
    if m is None or m["kind"] != kind:
        raise CqilError(f"{d} is not a {kind} cqil wrote (no {MANIFEST} of that kind); not adding {name} to it")
    write_text(d / MANIFEST, _manifest_text(kind, m["job"], sorted({*m["files"], name})))
    return write_text(d / name, text)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_dir(out: str | Path, write: Callable[[Path], None], kind: str, job: str) -> Path:
    """Write a `kind` directory atomically: `write(tmp)` fills a temporary sibling, which gets the manifest
    of what it holds and then replaces `out` (followed through a symlink).

    `out` must be absent, empty or a `kind` directory holding only what its manifest lists (else CqilError,
    before anything is written). A crash at any point leaves the previous `out` whole (where the OS can
    swap directories in one step, Linux; elsewhere the old one is first renamed aside and removed only
    after the new one is in place).
    """
    out = through(out)
    refuse_foreign(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = _temp(out)
    tmp.mkdir()  # the umask applies (tempfile.mkdtemp would make it 0700)
    try:
        write(tmp)
        (tmp / MANIFEST).write_text(_manifest_text(kind, job, entries(tmp)), encoding="utf-8")
        if not out.exists():
            tmp.rename(out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # tmp now holds the previous directory
        else:
            aside = _temp(out, "old")
            out.rename(aside)
            tmp.rename(out)
            shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- tables --------------------------------------------------------------------------------------
PROVENANCE = ("device", "torch", "transformers", "cqil", "date", "command")  # cqil.results.provenance


@dataclass(frozen=True)
class Table:
    """One kind of result table: `columns` every such table has (with PROVENANCE), `key` the columns
    whose values name a run's rows (a run replaces the earlier rows of its key and keeps all others;
    () for a table written whole), `values` the columns of what a run measures (among `columns`)."""
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert set(self.values) <= set(self.columns), f"{self.name}: its values are among its columns"

    def header(self, path: str | Path) -> list[str] | None:
        """The header of the CSV at `path` (None: unreadable or not a CSV)."""
        try:
            with open(through(path), newline="", encoding="utf-8") as f:
                return next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return None

    def lacks(self, header: list[str]) -> list[str]:
        """The schema's columns (PROVENANCE included) that `header` does not have."""
        return [c for c in (*self.columns, *PROVENANCE) if c not in header]

    def missing(self, path: str | Path) -> list[str] | None:
        """The schema's columns the table at `path` lacks ([]: it is this table); None if it cannot be read."""
        header = self.header(path)
        return None if header is None else self.lacks(header)

    def ours(self, path: str | Path) -> bool:
        return self.missing(path) == []


def _tables(*tables: Table) -> dict[str, Table]:
    return {t.name: t for t in tables}


TABLES = _tables(
    Table("similarity", ("model", "data", "n_tokens", "n_layers", "layer_i", "layer_j", "cos_mean", "cos_std"),
          key=("model", "data"), values=("cos_mean", "cos_std")),
    Table("convert", ("model", "data", "n_tokens", "variant", "plan", "plan_json", "perplexity", "ppl_ratio"),
          key=("model", "data", "n_tokens", "variant", "plan"), values=("perplexity", "ppl_ratio")),
    Table("sweep", ("model", "data", "n_tokens", "group_size", "start", "end", "plan", "plan_json", "perplexity"),
          key=("model", "data", "n_tokens", "plan"), values=("perplexity",)),
    Table("plan candidates", ("model", "data", "n_tokens", "plan", "plan_json", "group_size", "ppl_ratio",
                              "pareto", "chosen"), key=("model", "data", "n_tokens"), values=("ppl_ratio",)),
    Table("plan probes", ("model", "data", "n_tokens", "plan", "plan_json", "recipe", "steps", "probe_ratio"),
          key=("model", "data", "n_tokens"), values=("probe_ratio",)),
    # a loss curve per run (its out_dir); tables from before the `run` column keep their rows
    Table("finetune loss", ("step", "tokens", "loss", "model", "plan", "data", "loss_kind"), key=("run", "step"),
          values=("loss",)),
    Table("recovery curve", ("model", "plan", "recipe", "lora_layers", "lr", "max_steps", "step", "tokens",
                             "ppl_original", "ppl_finetuned"),
          key=("model", "plan", "recipe", "options", "loss_kind", "lora_layers", "lr", "max_steps", "step"),
          values=("ppl_original", "ppl_finetuned")),
    Table("finetune", ("model", "plan", "data", "steps", "block_size", "lora_r", "lr", "seed", "ppl_original",
                       "ppl_converted", "ppl_finetuned"),
          key=("model", "plan", "data", "steps", "block_size", "recipe", "options", "loss_kind", "lora_r", "lora_layers",
               "lr", "seed"), values=("ppl_original", "ppl_converted", "ppl_finetuned")),
    Table("bench", ("model", "plan", "plan_json", "devices", "tp", "setup", "phase", "prompt_tokens", "batch_size",
                    "median_ms"), key=("model", "plan_json", "devices", "tp", "device"), values=("median_ms",)),
    Table("eval", ("model", "label", "task", "dataset", "metric", "value"), key=("model", "label", "task", "dataset"),
          values=("value",)),
    Table("generate", ("model", "plan", "plan_json", "devices", "tp", "n_prompts", "ttft_ms_median", "tpot_ms_median"),
          key=("model", "plan", "devices", "tp", "device", "dtype", "comm", "lm_head", "ungrouped", "compile", "n_prompts",
               "batch_size", "max_new_tokens", "temperature", "top_k", "top_p"),
          values=("ttft_ms_median", "tpot_ms_median")),
    Table("latency validation", ("role", "kind", "source", "model", "plan", "setup", "phase", "measured_ms",
                                 "predicted_ms"), key=("role", "source"), values=("measured_ms", "predicted_ms")),
    Table("latency parameters", ("parameter", "phase", "comm", "value", "unit"), key=("parameter", "phase", "comm"),
          values=("value",)),
    Table("latency external", ("source", "model", "hardware", "role", "quantity", "devices", "plan", "setup",
                               "published", "predicted"),
          key=("source", "model", "hardware", "quantity", "devices", "plan", "setup"), values=("published", "predicted")),
    Table("latency hybrid", ("model", "hardware", "gpu", "phase", "prompt_tokens", "batch_size", "devices",
                             "tp_latency_ms", "hybrid_latency_ms"),
          key=("model", "hardware", "phase", "prompt_tokens", "batch_size", "devices"),
          values=("tp_latency_ms", "hybrid_latency_ms")),
    Table("latency hybrid candidates", ("model", "hardware", "gpu", "phase", "prompt_tokens", "batch_size", "devices",
                                        "P", "T", "ungrouped", "plan", "latency_ms"),
          key=("model", "hardware", "phase", "prompt_tokens", "batch_size", "devices", "P", "T", "ungrouped", "plan"),
          values=("latency_ms",)),
    # the layer-step microbenchmark (cqil/layerstep.py), written whole by scripts/layer_step.py and make gpu-check
    Table("layer step", ("gpu", "shape", "shard", "mode", "bytes", "median_us", "p10_us", "p90_us", "fit_c0_us",
                         "fit_bandwidth_gbs"), key=(), values=("median_us", "p10_us", "p90_us")),
)


@dataclass(frozen=True)
class Read:
    """What one reader of a `table` computes with: the `columns` it needs (a table without them is refused before
    it runs), the columns that must hold a finite number in every row where present (`numeric`), and
    `numeric_where`: column -> the columns that must be numbers on the rows where that column is not empty."""
    table: str
    columns: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    numeric_where: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.table in TABLES, f"a reader reads one of TABLES, not {self.table!r}"


_SIMILARITY = ("model", "data", "n_tokens", "layer_i", "layer_j", "cos_mean", "cos_std")

READS = {
    # cqil plot: each figure's table (a config key of conf/plot.yaml), with the columns its drawing reads (cqil/plots.py)
    "similarity_csv": Read("similarity", _SIMILARITY, numeric=("layer_i", "layer_j", "cos_mean", "cos_std")),
    "eval_csv": Read("eval", ("model", "label", "task", "dataset", "metric", "filter", "value", "stderr", "n", "plan", "plan_json",
                              "lm_eval"), numeric=("value",)),
    "sweep_csv": Read("sweep", ("model", "data", "n_tokens", "group_size", "start", "end", "bypass", "perplexity"),
                      numeric=("group_size", "perplexity")),
    "plan_candidates_csv": Read("plan candidates", (
        "model", "data", "n_tokens", "group_size", "n_groups", "start", "plan", "plan_json", "ideal_latency_reduction",
        "ppl_ratio", "contiguous", "greedy_step", "pareto", "chosen", "budget", "max_ppl_ratio", "log_ppl_increase",
        "predicted_log_ppl_increase"), numeric=("n_groups", "ideal_latency_reduction", "ppl_ratio", "max_ppl_ratio")),
    "plan_probes_csv": Read("plan probes", (
        "model", "data", "n_tokens", "group_size", "n_groups", "start", "plan", "plan_json", "ideal_latency_reduction",
        "ppl_ratio", "probe_ratio", "steps", "recipe", "chosen", "max_ppl_ratio"),
        numeric=("ideal_latency_reduction", "ppl_ratio", "probe_ratio", "steps", "max_ppl_ratio")),
    "finetune_loss_csv": Read("finetune loss", ("model", "plan", "step", "tokens", "loss", "loss_kind"),
                              numeric=("step", "tokens", "loss")),
    "recovery_curve_csv": Read("recovery curve", (
        "model", "plan", "data", "recipe", "lora_layers", "lr", "max_steps", "tokens", "ppl_finetuned", "top1_finetuned",
        "train_seconds", "gap_recovered", "device"),
        numeric=("tokens", "ppl_finetuned", "top1_finetuned", "train_seconds", "gap_recovered")),
    "bench_csv": Read("bench", ("model", "plan", "device", "setup", "phase", "prompt_tokens", "batch_size", "median_ms",
                                "reduction", "p90_ms", "ideal_reduction"),
                      numeric=("prompt_tokens", "batch_size", "median_ms", "reduction", "ideal_reduction")),
    "latency_validation_csv": Read("latency validation", (
        "model", "role", "phase", "plan", "measured_ms", "predicted_ms", "error_pct", "measured_reduction",
        "predicted_reduction"),
        numeric=("measured_ms", "predicted_ms", "error_pct", "measured_reduction", "predicted_reduction")),
    "latency_hybrid_csv": Read("latency hybrid", ("model", "hardware", "phase", "prompt_tokens", "batch_size", "devices",
                                                  "speedup_vs_tp", "fits", "best_p", "best_t", "tp_fits", "tp_shardable"),
                               numeric=("prompt_tokens", "batch_size", "devices")),
    "scale_similarity_csv": Read("similarity", (*_SIMILARITY, "n_layers"),
                                 numeric=("n_layers", "layer_i", "layer_j", "cos_mean")),
    "scale_candidates_csv": Read("plan candidates", ("model", "n_groups", "ideal_latency_reduction", "ppl_ratio",
                                                     "contiguous", "greedy_step", "chosen"),
                                 numeric=("n_groups", "ideal_latency_reduction", "ppl_ratio")),
    "scale_eval_csv": Read("eval", ("model", "label", "task", "dataset", "metric", "value", "stderr", "reference",
                                    "ideal_latency_reduction", "parameters"),
                           numeric=("value", "ideal_latency_reduction", "parameters")),
    # plan=auto: the similarity matrix its search starts from (cqil/planning.py)
    "plan similarity": Read("similarity", ("layer_i", "layer_j", "cos_mean", "n_layers"),
                            numeric=("layer_i", "layer_j", "cos_mean", "n_layers")),
    # cqil latency: the bench tables it calibrates and validates on (cqil/latency.py); the collectives' sizes and
    # timings are numbers on the rows of multi-process setups (those name their communicator)
    "latency bench": Read("bench", (
        "plan", "plan_json", "n_layers", "devices", "tp", "setup", "phase", "prompt_tokens", "batch_size", "median_ms",
        "reduction", "comm", "lm_head", "ungrouped", "hidden_size", "dtype_bytes", "layer_ms", "head_ms", "rest_ms",
        "allreduce_ms", "broadcast_ms", "comm_bytes"),
        numeric=("n_layers", "devices", "tp", "prompt_tokens", "batch_size", "median_ms", "reduction", "hidden_size",
                 "dtype_bytes", "layer_ms", "head_ms", "rest_ms"),
        numeric_where={"comm": ("comm_bytes", "allreduce_ms", "broadcast_ms", "mesh_p", "mesh_t")}),
    # cqil latency's layer_step.csv: the fit t = c0 + bytes / bandwidth
    "latency layer step": Read("layer step", (*TABLES["layer step"].columns, "torch", "command"),
                               numeric=("bytes", "median_us")),
}
