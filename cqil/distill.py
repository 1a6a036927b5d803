"""The recovery recipe: LoRA adapters (peft) trained by distillation from the original model.

The authors' recipe (see DESIGN.md): LoRA on q,k,v,o,gate,up,down of every layer, loss =
KL(teacher || student) where the teacher is the *same weights* with the adapter and the plan
switched off (peft's `disable_adapter()` + `cqil.modeling.plan_disabled`), so no second copy of
the model is held. When the weights being trained are no longer the original's (a directory that
was already fine-tuned), the teacher is a separate model (`teacher=`), still run with its plan off.

Loss kinds (`loss.kind`):
  kl         KL(original || CQIL model) on the logits (self-distillation);
  ce         next-token cross-entropy on the text;
  mix        kl_weight * kl + (1 - kl_weight) * ce;
  blockwise  local distillation: every group, fed the original model's hidden state at its input,
             is trained to output the original's hidden state after the same layers run one after
             the other (per-token relative squared error, mean over groups). Only the groups run
             forward and backward (no LM head, no layers outside groups), so a step costs a fraction
             of a kl step. kl_weight > 0 mixes in the logit KL; `kl_from` (a fraction of the steps)
             switches to kl alone from there on (blockwise, then kl).

Two savings that change no number: with no adapter before the first group (lora.layers=from_plan or
groups), the student starts from the teacher's hidden state at the first group instead of
recomputing the identical prefix, and the backward pass stops there; and activation checkpointing
(train.gradient_checkpointing, on by default on GPUs) reaches grouped layers (cqil.modeling).

A recipe is the `lora`, `loss` and `train` sections of a config (conf/recipe/<name>.yaml). Two callers
run it through `make_trainer`, so they run the same code path: `cqil finetune` (the job: checkpoints,
resume, saved adapter and merged model, reports) and the recovery probe of plan choice
(cqil.planning, plan.budget=after_recovery).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from . import CqilError
from .modeling import decoder, plan_disabled
from .plan import Plan

LOSS_KINDS = ("kl", "ce", "mix", "blockwise")


# ---- the teacher pass ----------------------------------------------------------------------
class _Enough(Exception):
    """Raised by a capture hook once the teacher has computed every hidden state asked for."""


@contextlib.contextmanager
def teacher_mode(model: nn.Module, teacher: nn.Module | None) -> Iterator[nn.Module]:
    """The original model: `teacher` with its plan off, or `model` itself with adapter and plan off, in eval mode."""
    net = model if teacher is None else teacher
    was_training = net.training
    net.eval()  # the teacher is the original model as evaluated (no dropout)
    try:
        with (model.disable_adapter() if teacher is None else contextlib.nullcontext()), plan_disabled(net):
            yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def teacher_pass(model: nn.Module, input_ids: torch.Tensor, teacher: nn.Module | None = None,
                 inputs: tuple[int, ...] = (), outputs: tuple[int, ...] = (),
                 logits: bool = True) -> tuple[torch.Tensor | None, dict, dict]:
    """Run the original model on input_ids: (logits or None, {i: input of layer i}, {i: output of layer i}).

    With logits=False the pass stops after the last layer whose hidden state is asked for.
    """
    x_in, x_out = {}, {}
    stop = None if logits else max((*inputs, *outputs), default=None)
    if not logits and stop is None:
        return None, x_in, x_out

    def before(i):
        def hook(module, args, kwargs):
            if i in inputs:
                x_in[i] = args[0] if args else kwargs["hidden_states"]
            if i == stop and i not in outputs:
                raise _Enough
        return hook

    def after(i):
        def hook(module, args, output):
            x_out[i] = output[0] if isinstance(output, tuple) else output
            if i == stop:
                raise _Enough
        return hook

    with teacher_mode(model, teacher) as net:
        layers = decoder(net).layers
        handles = [layers[i].register_forward_pre_hook(before(i), with_kwargs=True)
                   for i in {*inputs, *([stop] if stop is not None else [])}]
        handles += [layers[i].register_forward_hook(after(i)) for i in set(outputs)]
        out = None
        try:
            out = net(input_ids=input_ids, use_cache=False).logits
        except _Enough:  # with logits=False, after the last hidden state asked for
            pass
        finally:
            for h in handles:
                h.remove()
    return out, x_in, x_out


def teacher_logits(model: nn.Module, input_ids: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
    """Logits of the original model: `teacher`, or the same weights with the LoRA adapter and the plan switched off."""
    return teacher_pass(model, input_ids, teacher)[0]


# ---- the losses ---------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token (mean over positions), on logits softened by `temperature`.

    Scaled by T^2 so its gradient keeps the same size whatever the temperature (Hinton et al.).
    """
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def hidden_state_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |output - target|^2 / |target|^2: relative, per token, because every consumer of a
    hidden state (the next layer's RMSNorm, the final norm) sees it normalized token by token."""
    output, target = output.float(), target.float()
    return ((output - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


class _Stage:
    """One stage of the student's decoder loop in a distillation step.

    run=False skips the stage (its output is not needed); `inject` replaces the stage's input (the teacher's
    hidden state at the first group: the prefix before it is frozen, so recomputing it would give the same);
    `blockwise=(x, t)` also runs the stage on the teacher's input x and records its error against t.
    """

    def __init__(self, stage, run: bool, inject: torch.Tensor | None, blockwise: tuple | None, errors: list):
        self.stage, self.run, self.inject, self.blockwise, self.errors = stage, run, inject, blockwise, errors

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.blockwise is not None:
            x, target = self.blockwise
            self.errors.append(hidden_state_error(self.stage(x, *args, **kwargs), target))
        if self.inject is not None:
            hidden_states = self.inject
        return self.stage(hidden_states, *args, **kwargs) if self.run else hidden_states


class _StudentLayers(nn.ModuleList):
    """The decoder's layer list during one student pass: the same modules; slicing yields the `_Stage`s."""

    def __init__(self, layers: nn.ModuleList, stages: list[_Stage]):
        super().__init__(list(layers))
        self.stages = stages

    def __getitem__(self, idx):
        return self.stages if isinstance(idx, slice) else super().__getitem__(idx)


@contextlib.contextmanager
def student_stages(model: nn.Module, plan: Plan, start: int | None, x_in: dict, x_out: dict,
                   full: bool) -> Iterator[list[torch.Tensor]]:
    """Inside: the model's forward runs the plan's stages rewired for a distillation step; yields the list that
    receives the blockwise errors (one per group, when x_in/x_out hold the groups' teacher states).

    start: first layer to compute (the teacher's input of layer `start` is injected; None: from the embeddings).
    full=False: nothing after the groups' blockwise terms is computed (the logits are then meaningless).
    """
    dec = decoder(model)
    layers = dec.layers
    errors: list[torch.Tensor] = []
    stages = []
    for stage, members in zip(layers[:], plan.stages(len(layers))):
        first, last = members[0], members[-1]
        blockwise = (x_in[first], x_out[last]) if len(members) > 1 and last in x_out else None
        run = full and (start is None or first >= start)
        stages.append(_Stage(stage, run, x_in[start] if run and first == start else None, blockwise, errors))
    dec.layers = _StudentLayers(layers, stages)
    try:
        yield errors
    finally:
        dec.layers = layers


class DistillTrainer(Trainer):
    """Trainer whose loss is self-distillation (kl), next-token (ce), their mix, or blockwise local distillation."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by grad_accum

    def __init__(self, *args, plan: Plan, loss_kind: str = "kl", temperature: float = 1.0, kl_weight: float = 0.5,
                 kl_from: float | None = None, teacher: nn.Module | None = None, share_prefix: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.loss_kind, self.temperature, self.kl_weight = plan, loss_kind, temperature, kl_weight
        self.kl_from, self.teacher, self.share_prefix = kl_from, teacher, share_prefix

    def current_kind(self) -> str:
        """The loss kind of this step (blockwise switches to kl at kl_from x max_steps)."""
        if self.loss_kind == "blockwise" and self.kl_from is not None and \
                self.state.global_step >= self.kl_from * self.args.max_steps:
            return "kl"
        return self.loss_kind

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        kind = self.current_kind()
        weights = {"kl": 1.0} if kind == "kl" else {"ce": 1.0} if kind == "ce" else \
            {"kl": self.kl_weight, "ce": 1 - self.kl_weight} if kind == "mix" else \
            {"kl": self.kl_weight, "blockwise": 1 - self.kl_weight}
        weights = {k: w for k, w in weights.items() if w > 0}
        groups = self.plan.groups if "blockwise" in weights else ()
        start = self.plan.groups[0][0] if self.share_prefix and ("kl" in weights or groups) else None
        teacher, x_in, x_out = None, {}, {}
        if "kl" in weights or groups or start is not None:  # no DDP hooks, no grad
            teacher, x_in, x_out = teacher_pass(
                self.accelerator.unwrap_model(model), input_ids, self.teacher, logits="kl" in weights,
                inputs=tuple({g[0] for g in groups} | ({start} if start is not None else set())),
                outputs=tuple(g[-1] for g in groups))
        full = bool(weights.keys() & {"kl", "ce"})
        # through the wrapped (DDP) model, so that gradients are synchronized; logits of the last position
        # only when no logit loss needs them
        with student_stages(self.accelerator.unwrap_model(model), self.plan, start, x_in, x_out, full) as errors:
            outputs = model(input_ids=input_ids, use_cache=False, logits_to_keep=0 if full else 1)
        terms = {}
        if "kl" in weights:
            terms["kl"] = distill_loss(outputs.logits, teacher, self.temperature)
        if "ce" in weights:
            terms["ce"] = next_token_loss(outputs.logits, input_ids)
        if "blockwise" in weights:
            terms["blockwise"] = torch.stack(errors).mean()
        loss = sum(w * terms[k] for k, w in weights.items())
        return (loss, outputs) if return_outputs else loss


# ---- data, adapters, training -----------------------------------------------------------
class Blocks(torch.utils.data.Dataset):
    """Token blocks [n, T] as Trainer samples {'input_ids': LongTensor[T]}."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def lora_layers(spec, plan: Plan, num_layers: int) -> list[int] | None:
    """Layers to adapt: 'all' (None), 'from_plan' (first grouped layer to the last), 'groups' (the grouped
    layers only), or a list of indices.

    'from_plan' and 'groups' leave the layers before the first group frozen: teacher and student compute
    them identically, so the student starts from the teacher's hidden state there and the backward pass
    stops at the first group. 'groups' is what blockwise distillation trains (nothing else gets a gradient).
    """
    if spec in (None, "all"):
        return None
    if spec == "from_plan":
        return list(range(plan.groups[0][0], num_layers))
    if spec == "groups":
        return [i for g in plan.groups for i in g]
    if isinstance(spec, str) or not all(isinstance(i, int) and 0 <= i < num_layers for i in spec):
        raise CqilError(f"lora.layers={spec!r} must be all, from_plan, groups or a list of 0-based layer indices "
                        f"below {num_layers}")
    return list(spec)


def add_lora(model, lora_cfg: dict, layers: list[int] | None = None):
    """Wrap `model` in a peft LoRA model (the plan keeps working: peft only swaps Linear modules)."""
    config = LoraConfig(r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"], lora_dropout=lora_cfg["dropout"],
                        target_modules=list(lora_cfg["target_modules"]), bias="none", task_type="CAUSAL_LM",
                        layers_to_transform=layers)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise CqilError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}; check lora.target_modules "
                        "(e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) and lora.layers") from None


def auto_flag(value, on_gpu: bool, key: str) -> bool:
    """A recipe switch that is true, false or auto (= on a GPU)."""
    if value == "auto":
        return on_gpu
    if not isinstance(value, bool):
        raise CqilError(f"{key}={value!r} must be auto, true or false")
    return value


def training_args(train: dict, out_dir: str | Path, on_gpu: bool, max_steps: int | None = None,
                  **job) -> TrainingArguments:
    """HF TrainingArguments from a recipe's `train` section; `job`: the caller's own arguments
    (checkpointing: save_strategy, save_steps, save_total_limit; ddp_timeout), else no checkpoints."""
    bf16 = auto_flag(train["bf16"], on_gpu and torch.cuda.is_bf16_supported(), "train.bf16")
    steps = max_steps or train["max_steps"]
    if not isinstance(steps, int) or steps < 1:
        raise CqilError(f"train.max_steps={steps!r} must be an integer >= 1")
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"], learning_rate=train["lr"],
        lr_scheduler_type=train["schedule"], warmup_steps=train["warmup"], weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"], seed=train["seed"], data_seed=train["seed"], bf16=bf16,
        use_cpu=not on_gpu, logging_steps=1, report_to=[], disable_tqdm=False, remove_unused_columns=False,
        label_names=[], dataloader_drop_last=True, **({"save_strategy": "no", "ddp_find_unused_parameters": False} | job))


