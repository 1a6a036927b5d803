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
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import CqilError, data, models
from .distill import make_trainer
from .metrics import perplexity
from .modeling import apply_plan, get_plan, is_converted_dir, plan_disabled, save_converted, write_dir
from .plan import Plan
from .planning import resolve_plan
from .results import plan_columns, provenance, upsert_csv, write_csv

# What must match for a rerun to continue the checkpoints in out_dir (max_steps, lr, ... may change).
FINGERPRINT_KEYS = ("model", "plan", "lora", "loss", "data", "batch_size", "grad_accum", "seed")


# ---- progress log, checkpoints -----------------------------------------------------------
class LossCsv(TrainerCallback):
    """Loss per optimizer step -> CSV, one row per step, appended as training goes.

    On (re)start the file is rewritten from the Trainer's log history, which a resumed run
    restores from its checkpoint: steps after the checkpoint (redone now) are not duplicated.
    """

    def __init__(self, path: str | Path, tokens_per_step: int, columns: dict):
        self.path, self.tokens_per_step, self.columns = Path(path), tokens_per_step, columns

    def _row(self, log: dict) -> dict:
        return {"step": log["step"], "tokens": log["step"] * self.tokens_per_step, "loss": log["loss"],
                "learning_rate": log.get("learning_rate"), "grad_norm": log.get("grad_norm"),
                "epoch": log.get("epoch"), **self.columns}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            rows = [self._row(h) for h in state.log_history if "loss" in h]
            write_csv(pd.DataFrame(rows, columns=list(self._row({"step": 0, "loss": 0.0}))), self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            row = self._row(state.log_history[-1])
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(row)).writerow(row)


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
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
        tmp.replace(path)


# ---- model preparation -------------------------------------------------------------------
def choose_plan(plan_cfg: dict, model, tokenizer, data_cfg: data.DataConfig) -> Plan:
    """The plan to recover from: the converted model's own, or the configured one applied now."""
    own = get_plan(model)
    if own.groups and plan_cfg.get("mode") == "auto":
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


def name_adapter_base(model, tokenizer, plan: Plan, out_dir: Path) -> None:
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
            save_converted(model, tokenizer, base)
        model.name_or_path = str(base)  # what peft records as the adapter's base


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak GPU memory allocated, if any), MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {"peak_rss_mb": round(rss), "peak_gpu_mb": round(gpu) if not math.isnan(gpu) else gpu}


