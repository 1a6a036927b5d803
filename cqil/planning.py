"""Choosing a plan: resolve the plan a job runs with (given, from a file, or chosen from data).

Layer indices are 0-based and a plan's end is exclusive everywhere here. Every job that needs a plan
(convert, sweep, finetune, bench, eval) calls `resolve_plan`; nothing else chooses plans.

plan=auto (`choose_plan`) turns a `cqil analyze` CSV into a plan:
  1. candidates: for each group size P and each start layer S, the widest span [S, E) whose every
     group [s .. s+P-1] keeps cos(x_s, x_{s+k}) >= min_similarity for all members k (x_i: input of
     layer i), i.e. the shared group input stays close to the input each member was trained on;
     the first keep_first and last keep_last layers stay sequential;
  2. every candidate is scored by perplexity on calibration text (cqil.metrics' window protocol),
     because on small models the similarity is nearly flat while the damage of grouping differs by
     an order of magnitude;
  3. the largest ideal latency reduction (rank_by=latency: the latency model's predicted reduction,
     cqil.latency) whose perplexity stays within max_ppl_ratio x the original's wins; at equal
     reduction the smaller P (fewer devices, smaller all-reduces), then the lower perplexity.
     The whole table is printed and stored.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from . import CqilError, data
from .latency import mesh_choice, predicted_reduction
from .metrics import nll
from .modeling import CqilLayers, decoder, plan_disabled
from .plan import Plan, PlanError, plan_from_config
from .results import plan_columns, provenance, read_csv, write_csv


def plain(cfg) -> dict:
    """A config section as a plain dict (DictConfig, dataclass or dict)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, data.DataConfig):
        return dict(vars(cfg))
    return dict(cfg)


def resolve_plan(plan_cfg, model, tokenizer=None, data_cfg=None) -> Plan:
    """The plan a job runs with: plan=manual / plan=file directly, plan=auto chosen from data."""
    cfg = plain(plan_cfg)
    if cfg.get("mode") == "auto":
        if tokenizer is None or data_cfg is None:
            raise PlanError("plan=auto needs the tokenizer and the data config (calibration text) to score candidates")
        return choose_plan(cfg, model, tokenizer, data_cfg).plan
    return plan_from_config(cfg, model.config.num_hidden_layers)


# ---- perplexity of many plans at once ---------------------------------------------------------
@contextlib.contextmanager
def _layers_from(model: nn.Module, start: int, plan: Plan) -> Iterator[None]:
    """Inside: the decoder runs only layers start.. (under `plan`); feed it x_start as inputs_embeds.

    The layers before a plan's first group compute exactly what the original model computes, so
    their output is computed once and shared by every plan that starts at or after them.
    """
    dec = decoder(model)
    saved = dec.layers
    tail = nn.ModuleList(list(saved)[start:])  # iterating a CqilLayers yields every layer, in order
    shifted = Plan(tuple(tuple(i - start for i in g) for g in plan.groups), plan.bypass)
    dec.layers = CqilLayers(tail, shifted) if shifted.groups else tail
    try:
        yield
    finally:
        dec.layers = saved


@torch.no_grad()
def plan_perplexities(model: nn.Module, blocks: torch.Tensor, plans: list[Plan], batch_size: int = 4,
                      desc: str = "plans") -> list[float]:
    """Perplexity of `model` under each plan on blocks [n, T] (the window protocol of cqil.metrics).

    The original model runs once per batch; each plan then runs only from its first group on.
    """
    device = next(model.parameters()).device
    total, count = [0.0] * len(plans), 0
    batches = blocks.split(batch_size)
    with tqdm(total=len(batches) * len(plans), desc=desc, unit="plan-batch", leave=False) as bar:
        for batch in batches:
            batch = batch.to(device)
            with plan_disabled(model):
                out = model(input_ids=batch, output_hidden_states=True, use_cache=False)
            states = out.hidden_states  # states[i] = input of layer i for i < n
            for k, plan in enumerate(plans):
                if plan.groups:
                    with _layers_from(model, plan.groups[0][0], plan):
                        logits = model(inputs_embeds=states[plan.groups[0][0]], use_cache=False).logits
                else:
                    logits = out.logits
                s, c = nll(logits, batch)
                total[k] += s
                bar.update()
            count += c
    return [math.exp(v / count) for v in total]


