"""The config groups as typed objects: model, data, plan and recipe (conf/model/, conf/data/, conf/plan/, conf/recipe/).

A job gets its config from Hydra as a DictConfig; cqil.checks validates every value (one line and exit 2 on bad
input) and then the job builds each group it uses once, here: `model_config(cfg.model)`, `data_config(cfg.data)`,
`plan_config(cfg.plan)`, `recipe_config(cfg)`; a group named in a value (evaluate's texts, plan.probe.recipe) is read
by name with `data_by_name` / `recipe_node`. A builder refuses a key its dataclass lacks, so a key added to a YAML file needs its
field here (and its check in cqil/checks.py); tests/test_config.py builds every file of every group.
Torch-free (checks and `cqil plot` may import it); imports nothing from cqil but paths and plan.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

from . import CqilError
from .paths import conf_dir
from .plan import Plan, plan_from_config


@dataclass
class ModelConfig:
    """The `model` group (conf/model/*.yaml)."""
    name: str
    path: str
    dtype: str = "float32"
    device: str = "cpu"  # auto: cuda if available, else cpu
    trust_remote_code: bool = False  # run code that comes with the model (its auto_map)


@dataclass
class DataConfig:
    """The `data` group (conf/data/*.yaml)."""
    name: str
    files: list[str] = field(default_factory=list)  # relative: working directory, else $CQIL_CACHE/texts
    hf: dict | None = None                            # {path, name, split, text_field}
    block_size: int = 512
    calibration_fraction: float = 0.1
    evaluation_fraction: float = 0.1


@dataclass
class ProbeConfig:
    """plan=auto's recovery probe (plan.probe)."""
    recipe: str
    overrides: list[str] = field(default_factory=list)
    steps: int = 16
    max_before_ratio: float = 3.0
    search: str = "bisect"
    table: str | None = None


@dataclass
class LatencyConfig:
    """The latency model's setting that plan=auto ranks by with rank_by=latency (plan.latency)."""
    hardware: str
    phase: str = "prefill"
    prompt_tokens: int = 128
    batch_size: int = 1
    lm_head: str = "sharded"
    ungrouped: str = "replicated"


@dataclass
class PlanConfig:
    """The `plan` group (conf/plan/*.yaml): one mode's keys are set, the others' stay None (see each file)."""
    mode: str = "manual"  # manual | file | auto
    # manual
    start: int | None = None
    end: int | None = None
    group_size: int | None = None
    bypass: int | None = None  # also plan=auto's
    groups: list[list[int]] | None = None
    # file
    file: str | None = None
    # auto (cqil/planning.py)
    model: str | None = None
    similarity_csv: str | None = None
    group_sizes: list[int] | None = None
    min_similarity: float | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    contiguous_per_size: int | None = None
    calibration_tokens: int | None = None
    batch_size: int | None = None
    budget: str | None = None
    max_ppl_ratio: float | None = None
    max_ideal_reduction: float | None = None
    probe: ProbeConfig | None = None
    timeout_s: float | None = None
    rank_by: str | None = None
    devices: int | None = None
    latency: LatencyConfig | None = None
    table: str | None = None
    out: str | None = None

    def as_dict(self) -> dict:
        """The plain mapping cqil.plan and cqil.planning read (plan.py imports nothing from cqil)."""
        return dataclasses.asdict(self)

    def given(self, num_layers: int | None) -> Plan:
        """The plan of mode manual or file (plan=auto is chosen from data: cqil.planning.resolve_plan)."""
        return plan_from_config(self.as_dict(), num_layers)


@dataclass
class LoraConfig:
    """A recipe's `lora` section (cqil/distill.py)."""
    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    layers: Any            # all | from_plan | groups | [0-based indices]
    ranks: dict | None = None
    full_layers: Any = None
    full_lr: float = 2.0e-4


OPTIONAL = {"optional": True}  # a loss key only some recipes set: left out of as_dict when unset, as in their files


@dataclass
class LossConfig:
    """A recipe's `loss` section (cqil/distill.py)."""
    kind: str
    temperature: float
    kl_weight: float
    kl_from: float | None = None
    then: str | None = field(default=None, metadata=OPTIONAL)
    lmbda: float | None = field(default=None, metadata=OPTIONAL)
    beta: float | None = field(default=None, metadata=OPTIONAL)
    max_new_tokens: int | None = field(default=None, metadata=OPTIONAL)
    score_prompt: bool | None = field(default=None, metadata=OPTIONAL)


@dataclass
class TrainConfig:
    """A recipe's `train` section (cqil/distill.py)."""
    max_steps: int
    block_size: int
    batch_size: int
    grad_accum: int
    lr: float
    schedule: str
    warmup: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    bf16: Any              # auto | true | false
    gradient_checkpointing: Any


@dataclass
class RecipeConfig:
    """A recovery recipe (conf/recipe/<name>.yaml): `cqil finetune recipe=<name>`, plan=auto's probe."""
    recipe_name: str
    lora: LoraConfig
    loss: LossConfig
    train: TrainConfig

    def as_dict(self) -> dict:
        """{'recipe_name', 'lora', 'loss', 'train'} as cqil.distill reads them; a loss key the recipe does not set
        is absent (distill tells "not set" from null, and finetune's run fingerprint holds the loss section)."""
        out = dataclasses.asdict(self)
        out["loss"] = {f.name: out["loss"][f.name] for f in dataclasses.fields(LossConfig)
                       if not (f.metadata.get("optional") and out["loss"][f.name] is None)}
        return out


def _plain(node: DictConfig | dict) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def nested(hint: Any) -> type | None:
    """The dataclass a field holds (also as `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


def build(cls: type, values: DictConfig | dict, where: str):
    """`cls` filled from a checked config node; a key `cls` has no field for (or a field without a value and without
    a default) is refused in one line naming `where`, the node's place in the config."""
    values = _plain(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise CqilError(f"{where}.{unknown[0]} is not a setting ({cls.__name__} in cqil/config.py has no such field); "
                        "check its spelling")
    kwargs = {}
    for name, value in values.items():
        inner = nested(hints[name])
        kwargs[name] = build(inner, value, f"{where}.{name}") if inner and isinstance(value, dict) else value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without a default left out
        raise CqilError(f"{where}: {e}; give it a value in the config") from None


def model_config(node: DictConfig | dict) -> ModelConfig:
    """The `model` group as a ModelConfig."""
    return build(ModelConfig, node, "model")


def data_config(node: DictConfig | dict, where: str = "data") -> DataConfig:
    """A data group (`data`, or cqil finetune's `ood_data`) as a DataConfig."""
    return build(DataConfig, node, where)


def plan_config(node: DictConfig | dict) -> PlanConfig:
    """The `plan` group as a PlanConfig."""
    return build(PlanConfig, node, "plan")


def recipe_config(node: DictConfig | dict, own: tuple[str, ...] = ()) -> RecipeConfig:
    """A recipe from a config that holds one at its top (recipe_name, lora, loss, train); `own`: keys of the
    config's `train` section that are the job's own, beside the recipe's (cqil finetune: checkpointing)."""
    values = _plain(node)
    values = {"recipe_name": values.get("recipe_name"), "lora": values.get("lora"), "loss": values.get("loss"),
              "train": {k: v for k, v in (values.get("train") or {}).items() if k not in own}}
    return build(RecipeConfig, values, "recipe")


def data_by_name(name: str, conf: Path | None = None) -> DataConfig:
    """The data group conf/data/<name>.yaml as a DataConfig (a group a value names, e.g. cqil eval's texts)."""
    path = (conf or conf_dir()) / "data" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise CqilError(f"no data config {name!r} (conf/data/{name}.yaml); known: {known}")
    spec = OmegaConf.load(path)
    missing = [k for k in spec if OmegaConf.is_missing(spec, k)]
    if missing:
        raise CqilError(f"data config {name!r} needs {', '.join(missing)}; give it as data={name} "
                        f"data.{missing[0]}=... and name it in texts")
    return data_config(spec)


def recipe_node(name: str, overrides: list[str] | tuple[str, ...] = (), conf: Path | None = None) -> DictConfig:
    """conf/recipe/<name>.yaml composed as `cqil finetune recipe=<name>` composes it, then key=value overrides in
    Hydra's grammar (train.lr=3e-3): the one way a recipe is read by name (the checks and plan=auto's probe).
    Raises Hydra's or OmegaConf's exception for an override that does not apply."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf or conf_dir()), version_base=None):
        return compose(config_name=None, overrides=[f"+recipe={name}", *overrides])


def recipes(conf: Path | None = None) -> list[str]:
    """The names of the recipes in conf/recipe/."""
    return sorted(p.stem for p in ((conf or conf_dir()) / "recipe").glob("*.yaml"))
