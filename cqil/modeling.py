"""The CQIL forward: the one definition every cqil job (and the multi-device runtime) reuses.

A plan groups consecutive decoder layers. Every member j of a group reads the group's input x:

    a_j     = Attn_j(RMSNorm_j(x))                                   (attention output)
    delta_k = a_k + MLP_k(RMSNorm'_k(x + a_k + sum_{j=k-D}^{k-1} a_j))  (bypass D: MLP input only)
    y       = x + sum_k delta_k                                       (group output)

With D=0 this is y = x + sum_k (L_k(x) - x). On P devices each member's delta is computed on its
own device and one all-reduce sums them (see cqil/runtime.py, which calls the two member
functions below).

How it plugs into transformers: `apply_plan` swaps the decoder's `layers` ModuleList for a
`CqilLayers` list holding the *same* layer modules, so parameter names, state dicts, peft
targets and per-layer KV caches (keyed by layer_idx) are unchanged. Only the slice that the HF
decoder loop takes (`self.layers[:num_hidden_layers]`) yields the plan's stages: a group object
or a plain layer. Masks, rotary embeddings, caches and generate() stay the library's own.

Self-contained on purpose (torch, transformers and the sibling plan.py only): `save_converted`
copies this file next to the weights as `modeling_cqil.py`, so a converted model loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where cqil is not installed.
cqil itself never imports that copy: it loads converted directories with the classes of this module.
(transformers refuses a remote-code file with an import statement of a module not shipped beside it,
even one inside a function; so `save_converted`, which the copy never runs, reaches cqil's own writer,
cqil.outputs, through importlib. plan.py does the same.)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel,
                          Qwen2Config, Qwen2ForCausalLM)

from .plan import Plan, PlanError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "cqil")


# ---- the group computation ---------------------------------------------------------------
def member_attention(layer: nn.Module, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
    """a_j = Attn_j(RMSNorm_j(x)) of one group member; updates its KV cache entry if given."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **attn_kwargs)
    return out


def member_mlp(layer: nn.Module, x: torch.Tensor, attn: torch.Tensor,
               bypass_in: torch.Tensor | None = None) -> torch.Tensor:
    """MLP_k(RMSNorm'_k(x + a_k [+ bypass])) (under tensor parallelism: this shard's partial sums)."""
    mlp_in = x + attn if bypass_in is None else x + attn + bypass_in
    return layer.mlp(layer.post_attention_layernorm(mlp_in))


def member_delta(layer: nn.Module, x: torch.Tensor, attn: torch.Tensor,
                 bypass_in: torch.Tensor | None = None) -> torch.Tensor:
    """delta_k = a_k + MLP_k(RMSNorm'_k(x + a_k [+ bypass])): the member's residual update."""
    return attn + member_mlp(layer, x, attn, bypass_in)


def bypass_input(attns: list[torch.Tensor], k: int, bypass: int) -> torch.Tensor | None:
    """Sum of the attention outputs of the min(bypass, k) members just before member k."""
    prev = attns[max(0, k - bypass):k]
    return torch.stack(prev).sum(0) if prev else None


def group_forward(layers: list[nn.Module], x: torch.Tensor, bypass: int = 0, **attn_kwargs) -> torch.Tensor:
    """y = x + sum_k delta_k over the group's layers, all reading the same input x."""
    attns = [member_attention(layer, x, **attn_kwargs) for layer in layers]
    deltas = [member_delta(layer, x, attns[k], bypass_input(attns, k, bypass)) for k, layer in enumerate(layers)]
    return x + torch.stack(deltas).sum(0)


