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
             switches to the logit loss `then` (kl, or onpolicy) alone from there on (blockwise, then kl).
  onpolicy   on-policy distillation (GKD: Agarwal et al., ICLR 2024): on a share `lmbda` of the steps the
             student samples (temperature `temperature`) the last `max_new_tokens` tokens of each training
             block itself, from the block's first tokens as the prompt, and the teacher scores the sequence
             token by token; the loss is the generalized Jensen-Shannon divergence JSD(beta) of teacher and
             student (beta=0: KL(teacher || student), the kl loss; beta=1: KL(student || teacher)) at the
             positions of the sampled tokens (`score_prompt`: at every position). The other steps score the
             text itself (supervised), so lmbda=0 with beta=0 is exactly `kl`.

Capacity (`lora` section): `lora.ranks` gives some layers another LoRA rank ({groups: 64} or {<layer>: r}, the
same scale alpha/r); `lora.full_layers` trains those layers' weights (the target modules and both RMSNorms)
fully instead, as peft `modules_to_save`: a trainable copy of just those modules, so that the teacher (adapter
off) still runs the original ones; `lora.full_lr` is their learning rate. Merging either gives the same kind
of CQIL directory.

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
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from . import CqilError
from .metrics import continue_tokens
from .modeling import decoder, plan_disabled
from .checks import check_recipe
from .choices import LOGIT_LOSSES
from .plan import Plan

