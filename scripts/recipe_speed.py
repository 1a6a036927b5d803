"""Training throughput of recovery recipes, measured back to back in one process.

    python scripts/recipe_speed.py "kl_all=recipe=kl" "kl_from_plan=recipe=kl lora.layers=from_plan" \
        "blockwise=recipe=blockwise" [--steps 6] [--threads 1] [--out results/finetune/speed_smollm2-135m.csv]

Each variant is `name=<cqil finetune overrides, space separated>` (the finetune job's config; its model, data
and plan). The model is loaded once and copied per variant; the variants then take optimizer steps in turn
(round robin: step 1 of every variant, then step 2, ...), so a machine whose load drifts disturbs them alike.
Per variant: tokens per second of wall time and per CPU second of this process (less disturbed by other
processes on a shared machine), medians over the steps after the first, and the means (what a run's wall time
follows when steps differ: an on-policy recipe samples on a share lmbda of its steps, step k deciding as in
training); for on-policy variants also the seconds a step spends sampling the student's continuations. A
two-phase recipe (blockwise, then loss.then) is timed in its first phase; time its second phase as a variant of
its own (blockwise_onpolicy's: recipe=onpolicy with its blocks, "train.block_size=256 train.batch_size=4").
Capacity options (lora.ranks, lora.full_layers) are overrides like any other. One CSV row per variant.

    python scripts/recipe_speed.py "blockwise_kl_kl=recipe=kl lora.layers=from_plan" \
        "onpolicy=recipe=onpolicy" "onpolicy_256=recipe=onpolicy train.block_size=256 train.batch_size=4" \
        "full_groups=recipe=kl lora.layers=from_plan lora.full_layers=groups" --steps 6

The pseudo-override `share_prefix=false` turns off the student's reuse of the teacher's prefix (cqil.distill),
to measure what it saves.
"""
from __future__ import annotations

import argparse
import copy
import functools
import shlex
import statistics
import time

import torch

from cqil import data, finetune, models
from cqil.config import data_config, model_config, plan_config, recipe_config
from cqil.cli import compose
from cqil.distill import make_trainer
from cqil.planning import resolve_plan
from cqil.modeling import apply_plan
from cqil.results import plan_columns, provenance, write_csv


def timed(fn, seconds: list):
    """fn, appending the wall seconds of every call to `seconds`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - begin)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="name=<cqil finetune overrides>")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="CSV (default results/finetune/speed_<model>.csv)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {}
    for spec in args.variants:
        name, _, overrides = spec.partition("=")
        words = shlex.split(overrides)
        share = "share_prefix=false" not in words
        variants[name] = (compose("finetune", [w for w in words if w != "share_prefix=false"]), share, overrides)
    first = next(iter(variants.values()))[0]
    base, tokenizer = models.load(model_config(first.model))
    data_cfg = data_config(first.data)
    plan = resolve_plan(plan_config(first.plan), base, tokenizer, data_cfg)

    runs = {}
    for name, (cfg, share, _) in variants.items():
        blocks = data.token_blocks(data_cfg, tokenizer, "training", None, cfg.train.block_size)
        recipe = recipe_config(cfg, own=finetune.OWN_TRAIN).as_dict()
        trainer = make_trainer(apply_plan(copy.deepcopy(base), plan), plan, blocks, recipe, f"/tmp/recipe_speed/{name}",
                               max_steps=args.steps)
        trainer.share_prefix = trainer.share_prefix and share
        batch = cfg.train.batch_size
        runs[name] = {"trainer": trainer, "optimizer": trainer.create_optimizer(), "blocks": blocks, "batch": batch,
                      "wall": [], "cpu": [], "sampling": [], "tokens": batch * cfg.train.block_size}
        trainer.student_continuation = timed(trainer.student_continuation, runs[name]["sampling"])
    for step in range(args.steps):
        for name, run in runs.items():
            trainer, ids = run["trainer"], run["blocks"][step * run["batch"]:(step + 1) * run["batch"]]
            if trainer.loss_kind == "onpolicy":  # its steps k sample as in training (share lmbda)
                trainer.state.global_step = step
            trainer.model.train()
            wall, cpu = time.perf_counter(), time.process_time()
            loss = trainer.compute_loss(trainer.model, {"input_ids": ids})
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad()
            run["wall"].append(time.perf_counter() - wall)
            run["cpu"].append(time.process_time() - cpu)
            print(f"step {step + 1}/{args.steps} {name}: loss {loss.item():.4f}, {run['wall'][-1]:.1f} s wall, "
                  f"{run['cpu'][-1]:.1f} s CPU", flush=True)
    rows = []
    for name, run in runs.items():
        wall, cpu = statistics.median(run["wall"][1:]), statistics.median(run["cpu"][1:])
        mean = statistics.mean(run["wall"][1:])
        cfg, share, overrides = variants[name]
        rows.append({"variant": name, "overrides": overrides, "model": cfg.model.name, **plan_columns(plan),
                     "recipe": cfg.recipe_name, "loss_kind": cfg.loss.kind, "lora_layers": str(cfg.lora.layers),
                     "share_prefix": run["trainer"].share_prefix, "tokens_per_step": run["tokens"],
                     "steps_timed": args.steps - 1, "threads": args.threads, "step_seconds_wall": round(wall, 2),
                     "step_seconds_cpu": round(cpu, 2), "tokens_per_s_wall": round(run["tokens"] / wall, 1),
                     "tokens_per_cpu_s": round(run["tokens"] / cpu, 1), "step_seconds_wall_mean": round(mean, 2),
                     "tokens_per_s_wall_mean": round(run["tokens"] / mean, 1), "options": finetune.options(cfg, None),
                     "sampling_seconds_per_step": round(sum(run["sampling"]) / args.steps, 2), **provenance()})
    out = args.out or f"results/finetune/speed_{first.model.name}.csv"
    write_csv(rows, out)
    for r in rows:
        print(f"{r['variant']:<24} {r['tokens_per_s_wall']:>8} tokens/s wall (median step)  {r['tokens_per_s_wall_mean']:>8} "
              f"(mean)  {r['tokens_per_cpu_s']:>8} tokens/CPU-s  sampling {r['sampling_seconds_per_step']} s/step")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