# ---- plan=auto ---------------------------------------------------------------------------------
def similarity_matrix(path: str | Path, num_layers: int) -> np.ndarray:
    """[n+1, n+1] mean cosine similarity of layer inputs (index n: last output) from a `cqil analyze` CSV."""
    if not Path(path).is_file():
        raise CqilError(f"plan=auto needs the similarity table {path}; run `cqil analyze` with the same "
                        "model and data first (or set plan.similarity_csv)")
    df = read_csv(path)
    missing = {"layer_i", "layer_j", "cos_mean", "n_layers"} - set(df.columns)
    if missing:
        raise CqilError(f"{path} is not a `cqil analyze` table (no {', '.join(sorted(missing))} column); rerun cqil analyze")
    if int(df.n_layers.iloc[0]) != num_layers:
        raise CqilError(f"{path} was made for a model with {int(df.n_layers.iloc[0])} layers, this one has "
                        f"{num_layers}; rerun `cqil analyze` for this model")
    sim = np.full((num_layers + 1, num_layers + 1), np.nan)
    sim[df.layer_i.to_numpy(), df.layer_j.to_numpy()] = df.cos_mean.to_numpy()
    return sim


def group_similarity(sim: np.ndarray, start: int, size: int) -> float:
    """min over members k of cos(x_start, x_start+k): how close the shared input is to each member's own."""
    return float(min(sim[start, start + k] for k in range(1, size)))


def candidate_plans(sim: np.ndarray, num_layers: int, group_sizes: list[int], bypass: int, min_similarity: float,
                    keep_first: int, keep_last: int) -> list[Plan]:
    """For each P and start S: the widest [S, E) whose groups all keep group_similarity >= min_similarity."""
    if any(p < 2 for p in group_sizes):
        raise PlanError(f"plan.group_sizes={list(group_sizes)}: every group size must be >= 2")
    last = num_layers - keep_last  # exclusive bound on E
    out = []
    for size in group_sizes:
        for start in range(keep_first, last - size + 1):
            end = start
            while end + size <= last and group_similarity(sim, end, size) >= min_similarity:
                end += size
            if end > start:
                out.append(Plan.from_range(start, end, size, bypass, num_layers))
    return out


def rank_key(cfg: dict, model: nn.Module, candidates: list[Plan], table: pd.DataFrame) -> tuple[str, str]:
    """The column candidates are ranked by (rank_by: ideal | latency) and its name in words.

    latency: the latency model's predicted reduction (cqil.latency roofline of the model's own shape on
    cfg.latency.hardware, at cfg.latency's phase, prompt_tokens and batch_size), added as predicted_reduction.
    """
    rank_by = cfg.get("rank_by") or "ideal"
    if rank_by == "ideal":
        return "ideal_latency_reduction", "ideal latency reduction"
    if rank_by != "latency":
        raise PlanError(f"plan.rank_by={rank_by!r} is not one of ideal, latency")
    lat = cfg["latency"]
    if cfg.get("devices"):  # N devices: each plan on its best P x (N/P) mesh, against tensor parallelism on N
        lat = {**lat, "devices": int(cfg["devices"])}
        meshes = [mesh_choice(model.config, p, lat) for p in candidates]
        table["predicted_reduction"] = [round(m["reduction"], 4) for m in meshes]  # NaN: no mesh of N devices
        table["mesh"] = [m["mesh"] for m in meshes]
        return "predicted_reduction", (f"predicted latency reduction against tensor parallelism on {lat['devices']} "
                                       f"devices ({lat['hardware']}, {lat['phase']} T={lat['prompt_tokens']} "
                                       f"B={lat['batch_size']})")
    table["predicted_reduction"] = [round(predicted_reduction(model.config, p, lat), 4) for p in candidates]
    return "predicted_reduction", (f"predicted latency reduction ({lat['hardware']}, {lat['phase']} "
                                   f"T={lat['prompt_tokens']} B={lat['batch_size']})")


@dataclass
class Choice:
    plan: Plan
    table: pd.DataFrame
    reason: str