NORMS = ("input_layernorm", "post_attention_layernorm")  # trained with a layer's target modules by lora.full_layers


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
    return generalized_jsd(student, teacher, 0.0, temperature)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1, in TRL's convention), mean over
    the positions where `mask` [...] is true (all if None), on logits [..., V] softened by `temperature` (x T^2):

        beta = 0:  KL(teacher || student)            (forward KL: `distill_loss`)
        beta = 1:  KL(student || teacher)            (reverse KL)
        else:      beta KL(teacher || M) + (1 - beta) KL(student || M),  M = beta teacher + (1 - beta) student
    """
    if mask is not None:  # only the scored positions' [N, V] temporaries
        student, teacher = student[mask], teacher[mask]
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    if beta == 0:
        per = F.kl_div(s, t, log_target=True, reduction="none")
    elif beta == 1:
        per = F.kl_div(t, s, log_target=True, reduction="none")
    else:  # = H(M) - beta H(teacher) - (1 - beta) H(student): fewer [N, V] temporaries than the two KLs (~1.6x faster)
        m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
        per = beta * t.exp() * t + (1 - beta) * s.exp() * s - m.exp() * m
    return per.sum(-1).mean() * temperature**2


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
    """Trainer whose loss is self-distillation (kl), next-token (ce), their mix, blockwise local distillation, or
    on-policy distillation (onpolicy); fully trained layers (lora.full_layers) get their own learning rate."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by grad_accum

    def __init__(self, *args, plan: Plan, loss_kind: str = "kl", temperature: float = 1.0, kl_weight: float = 0.5,
                 kl_from: float | None = None, then: str = "kl", onpolicy: dict | None = None,
                 teacher: nn.Module | None = None, share_prefix: bool = False, full_lr: float | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.plan, self.loss_kind, self.temperature, self.kl_weight = plan, loss_kind, temperature, kl_weight
        self.kl_from, self.then, self.onpolicy, self.teacher = kl_from, then, onpolicy or {}, teacher
        self.share_prefix, self.full_lr = share_prefix, full_lr

    def current_kind(self) -> str:
        """The loss kind of this step (blockwise switches to `then` at kl_from x max_steps)."""
        if self.loss_kind == "blockwise" and self.kl_from is not None and \
                self.state.global_step >= self.kl_from * self.args.max_steps:
            return self.then
        return self.loss_kind

    def on_policy_step(self) -> bool:
        """Does the student write this step's continuations? A share lmbda of the steps, spread evenly and decided by
        the step number alone (so a resumed run, and every DDP rank, decides the same)."""
        lmbda, step = self.onpolicy["lmbda"], self.state.global_step
        return math.floor((step + 1) * lmbda) > math.floor(step * lmbda)

    def student_continuation(self, model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the blocks with their last max_new_tokens tokens sampled by the student from the rest, the positions to
        score: [B, T] bool). No gradient; the student runs as it is now (plan and adapter on), in eval mode."""
        new = self.onpolicy["max_new_tokens"]
        prompt = input_ids[:, :-new]
        was_training = model.training
        model.eval()
        try:
            tokens = continue_tokens(model, prompt, new, temperature=self.temperature)
        finally:
            model.train(was_training)
        ids = torch.cat([prompt, tokens.to(prompt.device)], 1)
        mask = torch.ones_like(ids, dtype=torch.bool)
        if not self.onpolicy.get("score_prompt", True):
            mask[:, : prompt.shape[1] - 1] = False  # from the last prompt position on: the distributions sampled from
        return ids, mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        kind = self.current_kind()
        weights = {kind: 1.0} if kind in ("kl", "ce", "onpolicy") else \
            {"kl": self.kl_weight, "ce": 1 - self.kl_weight} if kind == "mix" else \
            {"kl": self.kl_weight, "blockwise": 1 - self.kl_weight}
        weights = {k: w for k, w in weights.items() if w > 0}
        unwrapped = self.accelerator.unwrap_model(model)
        mask = None
        if "onpolicy" in weights and self.on_policy_step():
            input_ids, mask = self.student_continuation(unwrapped, input_ids)
        logits = bool(weights.keys() & set(LOGIT_LOSSES))
        groups = self.plan.groups if "blockwise" in weights else ()
        start = self.plan.groups[0][0] if self.share_prefix and (logits or groups) else None
        teacher, x_in, x_out = None, {}, {}
        if logits or groups or start is not None:  # no DDP hooks, no grad
            teacher, x_in, x_out = teacher_pass(
                unwrapped, input_ids, self.teacher, logits=logits,
                inputs=tuple({g[0] for g in groups} | ({start} if start is not None else set())),
                outputs=tuple(g[-1] for g in groups))
        full = bool(weights.keys() & {"kl", "ce", "onpolicy"})
        # through the wrapped (DDP) model, so that gradients are synchronized; logits of the last position
        # only when no logit loss needs them
        with student_stages(unwrapped, self.plan, start, x_in, x_out, full) as errors:
            outputs = model(input_ids=input_ids, use_cache=False, logits_to_keep=0 if full else 1)
        terms = {}
        if "kl" in weights:
            terms["kl"] = distill_loss(outputs.logits, teacher, self.temperature)
        if "onpolicy" in weights:
            terms["onpolicy"] = generalized_jsd(outputs.logits, teacher, self.onpolicy["beta"], self.temperature, mask)
        if "ce" in weights:
            terms["ce"] = next_token_loss(outputs.logits, input_ids)
        if "blockwise" in weights:
            terms["blockwise"] = torch.stack(errors).mean()
        loss = sum(w * terms[k] for k, w in weights.items())
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the fully trained modules (lora.full_layers) in groups of their own at
        lr full_lr (a whole weight matrix takes much smaller steps than a LoRA factor); the schedule scales both."""
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.full_lr is not None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((".modules_to_save." in name, name in decay), []).append(p)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls([{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                                   **({"lr": self.full_lr} if full else {})}
                                  # LoRA's groups first: the Trainer logs the first group's learning rate
                                  for (full, decayed), params in sorted(groups.items(), key=lambda g: g[0][0])],
                                 **kwargs)
        return super().create_optimizer(model)


# ---- data, adapters, training -----------------------------------------------------------
class Blocks(torch.utils.data.Dataset):
    """Token blocks [n, T] as Trainer samples {'input_ids': LongTensor[T]}."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def lora_layers(spec, plan: Plan, num_layers: int, key: str = "lora.layers") -> list[int] | None:
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
        raise CqilError(f"{key}={spec!r} must be all, from_plan, groups or a list of 0-based layer indices "
                        f"below {num_layers}")
    return list(spec)


class Capacity:
    """What a recipe's `lora` section trains: LoRA on `lora` layers (None: all) at rank `ranks.get(i, r)`, and the
    `full` layers' weights in full (their target modules and norms, peft modules_to_save)."""

    def __init__(self, lora_cfg: dict, plan: Plan, num_layers: int):
        adapted = lora_layers(lora_cfg.get("layers"), plan, num_layers)
        spec = lora_cfg.get("full_layers")
        self.full = [] if spec is None else lora_layers(spec, plan, num_layers, "lora.full_layers")
        if self.full is None:
            raise CqilError("lora.full_layers=all would train a second copy of the whole model; name the layers "
                            "(groups, from_plan or 0-based indices), or use lora.layers=all for LoRA everywhere")
        everything = list(range(num_layers)) if adapted is None else adapted
        self.lora = adapted if not self.full else [i for i in everything if i not in self.full]
        if self.lora is not None and not self.lora:
            raise CqilError(f"lora.full_layers={spec} leaves no layer of lora.layers={lora_cfg.get('layers')} to LoRA; "
                            "adapt more layers (e.g. lora.layers=from_plan) or set lora.full_layers=null")
        # every layer that trains: the student's prefix before the first of them is the teacher's
        self.trained = None if adapted is None else sorted(set(adapted) | set(self.full))
        self.full_lr = lora_cfg.get("full_lr")
        if self.full and not (isinstance(self.full_lr, (int, float)) and self.full_lr > 0):
            raise CqilError(f"lora.full_lr={self.full_lr!r}: lora.full_layers trains whole weight matrices, which need "
                            "a learning rate of their own (e.g. 2e-4), far below LoRA's")
        self.ranks: dict[int, int] = {}
        # named sets first, then single layers (which override them); a set's layers that carry LoRA take the rank
        for where, r in sorted((lora_cfg.get("ranks") or {}).items(), key=lambda kv: str(kv[0]).isdigit()):
            where = int(where) if isinstance(where, str) and where.isdigit() else where
            layers = [where] if isinstance(where, int) else lora_layers(where, plan, num_layers, f"lora.ranks.{where}")
            layers = range(num_layers) if layers is None else layers
            ranked = [i for i in layers if self.lora is None or i in self.lora]
            if not ranked:
                raise CqilError(f"lora.ranks.{where}={r}: no layer of it carries a LoRA adapter (lora.layers="
                                f"{lora_cfg.get('layers')}, lora.full_layers={spec}); rank adapted layers only")
            self.ranks |= dict.fromkeys(ranked, r)

    def modules_to_save(self, model: nn.Module, target_modules: list[str]) -> list[str]:
        """Names of the modules that the full layers train: their target modules and both RMSNorms."""
        wanted = set(target_modules) | set(NORMS)
        found = []
        for name, _ in model.named_modules():
            parts = name.split(".")
            at = [k for k in range(len(parts) - 1) if parts[k] == "layers" and parts[k + 1].isdigit()]
            if at and int(parts[at[0] + 1]) in self.full and parts[-1] in wanted and len(parts) > at[0] + 2:
                found.append(name)
        return found


def add_lora(model, lora_cfg: dict, capacity: Capacity):
    """Wrap `model` in a peft LoRA model (the plan keeps working: peft only swaps Linear modules), with the ranks
    and fully trained modules of `capacity`. A layer of another rank keeps the scale alpha/r of the others."""
    r, alpha = lora_cfg["r"], lora_cfg["alpha"]
    patterns = {rf"layers\.{i}\..*": rank for i, rank in capacity.ranks.items()}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_cfg["dropout"],
                        target_modules=list(lora_cfg["target_modules"]), bias="none", task_type="CAUSAL_LM",
                        layers_to_transform=capacity.lora, rank_pattern=patterns,
                        alpha_pattern={k: rank * alpha / r for k, rank in patterns.items()},
                        modules_to_save=capacity.modules_to_save(model, list(lora_cfg["target_modules"])) or None)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise CqilError(f"cannot add LoRA adapters: {str(e).splitlines()[0]}; check lora.target_modules "
                        "(e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) and lora.layers") from None


