"""Load a LLaMA-family model and its tokenizer from one string: bundled name, directory, GGUF or hub id.

Resolution order of `model.path`:
  1. a bundled name (BUNDLED below): a real model shipped in a registry package, dequantized once
     and cached as a plain safetensors checkpoint under $CQIL_CACHE/models/<name>;
  2. an existing directory with config.json (a HF checkpoint, or a `cqil convert` output);
  3. an existing `.gguf` file;
  4. otherwise a hub id (needs network; offline it fails with a message that says so).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

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
    """Dequantize a GGUF file into a plain HF checkpoint (a GGUF-loaded model cannot save itself)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def bundled_checkpoint(name: str) -> Path:
    """The cached plain checkpoint of a bundled model, made on first use."""
    package, filename = BUNDLED[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    try:
        dist = importlib.metadata.distribution(package)  # located, not imported: it has a CLI plugin
    except importlib.metadata.PackageNotFoundError:
        raise CqilError(f"bundled model {name!r} needs the package {package}; run `make install`") from None
    gguf = Path(dist.locate_file(f"{package.replace('-', '_')}/{filename}"))
    if not gguf.is_file():
        raise CqilError(f"{gguf} is missing from the {package} package; reinstall it with `make install`")
    out.parent.mkdir(parents=True, exist_ok=True)
    return _gguf_to_checkpoint(gguf, out)


def resolve(path: str) -> tuple[str, dict]:
    """(location, extra from_pretrained kwargs) for a model string; see the module docstring."""
    kind, where = checks.locate_model(path)
    if kind == "bundled":
        return str(bundled_checkpoint(path)), {}
    if kind == "gguf":
        return str(where.parent), {"gguf_file": where.name}
    return str(where), {}  # a checkpoint directory, or a hub id such as meta-llama/Llama-2-7b-hf


def load(cfg: ModelConfig | dict, trust_remote_code: bool = True):
    """Load (model, tokenizer) in eval mode; refuse non-LLaMA-family architectures."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**cfg)
    if cfg.dtype not in DTYPES:
        raise CqilError(f"model.dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    location, extra = resolve(cfg.path)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(e).lower() or "offline" in str(e).lower()
        why = "the hub is unreachable from here" if offline else str(e).splitlines()[0]
        raise CqilError(f"cannot load model {cfg.path!r}: not bundled ({', '.join(BUNDLED)}), not a local "
                        f"directory or .gguf file, and as a hub id it failed ({why}); "
                        "pass model.path=<local dir|file.gguf|bundled name>") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CqilError(f"model {cfg.path!r} is a {config.model_type!r} model; cqil supports LLaMA-family "
                        f"decoders ({', '.join(SUPPORTED_MODEL_TYPES)}: RMSNorm, rotary, gated MLP)")
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"  # a bare config otherwise drops the mask silently
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=DTYPES[cfg.dtype],
                                                 trust_remote_code=trust_remote_code, **extra)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(checks.resolve_device(cfg.device)).eval(), tokenizer