def check_loss(loss: dict, plan: Plan, layers: list[int] | None, num_layers: int) -> None:
    """Refuse a loss section that cannot train (one line each)."""
    if loss["kind"] not in LOSS_KINDS:
        raise CqilError(f"loss.kind={loss['kind']!r} is not one of {', '.join(LOSS_KINDS)}")
    if not 0 <= loss["kl_weight"] <= 1:
        raise CqilError(f"loss.kl_weight={loss['kl_weight']} must be between 0 and 1")
    kl_from = loss.get("kl_from")
    if kl_from is not None and (loss["kind"] != "blockwise" or not 0 < kl_from < 1):
        raise CqilError(f"loss.kl_from={kl_from} needs loss.kind=blockwise and 0 < kl_from < 1 "
                        "(the fraction of the steps after which the loss is kl alone); or set loss.kl_from=null")
    grouped = {i for g in plan.groups for i in g}
    outside = sorted(set(range(num_layers) if layers is None else layers) - grouped)
    if loss["kind"] == "blockwise" and loss["kl_weight"] == 0 and kl_from is None and outside:
        raise CqilError(f"loss.kind=blockwise alone trains only the grouped layers, but lora.layers adapts layers "
                        f"{outside[:4]}{'...' if len(outside) > 4 else ''} outside groups too; set lora.layers=groups, "
                        "or mix in the logit KL (loss.kl_weight>0 or loss.kl_from)")


