"""`cqil finetune`: recover a converted model with the recovery recipe of cqil.distill (LoRA + self-distillation).

The recipe (conf/recipe/<name>.yaml: `lora`, `loss`, `train`) is cqil.distill's; this module is the
job around it. Training runs on the HF Trainer, so one command runs on a CPU, one GPU, or under
`torchrun --nproc_per_node=N -m cqil finetune ...` (DDP). Checkpoints land in
`<out_dir>/checkpoints/checkpoint-<step>` every `train.save_steps`; rerunning the same command
resumes from the last complete one. Outputs: `<out_dir>/adapter` (peft format, applies on top of
the converted model), `<out_dir>/merged` (a CQIL model directory, loads like `cqil convert`'s
output), the loss curve CSV and one row of held-out perplexities (original / converted /
fine-tuned) on the evaluation split, which training never sees, in the same windows as every other
job (cqil.metrics; training itself uses `train.block_size`-token blocks).

Training data: the training split of `data`, plus, with `teacher_text.samples=N`, what the original model writes
from N prompts (training-split prefixes, instructions, arithmetic), packed into `train.block_size` blocks
(cqil.teacher_text, cached with its provenance under $CQIL_CACHE/teacher_text; the same for every recipe).

Recovery is reported in domain (the evaluation split of `data`) and out of domain (`ood_data`, a
source training never sees, default conf/data/english_ood.yaml): perplexity of original, converted
and fine-tuned, and the agreement of converted and fine-tuned with the original (teacher-forced
top-1 and KL, greedy continuations; cqil.metrics). `curve.every_steps` adds the same measures every
N steps of training (a recovery curve against training tokens).

The teacher is the original model: the same weights with adapter and plan off, unless the input was
already fine-tuned (a merged directory of this job records `cqil_base_model`, where the original
is, and `cqil_finetuned`); then `teacher.path` (default: that base model) is loaded beside it.
Under torchrun every rank selects its device (LOCAL_RANK) and joins the process group before
loading, so plan=auto is chosen once (cqil.planning) and every rank trains on its own GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import CqilError, cards, data, models, teacher_text
from .config import DataConfig, PlanConfig, data_config, model_config, plan_config, recipe_config
from .distill import make_trainer, teacher_mode
from .metrics import greedy_agreement, greedy_tokens, teacher_forced_agreement
from .modeling import apply_plan, get_plan, is_converted_dir, save_converted
from .outputs import ADAPTER, FINETUNE, FINETUNE_PARTS, claim, write_dir, write_text
from .plan import Plan
from .planning import resolve_plan
from .results import command, plan_columns, provenance, update_table

# What must match for a rerun to continue the checkpoints in out_dir (max_steps, lr, ... may change).
FINGERPRINT_KEYS = ("model", "teacher", "plan", "lora", "loss", "data", "teacher_text", "batch_size", "grad_accum",
                    "seed")
# The job's own keys in its `train` section, beside the recipe's (conf/finetune.yaml): not part of the recipe.
OWN_TRAIN = ("save_steps", "save_total_limit", "train_tokens", "ddp_timeout", "report_to")


# ---- progress log, checkpoints -----------------------------------------------------------
class LossCsv(TrainerCallback):
    """Loss per optimizer step -> the loss table, one row per (run, step), added as training goes; `run` is
    the out_dir. Other runs' curves in the same table are kept. A run that starts from scratch replaces
    its own earlier curve; a resumed one keeps its rows up to the checkpoint (the steps after it are redone)."""

    def __init__(self, path: str | Path, run: str, tokens_per_step: int, columns: dict):
        self.path, self.run, self.tokens_per_step, self.columns = Path(path), run, tokens_per_step, columns

    def _redone(self, old: pd.DataFrame, step: int) -> pd.Series:
        """This run's rows after `step` (rows of tables from before the run column are other runs')."""
        if "run" not in old:
            return pd.Series(False, index=old.index)
        return (old.run.astype(str) == self.run) & (old.step > step)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            update_table("finetune loss", [], self.path, drop=lambda old: self._redone(old, state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            log = state.log_history[-1]
            row = {"run": self.run, "step": log["step"], "tokens": log["step"] * self.tokens_per_step,
                   "loss": log["loss"], "learning_rate": log.get("learning_rate"), "grad_norm": log.get("grad_norm"),
                   "epoch": log.get("epoch"), **self.columns}
            update_table("finetune loss", [row], self.path)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint in ckpt_dir; incomplete ones (killed mid-save) are removed.

    The Trainer writes trainer_state.json last, so a checkpoint without it was interrupted.
    """
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        if (ckpt / "trainer_state.json").is_file():
            check_checkpoint(ckpt)
            return ckpt
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"removing incomplete checkpoint {ckpt} (interrupted while saving)")
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def check_checkpoint(ckpt: Path) -> None:
    """Refuse a damaged checkpoint with one line instead of a traceback deep inside the Trainer."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        if not (ckpt / "optimizer.pt").is_file():
            raise FileNotFoundError("optimizer.pt missing")
    except Exception as e:  # any damage: the message names the file and the way out
        why = str(e).splitlines()[0] if str(e) else ""
        raise CqilError(f"checkpoint {ckpt} is corrupt ({type(e).__name__}: {why}); "
                        "delete it to resume from the previous checkpoint, or delete the out_dir to start over") from None


def check_fingerprint(out_dir: Path, fingerprint: dict, resuming: bool) -> None:
    """Refuse to continue checkpoints made by a different run (other plan, model, LoRA, data, ...)."""
    path = out_dir / "run.json"
    if resuming and path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in FINGERPRINT_KEYS if old.get(k) != fingerprint.get(k)]
        if diff:
            raise CqilError(f"{out_dir} holds checkpoints of a different run ({', '.join(diff)} differ: "
                            f"{old.get(diff[0])} vs {fingerprint.get(diff[0])}); set out_dir=<new dir> or delete it")
    if int(os.environ.get("RANK", "0")) == 0:
        claim(out_dir, FINETUNE, "finetune", ["run.json", "checkpoints/", *(f"{d}/" for d in FINETUNE_PARTS)])
        write_text(path, json.dumps(fingerprint, indent=2) + "\n")


# ---- model preparation -------------------------------------------------------------------
def choose_plan(plan_cfg: PlanConfig, model, tokenizer, data_cfg: DataConfig) -> Plan:
    """The plan to recover from: the converted model's own, or the configured one applied now."""
    own = get_plan(model)
    if own.groups and plan_cfg.mode == "auto":
        return own  # a converted directory already carries the automatic choice
    wanted = resolve_plan(plan_cfg, model, tokenizer, data_cfg)
    if own.groups:
        if wanted.groups and wanted != own:
            raise CqilError(f"the model is already converted with plan {own.describe()} but the config asks for "
                            f"{wanted.describe()}; pass plan=none to fine-tune it with its own plan")
        return own
    if not wanted.groups:
        raise CqilError("nothing to recover: the model has no CQIL plan; give a converted directory "
                        "(model.path=<cqil convert output>) or a plan (plan=manual plan.start=12 plan.end=24 "
                        "plan.group_size=2, plan=file, plan=auto)")
    apply_plan(model, wanted)
    return wanted