# ---- the job -----------------------------------------------------------------------------
def run(cfg: DictConfig, callbacks: list[TrainerCallback] = ()) -> dict | None:
    """Fine-tune, save adapter + merged model, report held-out perplexities. Returns the result row (rank 0)."""
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if cfg.train.save_steps < 1:
        raise CqilError(f"train.save_steps={cfg.train.save_steps} must be >= 1")
    model, tokenizer = models.load(OmegaConf.to_object(cfg.model))
    data_cfg = data.DataConfig(**OmegaConf.to_object(cfg.data))
    plan = choose_plan(OmegaConf.to_object(cfg.plan), model, tokenizer, data_cfg)
    block = cfg.train.block_size
    train_blocks = data.token_blocks(data_cfg, tokenizer, "training", cfg.train.train_tokens, block, "train.train_tokens")
    eval_blocks = data.token_blocks(data_cfg, tokenizer, "evaluation", cfg.eval_tokens, what="eval_tokens")

    out_dir, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    resume = last_checkpoint(ckpt_dir)
    recipe = {k: OmegaConf.to_object(cfg[k]) for k in ("lora", "loss", "train")}
    fingerprint = {"model": cfg.model.path, "plan": plan.to_dict(), "lora": recipe["lora"], "loss": recipe["loss"],
                   "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "seed": cfg.train.seed,
                   "block_size": block, "data": OmegaConf.to_object(cfg.data)}
    check_fingerprint(out_dir, fingerprint, resuming=resume is not None)
    name_adapter_base(model, tokenizer, plan, out_dir)

    on_gpu = cfg.model.device != "cpu" and torch.cuda.is_available()
    trainer = make_trainer(model, plan, train_blocks, recipe, ckpt_dir, on_gpu, callbacks=callbacks,
                           save_strategy="steps", save_steps=cfg.train.save_steps,
                           save_total_limit=cfg.train.save_total_limit, ddp_timeout=cfg.train.ddp_timeout)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * trainer.args.world_size * block
    columns = {"model": cfg.model.name, **plan_columns(plan), "data": f"{data_cfg.name}/training",
               "recipe": cfg.recipe_name, "loss_kind": cfg.loss.kind, **provenance(str(trainer.args.device))}
    trainer.add_callback(LossCsv(cfg.loss_csv, tokens_per_step, columns))
    if resume is not None:
        print(f"resuming from {resume}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - start
    if not trainer.is_world_process_zero():
        return None
    return report(cfg, trainer.model, tokenizer, plan, eval_blocks, columns, {
        "steps": trainer.state.global_step, "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        "train_tokens": trainer.state.global_step * tokens_per_step, "train_blocks_available": len(train_blocks),
        "block_size": block, "ppl_window": data_cfg.block_size, "train_seconds": round(train_seconds, 1)}, started)


def report(cfg: DictConfig, model, tokenizer, plan: Plan, eval_blocks: torch.Tensor, columns: dict,
           training: dict, started: float) -> dict:
    """Save adapter and merged model, measure the three held-out perplexities, write and print the row."""
    out_dir = Path(cfg.out_dir)
    model.eval()
    adapter = write_dir(out_dir / "adapter", model.save_pretrained)

    bs = cfg.eval_batch_size
    with model.disable_adapter(), plan_disabled(model):
        ppl_original = perplexity(model, eval_blocks, bs, desc="perplexity original")
    with model.disable_adapter():
        ppl_converted = perplexity(model, eval_blocks, bs, desc="perplexity converted")
    ppl_finetuned = perplexity(model, eval_blocks, bs, desc="perplexity fine-tuned")
    merged = save_converted(model.merge_and_unload(), tokenizer, out_dir / "merged")

    gap = ppl_converted - ppl_original
    row = {"model": cfg.model.name, **plan_columns(plan), "data": f"{cfg.data.name}/evaluation",
           "eval_tokens": eval_blocks.numel(), **training, "recipe": cfg.recipe_name, "loss_kind": cfg.loss.kind,
           "temperature": cfg.loss.temperature, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
           "lora_targets": ",".join(cfg.lora.target_modules),
           "lora_layers": cfg.lora.layers if isinstance(cfg.lora.layers, str) else ",".join(map(str, cfg.lora.layers)),
           "lr": cfg.train.lr, "schedule": cfg.train.schedule, "batch_size": cfg.train.batch_size,
           "grad_accum": cfg.train.grad_accum, "weight_decay": cfg.train.weight_decay, "seed": cfg.train.seed,
           "ppl_original": ppl_original, "ppl_converted": ppl_converted, "ppl_finetuned": ppl_finetuned,
           "gap_recovered": (ppl_converted - ppl_finetuned) / gap if gap > 0 else float("nan"),
           "wall_seconds": round(time.perf_counter() - started, 1), **peak_memory_mb(),
           "adapter": str(adapter), "merged": str(merged)}
    row |= {k: v for k, v in columns.items() if k not in row}  # provenance
    # one row per setting: different tries stay side by side, rerunning the same one replaces its row
    upsert_csv([row], cfg.out, ["model", "plan", "data", "steps", "block_size", "recipe", "loss_kind", "lora_r",
                                "lora_layers", "lr", "seed"])
    print(f"{cfg.model.name} {plan.describe()}: {training['steps']} steps, {training['train_tokens']} training tokens, "
          f"{training['train_seconds']} s training, {row['wall_seconds']} s in all, peak RSS {row['peak_rss_mb']} MiB")
    print(f"held-out perplexity ({eval_blocks.numel()} tokens of {cfg.data.name}/evaluation):")
    print(f"  original {ppl_original:.2f}   converted {ppl_converted:.2f}   fine-tuned {ppl_finetuned:.2f}   "
          f"(gap recovered: {row['gap_recovered']:.0%})")
    print(f"adapter -> {adapter}   merged CQIL model -> {merged}   row -> {cfg.out}   loss curve -> {cfg.loss_csv}")
    return row
