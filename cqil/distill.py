"""The recovery recipe: LoRA adapters (peft) trained by self-distillation from the original model.

The authors' recipe (see DESIGN.md): LoRA on q,k,v,o,gate,up,down of every layer, loss =
KL(teacher || student) where the teacher is the *same weights* with the adapter and the plan
switched off (peft's `disable_adapter()` + `cqil.modeling.plan_disabled`), so no second copy of
the model is held. Plain next-token loss (`loss.kind=ce`) and a mix (`loss.kind=mix`) are options.

A recipe is the `lora`, `loss` and `train` sections of a config (conf/recipe/<name>.yaml). Two callers
run it through `make_trainer`, so they run the same code path: `cqil finetune` (the job: checkpoints,
resume, saved adapter and merged model, reports) and the recovery probe of plan choice
(cqil.planning, plan.budget=after_recovery).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from . import CqilError
from .modeling import plan_disabled
from .plan import Plan

LOSS_KINDS = ("kl", "ce", "mix")


# ---- the losses ---------------------------------------------------------------------------
@torch.no_grad()
def teacher_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the original model: the same weights with the LoRA adapter and the plan switched off."""
    was_training = model.training
    model.eval()  # the teacher is the original model as evaluated (no dropout)
    try:
        with model.disable_adapter(), plan_disabled(model):
            return model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.train(was_training)


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


class DistillTrainer(Trainer):
    """Trainer whose loss is self-distillation (kl), next-token (ce) or their mix."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by grad_accum

    def __init__(self, *args, loss_kind: str = "kl", temperature: float = 1.0, kl_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_kind, self.temperature, self.kl_weight = loss_kind, temperature, kl_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        outputs = model(input_ids=input_ids, use_cache=False)  # the wrapped (DDP) model: gradients sync
        terms = {}
        if self.loss_kind in ("kl", "mix"):
            teacher = teacher_logits(self.accelerator.unwrap_model(model), input_ids)  # no DDP hooks, no grad
            terms["kl"] = distill_loss(outputs.logits, teacher, self.temperature)
        if self.loss_kind in ("ce", "mix"):
            terms["ce"] = next_token_loss(outputs.logits, input_ids)
        if self.loss_kind == "mix":
            loss = self.kl_weight * terms["kl"] + (1 - self.kl_weight) * terms["ce"]
        else:
            loss = terms[self.loss_kind]
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
    """Layers to adapt: 'all' (None), 'from_plan' (first grouped layer to the last), or a list of indices.

    'from_plan' leaves the layers before the first group frozen: teacher and student compute them
    identically, and the backward pass then stops at the first group (about a third less work
    for S12 on a 30-layer model).
    """
    if spec in (None, "all"):
        return None
    if spec == "from_plan":
        return list(range(plan.groups[0][0], num_layers))
    if isinstance(spec, str) or not all(isinstance(i, int) and 0 <= i < num_layers for i in spec):
        raise CqilError(f"lora.layers={spec!r} must be all, from_plan or a list of 0-based layer indices "
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


def training_args(train: dict, out_dir: str | Path, on_gpu: bool, max_steps: int | None = None,
                  **job) -> TrainingArguments:
    """HF TrainingArguments from a recipe's `train` section; `job`: the caller's own arguments
    (checkpointing: save_strategy, save_steps, save_total_limit; ddp_timeout), else no checkpoints."""
    bf16 = (on_gpu and torch.cuda.is_bf16_supported()) if train["bf16"] == "auto" else bool(train["bf16"])
    steps = max_steps or train["max_steps"]
    if not isinstance(steps, int) or steps < 1:
        raise CqilError(f"train.max_steps={steps!r} must be an integer >= 1")
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"], learning_rate=train["lr"],
        lr_scheduler_type=train["schedule"], warmup_steps=train["warmup"], weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"], seed=train["seed"], data_seed=train["seed"], bf16=bf16,
        use_cpu=not on_gpu, logging_steps=1, report_to=[], disable_tqdm=False, remove_unused_columns=False,
        label_names=[], dataloader_drop_last=True, ddp_find_unused_parameters=False,
        **({"save_strategy": "no"} | job))


def make_trainer(model: torch.nn.Module, plan: Plan, blocks: torch.Tensor, recipe: dict, out_dir: str | Path,
                 on_gpu: bool = False, max_steps: int | None = None, callbacks: list[TrainerCallback] = (),
                 **job) -> "DistillTrainer":
    """LoRA adapters on a CQIL model (its plan applied) and the distillation Trainer over training blocks.

    recipe: {'lora': ..., 'loss': ..., 'train': ...}; max_steps overrides train.max_steps (the probe's few
    steps); job: checkpointing arguments of training_args.
    """
    loss = recipe["loss"]
    if loss["kind"] not in LOSS_KINDS:
        raise CqilError(f"loss.kind={loss['kind']!r} is not one of {', '.join(LOSS_KINDS)}")
    set_seed(recipe["train"]["seed"])  # the LoRA A matrices are drawn at random: same seed, same run
    layers = lora_layers(recipe["lora"].get("layers"), plan, model.config.num_hidden_layers)
    peft_model = add_lora(model, recipe["lora"], layers)
    args = training_args(recipe["train"], out_dir, on_gpu, max_steps, **job)
    return DistillTrainer(model=peft_model, args=args, train_dataset=Blocks(blocks), callbacks=list(callbacks),
                          loss_kind=loss["kind"], temperature=loss["temperature"], kl_weight=loss["kl_weight"])