def name_adapter_base(model, tokenizer, plan: Plan, out_dir: Path, name: str, source: str) -> None:
    """Make the saved adapter name its true base, the converted model, in base_model_name_or_path.

    A model loaded from a `cqil convert` directory already names it. Otherwise the plan was applied here,
    and the adapter on the unconverted model would load without complaint and compute something else:
    the converted base (same weights, the plan in its config) is saved once to out_dir/converted.
    """
    if not is_converted_dir(model.name_or_path):
        base = (out_dir / "converted").absolute()
        saved = base / "config.json"
        if int(os.environ.get("RANK", "0")) == 0 and not (
                is_converted_dir(base) and saved.is_file() and json.loads(saved.read_text()).get("cqil_plan") == plan.to_dict()):
            save_converted(model, tokenizer, base, "finetune")
            cards.write("converted", base, name=name, source=source, plan=plan,
                        n_layers=model.config.num_hidden_layers, command=command(), measured={})
        model.name_or_path = str(base)  # what peft records as the adapter's base


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak GPU memory allocated, if any), MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"peak_rss_mb": round(rss), "peak_gpu_mb": round(gpu) if not math.isnan(gpu) else gpu}


def rank_device(wanted: str) -> str:
    """This process's device: model.device, or under torchrun with a GPU the rank's own one (LOCAL_RANK)."""
    if wanted == "cpu":
        return wanted
    if not torch.cuda.is_available():
        raise CqilError(f"model.device={wanted} but torch sees no CUDA device; use model.device=cpu")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else wanted
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(device: str, timeout_s: int):
    """Under torchrun, join the process group before anything else (loading, plan choice: plan=auto is chosen
    on rank 0 and broadcast, cqil.planning); leave it at the end. Alone: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield
        return
    gpu = device.startswith("cuda")
    dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=torch.device(device) if gpu else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def location(path: str) -> str:
    """A model path as recorded: an existing directory or file made absolute; a bundled name or hub id as given."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def resolve_teacher(teacher_path: str | None, model_path: str, config) -> tuple[str, bool]:
    """(where the original model is, whether it must be loaded beside the model being trained).

    Default: the base model of the run, i.e. the one a fine-tuned (merged) input records, else the input itself.
    The input's own weights serve (adapter and plan off) unless they were fine-tuned already.
    """
    recorded = getattr(config, "cqil_base_model", None)
    path = location(teacher_path or recorded or model_path)
    own_weights = not getattr(config, "cqil_finetuned", False)
    return path, not (own_weights and path in {location(model_path), recorded and location(recorded)})


