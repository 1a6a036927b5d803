"""`cqil convert` and `cqil sweep`: apply a plan (given, from a file, or plan=auto: cqil.planning) and measure it.

Layer indices are 0-based and a plan's end is exclusive everywhere here.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from . import CqilError, cards, data, inputs, models
from .config import data_config, model_config, plan_config
from .metrics import perplexity
from .modeling import apply_plan, get_plan, save_converted
from .plan import Plan
from .planning import plan_perplexities, resolve_plan, sweep_plans
from .results import command, plan_columns, provenance, update_table


# ---- cqil convert ------------------------------------------------------------------------------
def run(cfg: DictConfig) -> None:
    """cqil convert: model + plan -> a CQIL directory (cqil loads it with its own class; stock transformers with
    from_pretrained(dir, trust_remote_code=True), which runs the modeling_cqil.py saved in it)."""
    torch.set_num_threads(cfg.threads)
    model_cfg, data_cfg, plan_cfg = model_config(cfg.model), data_config(cfg.data), plan_config(cfg.plan)
    model, tokenizer = models.load(model_cfg)
    if get_plan(model).groups:  # a converted hub repo (a local directory is refused by cqil.checks already)
        raise CqilError(inputs.converted_refusal(f"model {model_cfg.path!r}", model.config.to_dict()))
    model.config.cqil_base_model = models.recorded_path(model_cfg.path)  # the directory names its base
    eval_blocks = data.token_blocks(data_cfg, tokenizer, "evaluation", cfg.eval_tokens, what="eval_tokens")
    start = time.perf_counter()
    plan = resolve_plan(plan_cfg, model, tokenizer, data_cfg)
    plan_seconds = time.perf_counter() - start
    n = model.config.num_hidden_layers
    out_dir = Path(cfg.out_dir or f"outputs/converted/{model_cfg.name}_{plan.tag()}")
    print(f"plan for {model_cfg.name} ({n} layers): {plan.describe()} "
          f"(ideal latency reduction {plan.ideal_latency_reduction(n):.1%}) -> {out_dir}")

    ppl_before = perplexity(model, eval_blocks, cfg.batch_size, desc="original")
    start = time.perf_counter()
    apply_plan(model, plan)
    save_converted(model, tokenizer, out_dir)
    convert_seconds = time.perf_counter() - start
    del model
    # Perplexity after conversion is measured on the saved directory, loaded as users will load it.
    loaded, _ = models.load(dataclasses.replace(model_cfg, path=str(out_dir)))
    if get_plan(loaded) != plan:
        raise CqilError(f"{out_dir} loads with plan {get_plan(loaded).describe()}, expected {plan.describe()}")
    ppl_after = perplexity(loaded, eval_blocks, cfg.batch_size, desc="converted")

    common = {"model": model_cfg.name, "data": f"{data_cfg.name}/evaluation", "n_tokens": eval_blocks.numel(),
              "plan_mode": plan_cfg.mode}
    rows = [{**common, "variant": variant, **plan_columns(p, n), "bypass": p.bypass,
             "perplexity": round(ppl, 3), "ppl_ratio": round(ppl / ppl_before, 4),
             "plan_seconds": round(plan_seconds, 2), "convert_seconds": round(convert_seconds, 2),
             "out_dir": str(out_dir) if p.groups else "", **provenance(model_cfg.device)}
            for variant, p, ppl in (("original", Plan(), ppl_before), ("converted", plan, ppl_after))]
    update_table("convert", rows, cfg.results)
    where = f"{data_cfg.name}/evaluation, {eval_blocks.numel()} tokens"
    cards.write("converted", out_dir, name=model_cfg.name, source=model_cfg.path, plan=plan, n_layers=n,
                command=command(), measured={f"perplexity, original ({where})": ppl_before,
                                             f"perplexity, converted ({where})": ppl_after})
    print(f"held-out perplexity ({eval_blocks.numel()} tokens of {data_cfg.name}/evaluation): "
          f"original {ppl_before:.2f} -> converted {ppl_after:.2f} ({ppl_after / ppl_before:.2f} x)")
    print(f"conversion (apply plan + save) {convert_seconds:.1f} s; plan choice {plan_seconds:.1f} s; "
          f"results -> {cfg.results}")
    print(f"use it: cqil <job> model=hf model.path={out_dir} model.name=<label>; without cqil: "
          f"AutoModelForCausalLM.from_pretrained('{out_dir}', trust_remote_code=True) (runs its modeling_cqil.py)")


# ---- cqil sweep --------------------------------------------------------------------------------
def sweep(cfg: DictConfig) -> None:
    """cqil sweep: held-out perplexity of every plan [S, E) for each P and E, in one CSV."""
    torch.set_num_threads(cfg.threads)
    model_cfg, data_cfg = model_config(cfg.model), data_config(cfg.data)
    model, tokenizer = models.load(model_cfg)
    n = model.config.num_hidden_layers
    ends = [n - 2, n - 1] if cfg.ends is None else list(cfg.ends)
    plans = sweep_plans(n, list(cfg.group_sizes), ends, cfg.min_start, cfg.bypass)
    blocks = data.token_blocks(data_cfg, tokenizer, "evaluation", cfg.eval_tokens, what="eval_tokens")
    print(f"{len(plans)} plans (E in {ends}, P in {list(cfg.group_sizes)}) on {blocks.numel()} "
          f"held-out tokens of {data_cfg.name}")
    start = time.perf_counter()
    ppl = plan_perplexities(model, blocks, [Plan()] + plans, cfg.batch_size, "sweep")
    seconds = time.perf_counter() - start
    rows = [{"model": model_cfg.name, "data": f"{data_cfg.name}/evaluation", "n_tokens": blocks.numel(),
             "group_size": p.group_size, "start": p.groups[0][0] if p.groups else None,
             "end": p.groups[-1][-1] + 1 if p.groups else None, "bypass": p.bypass, **plan_columns(p, n),
             "n_groups": len(p.groups),
             "perplexity": round(v, 3), "ppl_ratio": round(v / ppl[0], 4), "sweep_seconds": round(seconds, 1),
             **provenance(model_cfg.device)}
            for p, v in zip([Plan()] + plans, ppl)]
    table = pd.DataFrame(rows)
    update_table("sweep", table, cfg.out)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table[["plan", "ideal_latency_reduction", "perplexity", "ppl_ratio"]].to_string(index=False))
    print(f"{len(plans) + 1} perplexities in {seconds:.0f} s -> {cfg.out}")