class _Group:
    """One stage of the decoder loop: a group of layers, called like a decoder layer."""

    def __init__(self, layers: list[nn.Module], bypass: int):
        self.layers, self.bypass = layers, bypass
        self.attention_type = getattr(layers[0], "attention_type", None)

    def __call__(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                 past_key_values=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        stage = functools.partial(group_forward, self.layers, bypass=self.bypass, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
        first = self.layers[0]
        if getattr(first, "gradient_checkpointing", False) and first.training and past_key_values is None:
            # Activation checkpointing (model.activation_checkpointing_enable(), or the Trainer's flag) sets these
            # attributes on every decoder layer, but the members' own forward (where transformers checkpoints)
            # never runs inside a group: checkpoint the whole stage here instead, with the same function
            # (torch.utils.checkpoint): only the group's input is kept, its inside is recomputed in backward.
            out = first._gradient_checkpointing_func(stage, hidden_states)
        else:
            out = stage(hidden_states)
        # The members' own forward() never runs, so their forward hooks would stay silent; fire the last
        # member's with the stage's input and output. transformers records `output_hidden_states` with such
        # hooks: under a plan it then returns the embeddings plus one hidden state per stage.
        last = self.layers[-1]
        for hook_id, hook in list(last._forward_hooks.items()):
            args = (last, (hidden_states,), {}, out) if hook_id in last._forward_hooks_with_kwargs else \
                (last, (hidden_states,), out)
            result = hook(*args)
            out = out if result is None else result  # torch semantics: a hook may replace the output
        return out


class CqilLayers(nn.ModuleList):
    """The decoder's layer list under a plan (same modules, same names; sliced -> stages)."""

    def __init__(self, layers: nn.ModuleList, plan: Plan):
        super().__init__(layers)
        self.plan = plan.validate(len(layers))
        self.enabled = True
        self._stages = [self[g[0]] if len(g) == 1 else _Group([self[i] for i in g], plan.bypass)
                        for g in plan.stages(len(layers))]

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            return super().__getitem__(idx)
        if not self.enabled:
            return nn.ModuleList(list(self._modules.values())[idx])
        if idx.indices(len(self)) != (0, len(self), 1):
            raise PlanError("a CQIL model runs all its layers; slicing part of the stack is not supported")
        return list(self._stages)


# ---- applying, finding and switching off a plan ----------------------------------------
def decoder(model: nn.Module) -> nn.Module:
    """The module that owns `layers` (LlamaModel inside LlamaForCausalLM, peft wrappers, ...)."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens"):
            return m
    raise PlanError(f"{type(model).__name__} has no decoder layer stack; only LLaMA-family decoders are supported")


def check_supported(model: nn.Module) -> None:
    """Refuse models whose layers are not pre-norm attention + gated-MLP decoder layers."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PlanError(f"model type {model_type!r} is not supported; cqil supports LLaMA-family "
                        f"decoders ({', '.join(SUPPORTED_MODEL_TYPES[:-1])})")
    dec = decoder(model)
    layer = dec.layers[0]
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(layer, name):
            raise PlanError(f"{type(layer).__name__} has no {name}; not a LLaMA-family decoder layer")
    if "self.layers[:" not in inspect.getsource(type(dec).forward).replace(" ", ""):
        raise PlanError(f"{type(dec).__name__}.forward does not loop over self.layers[:n]; "
                        "this transformers version is not supported by cqil")
    if len(set(getattr(config, "layer_types", None) or ["full_attention"])) > 1:
        raise PlanError("models mixing sliding-window and full attention layers are not supported")


def _is_cqil_layers(layers: nn.Module) -> bool:
    """A CqilLayers, including one from a converted model's own copy of this file (loaded as remote code,
    so a different class object): checked by its attributes, not by isinstance."""
    return isinstance(layers, nn.ModuleList) and hasattr(layers, "plan") and hasattr(layers, "enabled")


def apply_plan(model: PreTrainedModel, plan: Plan) -> PreTrainedModel:
    """Turn `model` into its CQIL form in place (no weights change) and record the plan in its config."""
    check_supported(model)
    dec = decoder(model)
    layers = dec.layers
    base = nn.ModuleList(list(layers)) if _is_cqil_layers(layers) else layers
    dec.layers = CqilLayers(base, plan) if plan.groups else base
    model.config.cqil_plan = plan.to_dict() if plan.groups else None
    return model


def get_plan(model: nn.Module) -> Plan:
    """The plan applied to `model` (empty Plan() if none)."""
    layers = decoder(model).layers
    return Plan.from_dict(layers.plan.to_dict()) if _is_cqil_layers(layers) else Plan()


@contextlib.contextmanager
def plan_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original sequential model inside the block (same weights): the distillation teacher."""
    layers = decoder(model).layers
    was = getattr(layers, "enabled", None)
    if was is not None:
        layers.enabled = False
    try:
        yield model
    finally:
        if was is not None:
            layers.enabled = was


# ---- the saved form: a transformers model class per family -------------------------------------
# cqil loads a saved directory with the classes below (cqil.models: its config's `architectures` names one,
# inputs.CONVERTED_ARCHITECTURES); stock transformers loads the copy saved beside the weights, as remote code.
# The saved config says the family's model_type ("llama", "mistral", "qwen2": so AutoTokenizer and AutoConfig read
# it without remote code, asking nothing and warning nothing) while its auto_map names the classes below. Its
# weights are saved as the "cqil" variant (model.cqil.safetensors), which only these classes look for: loaded by
# stock transformers without trust_remote_code=True, the directory fails loudly instead of running silently as
# the sequential model.
WEIGHTS_VARIANT = "cqil"


class _CqilConfig:
    """Mixed into a family's config class: its settings plus `cqil_plan` ({'groups': [...], 'bypass': D})."""

    def __init__(self, cqil_plan: dict | None = None, **kwargs):
        self.cqil_plan = cqil_plan
        super().__init__(**kwargs)


class _CqilModel:
    """Mixed into a family's causal-LM class: its decoder runs the plan in `config.cqil_plan`."""

    def __init__(self, config):
        super().__init__(config)
        if config.cqil_plan:
            apply_plan(self, Plan.from_dict(config.cqil_plan, config.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        return super().from_pretrained(*args, **kwargs)


class CqilConfig(_CqilConfig, LlamaConfig):
    """LlamaConfig plus `cqil_plan`."""
    model_type = "llama"  # the saved config reads as the family's (see above); its class is this one


class CqilForCausalLM(_CqilModel, LlamaForCausalLM):
    """LlamaForCausalLM whose decoder runs the plan in `config.cqil_plan`."""
    config_class = CqilConfig


class CqilMistralConfig(_CqilConfig, MistralConfig):
    """MistralConfig plus `cqil_plan`."""
    model_type = "mistral"


class CqilMistralForCausalLM(_CqilModel, MistralForCausalLM):
    """MistralForCausalLM (sliding-window attention) whose decoder runs the plan in `config.cqil_plan`."""
    config_class = CqilMistralConfig


class CqilQwen2Config(_CqilConfig, Qwen2Config):
    """Qwen2Config plus `cqil_plan`."""
    model_type = "qwen2"


class CqilQwen2ForCausalLM(_CqilModel, Qwen2ForCausalLM):
    """Qwen2ForCausalLM (q/k/v biases, optional sliding window) whose decoder runs the plan in `config.cqil_plan`."""
    config_class = CqilQwen2Config


# The saved form of each family (its model_type): (config class, model class); the model class's name is the saved
# config's `architectures`.
CQIL_CLASSES = {"llama": (CqilConfig, CqilForCausalLM), "mistral": (CqilMistralConfig, CqilMistralForCausalLM),
                "qwen2": (CqilQwen2Config, CqilQwen2ForCausalLM)}


def converted_classes(architecture: str) -> tuple[type, type]:
    """(config class, model class) of a saved CQIL model from its config's `architectures` entry."""
    for pair in CQIL_CLASSES.values():
        if pair[1].__name__ == architecture:
            return pair
    raise PlanError(f"{architecture!r} is not a CQIL model class ({', '.join(c.__name__ for _, c in CQIL_CLASSES.values())})")


def cqil_class(config) -> type | None:
    """cqil's own model class for a CQIL config object (one of CQIL_CLASSES' configs); None for any other config."""
    pair = CQIL_CLASSES.get(getattr(config, "model_type", None))
    return pair[1] if pair is not None and isinstance(config, pair[0]) else None


def is_converted_dir(path: str | Path) -> bool:
    """A directory that save_converted wrote (it always holds the modeling code)."""
    return (Path(path) / "modeling_cqil.py").is_file()


def save_converted(model: PreTrainedModel, tokenizer, out_dir: str | Path, job: str = "convert") -> Path:
    """Save a CQIL model: cqil loads it with this module's classes, standard tools with trust_remote_code=True.

    Writes weights (the "cqil" variant), tokenizer, config.json (cqil_plan, auto_map) and the modeling code
    (this file as modeling_cqil.py, plus plan.py), atomically (write_dir): an interrupted save leaves
    the previous directory as it was. An existing `out_dir` is replaced only if it is itself such a
    directory, holding nothing its manifest does not list; anything else is refused, never deleted.
    """
    outputs = importlib.import_module("cqil.outputs")  # not an import statement: see the module docstring
    family = model.config.model_type
    if family not in CQIL_CLASSES:
        raise PlanError(f"cannot save a converted {family!r} model: cqil saves {', '.join(CQIL_CLASSES)} models")
    config_class, model_class = CQIL_CLASSES[family]
    cfg = model.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version"):
        cfg.pop(k, None)
    config = config_class(**cfg)
    config.cqil_plan = get_plan(model).to_dict() if get_plan(model).groups else None
    architectures = [model_class.__name__]  # how cqil.inputs.is_converted_config knows the directory
    config.architectures = architectures
    config.auto_map = {"AutoConfig": f"modeling_cqil.{config_class.__name__}",
                       "AutoModelForCausalLM": f"modeling_cqil.{model_class.__name__}"}

    def write(tmp: Path) -> None:
        original, model.config = model.config, config
        try:
            model.save_pretrained(tmp, variant=WEIGHTS_VARIANT)
        finally:
            model.config = original
        saved = json.loads((tmp / "config.json").read_text())  # save_pretrained names the class it was called on
        (tmp / "config.json").write_text(json.dumps({**saved, "architectures": architectures}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        here = Path(__file__).resolve().parent
        shutil.copy(here / Path(__file__).name, tmp / "modeling_cqil.py")
        shutil.copy(here / "plan.py", tmp / "plan.py")

    return outputs.write_dir(out_dir, write, outputs.MODEL, job)