def make_trainer(model: torch.nn.Module, plan: Plan, blocks: torch.Tensor, recipe: dict, out_dir: str | Path,
                 on_gpu: bool = False, max_steps: int | None = None, callbacks: list[TrainerCallback] = (),
                 teacher: nn.Module | None = None, **job) -> "DistillTrainer":
    """LoRA adapters on a CQIL model (its plan applied) and the distillation Trainer over training blocks.

    recipe: {'lora': ..., 'loss': ..., 'train': ...}; max_steps overrides train.max_steps (the probe's few
    steps); teacher: the original model when `model`'s weights are not the original's (default: model itself
    with adapter and plan off); job: checkpointing arguments of training_args.
    """
    loss, train = recipe["loss"], recipe["train"]
    n = model.config.num_hidden_layers
    layers = lora_layers(recipe["lora"].get("layers"), plan, n)
    check_loss(loss, plan, layers, n)
    set_seed(train["seed"])  # the LoRA A matrices are drawn at random: same seed, same run
    peft_model = add_lora(model, recipe["lora"], layers)
    if auto_flag(train.get("gradient_checkpointing", False), on_gpu, "train.gradient_checkpointing"):
        base = peft_model.get_base_model()
        base.activation_checkpointing_enable({"use_reentrant": False})
        # transformers also makes the embeddings' output require grad (for reentrant checkpoints); non-reentrant
        # ones do not need it, and it would drag the backward pass through the frozen layers before the first group
        base.disable_input_require_grads()
    grouped = {i for g in plan.groups for i in g}
    # blockwise, then kl: adapters outside groups get no gradient during the blockwise steps
    unused = loss.get("kl_from") is not None and (layers is None or not set(layers) <= grouped)
    args = training_args(train, out_dir, on_gpu, max_steps, **{"ddp_find_unused_parameters": unused, **job})
    # the student may start from the teacher's hidden state at the first group when nothing before it is adapted
    share_prefix = teacher is None and bool(plan.groups) and bool(layers) and min(layers) >= plan.groups[0][0]
    return DistillTrainer(model=peft_model, args=args, train_dataset=Blocks(blocks), callbacks=list(callbacks),
                          plan=plan, loss_kind=loss["kind"], temperature=loss["temperature"],
                          kl_weight=loss["kl_weight"], kl_from=loss.get("kl_from"), teacher=teacher,
                          share_prefix=share_prefix)