def unload_original(peft_model: nn.Module) -> nn.Module:
    """The base model with every adapter removed and its own modules back, weights untouched (peft's unload() alone
    would keep the trained copies of modules_to_save in their place)."""
    for name, module in list(peft_model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(peft_model.get_submodule(parent), child, module.original_module)
    return peft_model.unload()


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
        use_cpu=not on_gpu, logging_steps=1, disable_tqdm=False, remove_unused_columns=False, label_names=[],
        dataloader_drop_last=True,
        **({"save_strategy": "no", "ddp_find_unused_parameters": False, "report_to": []} | job))


def check_loss(recipe: dict, plan: Plan, layers: list[int] | None, num_layers: int) -> None:
    """Refuse a loss section that cannot train (one line each): its keys as `cqil finetune` checks them
    (cqil.checks.RECIPE), then with the plan: the layers that train (None: all) against the grouped ones."""
    check_recipe(recipe, "loss.")
    loss = recipe["loss"]
    kl_from = loss.get("kl_from")
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
    capacity = Capacity(recipe["lora"], plan, n)
    check_loss(recipe, plan, capacity.trained, n)
    set_seed(train["seed"])  # the LoRA A matrices are drawn at random: same seed, same run
    peft_model = add_lora(model, recipe["lora"], capacity)
    if auto_flag(train.get("gradient_checkpointing", False), on_gpu, "train.gradient_checkpointing"):
        base = peft_model.get_base_model()
        base.activation_checkpointing_enable({"use_reentrant": False})
        # transformers also makes the embeddings' output require grad (for reentrant checkpoints); non-reentrant
        # ones do not need it, and it would drag the backward pass through the frozen layers before the first group
        base.disable_input_require_grads()
    grouped = {i for g in plan.groups for i in g}
    trained = capacity.trained
    # blockwise, then kl: adapters outside groups get no gradient during the blockwise steps
    unused = loss.get("kl_from") is not None and (trained is None or not set(trained) <= grouped)
    args = training_args(train, out_dir, on_gpu, max_steps, **{"ddp_find_unused_parameters": unused, **job})
    # the student may start from the teacher's hidden state at the first group when nothing before it is trained
    share_prefix = teacher is None and bool(plan.groups) and bool(trained) and min(trained) >= plan.groups[0][0]
    onpolicy = {k: loss[k] for k in ("lmbda", "beta", "max_new_tokens", "score_prompt") if k in loss}
    trainer = DistillTrainer(model=peft_model, args=args, train_dataset=Blocks(blocks), callbacks=list(callbacks),
                             plan=plan, loss_kind=loss["kind"], temperature=loss["temperature"],
                             kl_weight=loss["kl_weight"], kl_from=loss.get("kl_from"), then=loss.get("then", "kl"),
                             onpolicy=onpolicy, teacher=teacher, share_prefix=share_prefix,
                             full_lr=capacity.full_lr if capacity.full else None)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())
    return trainer


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar without the dict it prints into stdout at every logging step: the losses go to
    cqil's loss CSV and to the tracker of train.report_to."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        pass