def choose_plan(cfg: dict, model: nn.Module, tokenizer, data_cfg) -> Choice:
    """plan=auto: candidates from similarity, scored by calibration perplexity; see the module docstring."""
    n = model.config.num_hidden_layers
    dcfg = data.DataConfig(**plain(data_cfg))
    sim = similarity_matrix(cfg["similarity_csv"], n)
    candidates = candidate_plans(sim, n, list(cfg["group_sizes"]), int(cfg.get("bypass") or 0),
                                 float(cfg["min_similarity"]), int(cfg["keep_first"]), int(cfg["keep_last"]))
    if not candidates:
        raise CqilError(f"no span keeps similarity >= plan.min_similarity={cfg['min_similarity']} for group sizes "
                        f"{list(cfg['group_sizes'])}; lower plan.min_similarity or give a plan by hand")
    blocks = data.token_blocks(dcfg, tokenizer, "calibration", cfg["calibration_tokens"],
                               what="plan.calibration_tokens")
    print(f"plan=auto: scoring {len(candidates)} candidates on {blocks.numel()} calibration tokens of {dcfg.name}")
    start = time.perf_counter()
    ppl = plan_perplexities(model, blocks, [Plan()] + candidates, int(cfg.get("batch_size") or 4), "plan=auto")
    seconds = time.perf_counter() - start
    original, scores = ppl[0], ppl[1:]
    budget = float(cfg["max_ppl_ratio"])
    rows = []
    for plan, p in zip(candidates, scores):
        groups_sim = [group_similarity(sim, g[0], len(g)) for g in plan.groups]
        rows.append({"model": cfg.get("model") or model.config.name_or_path, "data": f"{dcfg.name}/calibration",
                     "n_tokens": blocks.numel(), "group_size": plan.group_size, "start": plan.groups[0][0],
                     "end": plan.groups[-1][-1] + 1, "bypass": plan.bypass, **plan_columns(plan, n),
                     "n_groups": len(plan.groups),
                     "min_similarity": round(min(groups_sim), 4), "mean_similarity": round(float(np.mean(groups_sim)), 4),
                     "calibration_ppl": round(p, 3), "original_ppl": round(original, 3), "ppl_ratio": round(p / original, 4),
                     "within_budget": p / original <= budget, "max_ppl_ratio": budget, "chosen": False,
                     "seconds": round(seconds, 1)})
    table = pd.DataFrame(rows)
    key, what = rank_key(cfg, model, candidates, table)
    ok = table[table.within_budget & table[key].notna()]  # NaN: the plan has no mesh on plan.devices
    if ok.empty:
        best = table.loc[table.ppl_ratio.idxmin()]
        reason = (f"none of the {len(table)} candidates keeps calibration perplexity within {budget} x the original "
                  f"({original:.2f}); the closest is {best.plan} at {best.ppl_ratio:.2f} x")
    else:
        pick = ok.sort_values([key, "group_size", "calibration_ppl"], ascending=[False, True, True]).index[0]
        table.loc[pick, "chosen"] = True
        row = table.loc[pick]
        reason = (f"picked {row.plan}: the largest {what} ({row[key]:.1%}) among the "
                  f"{len(ok)} of {len(table)} candidates whose calibration perplexity stays within {budget} x the "
                  f"original's ({row.calibration_ppl:.2f} vs {original:.2f}, {row.ppl_ratio:.2f} x)")
        tied = len(ok[ok[key] == row[key]]) - 1
        if tied:
            reason += (f"; {tied} other candidate(s) in budget give the same reduction: this one needs the fewest "
                       f"devices (P={row.group_size}) and, among those, has the lowest perplexity")
        bolder = table[table[key] > row[key]]
        if not bolder.empty:
            b = bolder.loc[bolder.ppl_ratio.idxmin()]
            reason += (f"; every bolder candidate exceeds the budget (the best of them, {b.plan} at "
                       f"{b[key]:.1%}, costs {b.ppl_ratio:.2f} x)")
    for k, v in provenance(str(next(model.parameters()).device)).items():
        table[k] = v
    write_csv(table, cfg["table"])
    shown = ["plan", "n_groups", "ideal_latency_reduction", *(["predicted_reduction"] if key != "ideal_latency_reduction"
                                                              else []), "min_similarity", "calibration_ppl", "ppl_ratio", "chosen"]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(table[shown].to_string(index=False))
    print(f"plan=auto: {reason}\n  candidate table -> {cfg['table']}")
    if ok.empty:
        raise CqilError(f"{reason}; raise plan.max_ppl_ratio or give a plan by hand (table: {cfg['table']})")
    plan = candidates[pick]  # table rows are in candidate order
    Path(cfg["out"]).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg["out"])
    print(f"  chosen plan -> {cfg['out']} (use it with plan=file)")
    return Choice(plan, table, reason)


def sweep_plans(num_layers: int, group_sizes: list[int], ends: list[int], min_start: int, bypass: int) -> list[Plan]:
    """For each P and each E: every valid S (min_start <= S, E - S a positive multiple of P)."""
    for end in ends:
        if not 0 < end <= num_layers:
            raise PlanError(f"sweep end={end} must be in 1..{num_layers} (0-based layers, end exclusive)")
    plans = [Plan.from_range(s, end, p, bypass, num_layers)
             for p in group_sizes for end in ends for s in range(end - p, min_start - 1, -p)]
    if not plans:
        raise PlanError(f"no plan fits between min_start={min_start} and ends {list(ends)} for group sizes "
                        f"{list(group_sizes)}")
    return plans