# ---- recovery measures ----------------------------------------------------------------------
VARIANTS = ("original", "converted", "finetuned")


class Variant(nn.Module):
    """One of the models a fine-tune compares, from the weights being trained: 'original' (the teacher:
    adapter and plan off, or the separate teacher), 'converted' (adapter off) or 'finetuned'.
    Called and generate()d like a causal LM, so cqil.metrics measures it as any model."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, which: str):
        super().__init__()
        self.model, self.teacher, self.which = model, teacher, which

    @contextlib.contextmanager
    def active(self):
        if self.which == "original":
            with teacher_mode(self.model, self.teacher) as net:
                yield net
        else:
            with self.model.disable_adapter() if self.which == "converted" else contextlib.nullcontext():
                yield self.model

    @property
    def generation_config(self):
        return self.model.generation_config

    def forward(self, *args, **kwargs):
        with self.active() as net:
            return net(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active() as net:
            return net.generate(*args, **kwargs)


def recovery(model: nn.Module, teacher: nn.Module | None, sets: dict[str, torch.Tensor], agreement: dict,
             batch_size: int, variants: tuple[str, ...] = VARIANTS[1:]) -> dict:
    """Perplexities and agreement with the original on each held-out set ({column prefix: windows [n, T]}).

    Columns (prefix '' in domain, 'ood_' out of domain): ppl_original, ppl_<variant>, top1_<variant> and
    kl_<variant> (teacher-forced, against the original), greedy_match_<variant> and first_divergence_<variant>
    (agreement.new_tokens greedy tokens after each of agreement.prompts prompts of agreement.prompt_tokens).
    """
    was_training = model.training
    model.eval()
    original = Variant(model, teacher, "original")
    row = {}
    try:
        for prefix, blocks in sets.items():
            greedy = agreement["prompts"] > 0
            prompts = blocks[: agreement["prompts"], : agreement["prompt_tokens"]] if greedy else None
            reference = greedy_tokens(original, prompts, agreement["new_tokens"]) if greedy else None
            for which in variants:
                variant = Variant(model, teacher, which)
                tf = teacher_forced_agreement(original, variant, blocks, batch_size, desc=f"{prefix}{which}")
                row |= {f"{prefix}ppl_original": tf["ppl_reference"], f"{prefix}ppl_{which}": tf["ppl_model"],
                        f"{prefix}top1_{which}": tf["top1_agreement"], f"{prefix}kl_{which}": tf["kl"]}
                if reference is not None:
                    greedy = greedy_agreement(reference, greedy_tokens(variant, prompts, agreement["new_tokens"]))
                    row |= {f"{prefix}greedy_match_{which}": greedy["match_fraction"],
                            f"{prefix}first_divergence_{which}": greedy["first_divergence"]}
            if f"{prefix}ppl_converted" in row and f"{prefix}ppl_finetuned" in row:
                gap = row[f"{prefix}ppl_converted"] - row[f"{prefix}ppl_original"]
                row[f"{prefix}gap_recovered"] = \
                    (row[f"{prefix}ppl_converted"] - row[f"{prefix}ppl_finetuned"]) / gap if gap > 0 else float("nan")
    finally:
        model.train(was_training)
    return row


class RecoveryCurve(TrainerCallback):
    """The teacher-forced recovery measures (fine-tuned against the original: perplexities, top-1, KL; greedy
    agreement too when `agreement` asks for prompts) before training and every `every` optimizer steps, one CSV
    row each: the recovery curve against training tokens and seconds. Rank 0 measures; the time it takes is left
    out of train_seconds."""

    def __init__(self, every: int, path: str | Path, teacher: nn.Module | None, sets: dict, batch_size: int,
                 tokens_per_step: int, columns: dict, agreement: dict | None = None):
        self.every, self.path, self.teacher, self.sets = every, Path(path), teacher, sets
        self.agreement = agreement or {"prompts": 0}
        self.batch_size, self.tokens_per_step, self.columns = batch_size, tokens_per_step, columns
        self.started, self.measuring, self.converted = 0.0, 0.0, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started, self.measuring = time.perf_counter(), 0.0
        if state.global_step == 0:
            self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state, model)

    def _measure(self, state, model) -> None:
        if not state.is_world_process_zero:
            return
        begin = time.perf_counter()
        train_seconds = begin - self.started - self.measuring
        row = recovery(model, self.teacher, self.sets, self.agreement, self.batch_size, ("finetuned",))
        if state.global_step == 0:  # the adapter starts at zero: the converted model
            self.converted = {k: v for k, v in row.items() if k.endswith("ppl_finetuned")}
        for key, ppl in self.converted.items():
            prefix = key[: -len("ppl_finetuned")]
            gap = ppl - row[f"{prefix}ppl_original"]
            row[f"{prefix}gap_recovered"] = (ppl - row[key]) / gap if gap > 0 else float("nan")
        self.measuring += time.perf_counter() - begin
        tokens = state.global_step * self.tokens_per_step
        row = {**self.columns, "step": state.global_step, "tokens": tokens, "train_seconds": round(train_seconds, 1),
               "tokens_per_s": round(tokens / train_seconds, 1) if state.global_step else float("nan"), **row,
               **provenance(self.columns.get("device", "cpu"))}
        update_table("recovery curve", [row], self.path)


def options(cfg: DictConfig, written: dict | None) -> str:
    """What a run adds to its recipe, for the tables (runs of one recipe differ in it): teacher-written text,
    LoRA ranks per layer set, fully trained layers; '' for none."""
    lora = OmegaConf.to_object(cfg.lora)
    parts = [f"teacher_text={written['samples']} ({written['key'][:8]})"] if written else []
    if lora.get("ranks"):
        parts.append("ranks " + ",".join(f"{k}:{v}" for k, v in lora["ranks"].items()))
    if lora.get("full_layers") is not None:
        parts.append(f"full {lora['full_layers']} lr {lora['full_lr']:g}")
    return "; ".join(parts)


# ---- the job -----------------------------------------------------------------------------
def run(cfg: DictConfig, callbacks: list[TrainerCallback] = ()) -> dict | None:
    """Fine-tune, save adapter + merged model, report recovery in and out of domain. Returns the result row (rank 0)."""
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if cfg.train.save_steps < 1:
        raise CqilError(f"train.save_steps={cfg.train.save_steps} must be >= 1")
    device = rank_device(cfg.model.device)
    with process_group(device, cfg.train.ddp_timeout):
        return train(cfg, device, callbacks, started)


def train(cfg: DictConfig, device: str, callbacks: list[TrainerCallback], started: float) -> dict | None:
    """run() once this process has its device (and, under torchrun, its process group)."""
    model_cfg = dataclasses.replace(model_config(cfg.model), device=device)
    model, tokenizer = models.load(model_cfg)
    teacher_path, separate = resolve_teacher(cfg.teacher.path, model_cfg.path, model.config)
    teacher = models.load(dataclasses.replace(model_cfg, path=teacher_path))[0].requires_grad_(False) if separate else None
    data_cfg = data_config(cfg.data)
    plan = choose_plan(plan_config(cfg.plan), model, tokenizer, data_cfg)
    block = cfg.train.block_size
    train_blocks = data.token_blocks(data_cfg, tokenizer, "training", cfg.train.train_tokens, block, "train.train_tokens")
    written = None
    if cfg.teacher_text.samples:  # the original model's own text beside the training split's
        written = teacher_text.blocks(OmegaConf.to_object(cfg.teacher_text), block, model, teacher, tokenizer, data_cfg,
                                      teacher_path)
        train_blocks = torch.cat([train_blocks, written[0]])
    sets = {"": data.token_blocks(data_cfg, tokenizer, "evaluation", cfg.eval_tokens, what="eval_tokens")}
    if cfg.get("ood_data") is not None:
        sets["ood_"] = data.token_blocks(data_config(cfg.ood_data, "ood_data"), tokenizer,
                                         "evaluation", cfg.ood_tokens, what="ood_tokens")
    agreement = OmegaConf.to_object(cfg.agreement)
    if agreement["prompts"] and agreement["prompt_tokens"] >= min(b.shape[1] for b in sets.values()):
        raise CqilError(f"agreement.prompt_tokens={agreement['prompt_tokens']} must be shorter than the held-out "
                        f"windows (data.block_size); lower it")

    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    resume = last_checkpoint(ckpt_dir)
    recipe = recipe_config(cfg, own=OWN_TRAIN).as_dict()
    fingerprint = {"model": cfg.model.path, "teacher": teacher_path, "plan": plan.to_dict(), "lora": recipe["lora"],
                   "loss": recipe["loss"], "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                   "seed": cfg.train.seed, "block_size": block, "data": dataclasses.asdict(data_cfg),
                   "teacher_text": written[1]["key"] if written else None}
    check_fingerprint(out_dir, fingerprint, resuming=resume is not None)
    name_adapter_base(model, tokenizer, plan, out_dir, cfg.model.name, cfg.model.path)

    on_gpu = device != "cpu"
    trainer = make_trainer(model, plan, train_blocks, recipe, ckpt_dir, on_gpu, callbacks=callbacks, teacher=teacher,
                           save_strategy="steps", save_steps=cfg.train.save_steps,
                           save_total_limit=cfg.train.save_total_limit, ddp_timeout=cfg.train.ddp_timeout,
                           report_to=[] if cfg.train.report_to == "none" else [cfg.train.report_to])
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * trainer.args.world_size * block
    layers = cfg.lora.layers if isinstance(cfg.lora.layers, str) else ",".join(map(str, cfg.lora.layers))
    columns = {"model": cfg.model.name, **plan_columns(plan), "data": f"{data_cfg.name}/training",
               "recipe": cfg.recipe_name, "options": options(cfg, written[1] if written else None),
               "loss_kind": cfg.loss.kind, **provenance(str(trainer.args.device))}
    trainer.add_callback(LossCsv(cfg.loss_csv, str(out_dir), tokens_per_step, columns))
    if cfg.curve.every_steps:
        curve_sets = {prefix: blocks[: cfg.curve.eval_tokens // blocks.shape[1]] for prefix, blocks in sets.items()}
        trainer.add_callback(RecoveryCurve(
            cfg.curve.every_steps, cfg.curve.out, teacher, curve_sets, cfg.eval_batch_size, tokens_per_step,
            {**columns, "lora_layers": layers, "lr": cfg.train.lr, "max_steps": trainer.args.max_steps,
             "teacher": teacher_path}, agreement if cfg.curve.greedy else None))
    if resume is not None:
        print(f"resuming from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():
        return None
    return report(cfg, trainer.model, tokenizer, plan, teacher, teacher_path, sets, agreement, columns, {
        "steps": trainer.state.global_step, "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        "train_tokens": trainer.state.global_step * tokens_per_step, "train_blocks_available": len(train_blocks),
        "teacher_text_blocks": len(written[0]) if written else 0,
        "teacher_text_key": written[1]["key"] if written else "",
        "block_size": block, "ppl_window": data_cfg.block_size, "train_seconds": round(train_seconds, 1),
        "lora_layers": layers}, started)


def report(cfg: DictConfig, model, tokenizer, plan: Plan, teacher: nn.Module | None, teacher_path: str,
           sets: dict[str, torch.Tensor], agreement: dict, columns: dict, training: dict, started: float) -> dict:
    """Save adapter and merged model, measure recovery in and out of domain, write and print the row."""
    out_dir = Path(cfg.out_dir)
    model.eval()
    adapter = write_dir(out_dir / "adapter", model.save_pretrained, ADAPTER, "finetune")

    measures = recovery(model, teacher, sets, agreement, cfg.eval_batch_size)
    merged_model = model.merge_and_unload()
    # where the original weights are (a later fine-tune of this directory distils from them, not from these)
    merged_model.config.cqil_base_model, merged_model.config.cqil_finetuned = teacher_path, True
    merged = save_converted(merged_model, tokenizer, out_dir / "merged", "finetune")

    row = {"model": cfg.model.name, **plan_columns(plan), "data": f"{cfg.data.name}/evaluation",
           "eval_tokens": sets[""].numel(), "ood_data": f"{cfg.ood_data.name}/evaluation" if "ood_" in sets else "",
           "ood_tokens": sets["ood_"].numel() if "ood_" in sets else 0, **training, "recipe": cfg.recipe_name,
           "loss_kind": cfg.loss.kind, "kl_weight": cfg.loss.kl_weight, "kl_from": cfg.loss.kl_from,
           "temperature": cfg.loss.temperature, "then": cfg.loss.get("then", "kl"),
           **{k: cfg.loss.get(k) for k in ("lmbda", "beta", "max_new_tokens", "score_prompt")},
           "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
           "lora_targets": ",".join(cfg.lora.target_modules), "lr": cfg.train.lr, "schedule": cfg.train.schedule,
           "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
           "weight_decay": cfg.train.weight_decay, "seed": cfg.train.seed, "teacher": teacher_path,
           "teacher_separate": teacher is not None, **measures,
           "wall_seconds": round(time.perf_counter() - started, 1), **peak_memory_mb(),
           "adapter": str(adapter), "merged": str(merged)}
    row |= {k: v for k, v in columns.items() if k not in row}  # provenance
    # one row per setting: different tries stay side by side, rerunning the same one replaces its row
    update_table("finetune", [row], cfg.out)
    card = dict(name=cfg.model.name, source=cfg.model.path, plan=plan, n_layers=merged_model.config.num_hidden_layers,
                command=row["command"], measured=card_measures(row, cfg))
    cards.write("merged", merged, **card)
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    cards.write("adapter", adapter, base=base, **card)
    print(f"{cfg.model.name} {plan.describe()}: {training['steps']} steps, {training['train_tokens']} training tokens, "
          f"{training['train_seconds']} s training, {row['wall_seconds']} s in all, peak RSS {row['peak_rss_mb']} MiB")
    print(summary(row, sets, cfg))
    print(f"adapter -> {adapter}   merged CQIL model -> {merged}   row -> {cfg.out}   loss curve -> {cfg.loss_csv}")
    return row


def card_measures(row: dict, cfg: DictConfig) -> dict[str, float]:
    """The result row's perplexities and agreements, named with the text they were measured on, for the model card."""
    sets = {"": f"{cfg.data.name}/evaluation, {row['eval_tokens']} tokens"}
    if row["ood_tokens"]:
        sets["ood_"] = f"{cfg.ood_data.name}/evaluation, {row['ood_tokens']} tokens"
    names = {"ppl_original": "perplexity, original", "ppl_converted": "perplexity, converted",
             "ppl_finetuned": "perplexity, fine-tuned", "top1_converted": "top-1 agreement with the original, converted",
             "top1_finetuned": "top-1 agreement with the original, fine-tuned"}
    return {f"{label} ({where})": row[prefix + key] for prefix, where in sets.items() for key, label in names.items()
            if isinstance(row.get(prefix + key), (int, float))}


def summary(row: dict, sets: dict[str, torch.Tensor], cfg: DictConfig) -> str:
    """The result row as a small table: one line per held-out set."""
    names = {"": f"in domain ({cfg.data.name})", "ood_": f"out of domain ({cfg.get('ood_data', {}).get('name')})"}
    lines = [f"{'held-out text':<34} {'tokens':>7}  {'perplexity: original':>20} {'converted':>9} {'fine-tuned':>10} "
             f"{'gap recovered':>13}  {'top-1 agreement: converted':>26} {'fine-tuned':>10}"]
    for prefix, blocks in sets.items():
        get = lambda key: row.get(f"{prefix}{key}", float("nan"))  # noqa: E731
        lines.append(f"{names[prefix]:<34} {blocks.numel():>7}  {get('ppl_original'):>20.2f} {get('ppl_converted'):>9.2f} "
                     f"{get('ppl_finetuned'):>10.2f} {get('gap_recovered'):>13.0%}  {get('top1_converted'):>26.3f} "
                     f"{get('top1_finetuned'):>10.3f}")
    return "\n".join(lines)
