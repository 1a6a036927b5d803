"""Choosing a plan: resolve the plan a job runs with (given, from a file, or chosen from data).

Layer indices are 0-based and a plan's end is exclusive everywhere here. Every job that needs a plan
(convert, sweep, finetune, bench, eval) calls `resolve_plan`; nothing else chooses plans.

plan=auto (`choose_plan`) turns a `cqil analyze` CSV and calibration text into a plan:
  1. single groups: every window [s .. s+P-1] of P consecutive layers (P in group_sizes) between the first
     keep_first and the last keep_last layers (which stay sequential) whose shared input stays close to each
     member's own (cos(x_s, x_{s+k}) >= min_similarity, x_i: input of layer i; a coarse pre-filter only) is
     scored by perplexity on calibration text (cqil.metrics' window protocol). Its cost is the increase of
     log-perplexity over the original's. On small models similarity is nearly flat while this cost differs
     by an order of magnitude between layers, which is why every candidate is scored.
  2. candidates, for each P and each number of groups k:
       greedy: the first k groups taken cheapest first, skipping any that overlaps one already taken
               (a plan need not be one contiguous span);
       contiguous: the `contiguous_per_size` spans of k groups whose groups' summed costs are lowest;
     every candidate is re-scored as a whole, and the table keeps its measured cost beside the sum of its
     groups' costs: the check that costs add up, which the greedy order relies on.
  3. the choice, by `budget`:
       before: the largest ideal latency reduction (rank_by=latency: the latency model's predicted reduction,
               cqil.latency) whose calibration perplexity is within max_ppl_ratio x the original's;
       after_recovery: recovery is part of the method, so the candidates on the Pareto front (reduction vs
               calibration perplexity) are each given a short probe: probe.steps steps of the fine-tune's own
               recipe (cqil.distill.make_trainer, recipe probe.recipe) on the training split, a fresh LoRA each
               time, then calibration perplexity again. The largest reduction whose probed perplexity is within
               max_ppl_ratio wins. probe.search=bisect probes the ~log2(front) points a binary search over the
               front needs (probed perplexity grows along the front, as it does before probing); `all` probes
               every front point.
     Equal reductions: the smaller P (fewer devices, smaller all-reduces), then the lower perplexity. With
     max_ideal_reduction, plans above that ideal reduction are not chosen (nor probed): with a loose max_ppl_ratio,
     the best plan at a given reduction (models compared at equal reduction).
     Every table is printed and stored (candidates: `table`; probes: `probe.table`).
Under torchrun (torch.distributed initialized with more than one rank) rank 0 alone chooses and broadcasts
the plan to the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from tqdm import tqdm

from . import CqilError, data
from .config import data_config, recipe_config, recipe_node, recipes
from .distill import make_trainer, unload_original
from .costs import mesh_choice, predicted_reduction
from .metrics import nll, perplexity
from .paths import conf_dir
from .modeling import CqilLayers, apply_plan, decoder, get_plan, plan_disabled
from .plan import Plan, PlanError, plan_from_config
from .results import plan_columns, provenance, read_csv, update_table


def plain(cfg) -> dict:
    """A config section as a plain dict (DictConfig, a cqil.config dataclass or dict): what the search reads."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def resolve_plan(plan_cfg, model, tokenizer=None, data_cfg=None) -> Plan:
    """The plan a job runs with: plan=manual / plan=file directly, plan=auto chosen from data (once, on rank 0,
    when torch.distributed runs several ranks: callers initialize the process group first)."""
    cfg = plain(plan_cfg)
    if cfg.get("mode") != "auto":
        return plan_from_config(cfg, model.config.num_hidden_layers)
    if tokenizer is None or data_cfg is None:
        raise PlanError("plan=auto needs the tokenizer and the data config (calibration text) to score candidates")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return choose_on_rank0(cfg, model, tokenizer, data_cfg)
    return choose_plan(cfg, model, tokenizer, data_cfg).plan


def choose_on_rank0(cfg: dict, model: nn.Module, tokenizer, data_cfg) -> Plan:
    """Rank 0 chooses (scores, probes, writes the tables and the plan file); the others receive its plan.

    The broadcast runs on a gloo group of its own whose timeout (plan.timeout_s) covers the whole choice: the
    job's own group may time out within a minute. If rank 0 fails, the others fail with its reason.
    """
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=float(cfg.get("timeout_s") or 7200)))
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = {"plan": choose_plan(cfg, model, tokenizer, data_cfg).plan.to_dict()}
        except Exception as e:  # noqa: BLE001 - any failure is passed on, then raised here
            box[0], failure = {"error": str(e) or type(e).__name__}, e
    dist.broadcast_object_list(box, group=group, group_src=0)
    dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if "error" in box[0]:
        raise CqilError(f"plan=auto failed on rank 0: {box[0]['error']}")
    return Plan.from_dict(box[0]["plan"], model.config.num_hidden_layers)


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


# ---- candidates --------------------------------------------------------------------------------
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


def single_groups(sim: np.ndarray, num_layers: int, size: int, min_similarity: float, keep_first: int,
                  keep_last: int) -> list[int]:
    """Start layers of every window of `size` layers within [keep_first, n - keep_last) that passes the filter."""
    if size < 2:
        raise PlanError(f"plan.group_sizes has {size}: every group size must be >= 2")
    last = num_layers - keep_last  # exclusive bound on a group's end
    return [s for s in range(keep_first, last - size + 1) if group_similarity(sim, s, size) >= min_similarity]


def greedy_sets(starts: list[int], cost: dict[int, float], size: int) -> list[list[int]]:
    """Nested sets of group starts: groups taken cheapest first (ties: the earlier start), skipping overlaps.

    Element k-1 is the set of k groups, sorted by start."""
    taken: list[int] = []
    sets = []
    for s in sorted(starts, key=lambda s: (cost[s], s)):
        if all(abs(s - t) >= size for t in taken):
            taken.append(s)
            sets.append(sorted(taken))
    return sets


def cheapest_spans(starts: list[int], cost: dict[int, float], size: int, per_count: int) -> list[list[int]]:
    """For each number of groups k >= 2: the `per_count` contiguous spans of k groups (all windows passing the
    filter) whose summed group costs are lowest (ties: the later span)."""
    ok = set(starts)
    out = []
    for k in range(2, len(starts) + 1):
        spans = [[s + i * size for i in range(k)] for s in sorted(ok)]
        spans = [g for g in spans if all(t in ok for t in g)]
        spans.sort(key=lambda g: (sum(cost[t] for t in g), -g[0]))
        out += spans[:per_count]
    return out


def plan_of_starts(starts: list[int], size: int, bypass: int, num_layers: int) -> Plan:
    return Plan(tuple(tuple(range(s, s + size)) for s in sorted(starts)), bypass).validate(num_layers)


def is_contiguous(plan: Plan) -> bool:
    return all(b[0] == a[-1] + 1 for a, b in zip(plan.groups, plan.groups[1:]))


def rank_key(cfg: dict, model: nn.Module, candidates: list[Plan], table: pd.DataFrame) -> tuple[str, str]:
    """The column candidates are ranked by (rank_by: ideal | latency) and its name in words.

    latency: the latency model's predicted reduction (cqil.latency roofline of the model's own shape on
    cfg.latency.hardware, at cfg.latency's phase, prompt_tokens and batch_size), added as predicted_reduction.
    Another ranking is one more branch here that adds its column to `table` (rows in candidate order).
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
        # beside it, against the original on one device (P devices, no TP): on small shapes TP itself can be slower
        # than one device, and a reduction against it alone would flatter the plan
        table["predicted_reduction_vs_one_device"] = [round(predicted_reduction(model.config, p, cfg["latency"]), 4)
                                                      for p in candidates]
        return "predicted_reduction", (f"predicted latency reduction against tensor parallelism on {lat['devices']} "
                                       f"devices ({lat['hardware']}, {lat['phase']} T={lat['prompt_tokens']} "
                                       f"B={lat['batch_size']})")
    table["predicted_reduction"] = [round(predicted_reduction(model.config, p, lat), 4) for p in candidates]
    return "predicted_reduction", (f"predicted latency reduction ({lat['hardware']}, {lat['phase']} "
                                   f"T={lat['prompt_tokens']} B={lat['batch_size']})")


def pareto_front(table: pd.DataFrame, key: str) -> pd.Series:
    """Rows no other row beats on both counts (a larger or equal `key` at a lower perplexity); at equal `key`
    only the lowest perplexity (then the smaller P) is on the front. Rows without a `key` (no mesh) are not."""
    on = pd.Series(False, index=table.index)
    best = math.inf
    for i, row in table[table[key].notna()].sort_values([key, "calibration_ppl", "group_size"], ascending=[False, True, True]).iterrows():
        if row.calibration_ppl < best:
            on[i], best = True, row.calibration_ppl
    return on


# ---- the recovery probe -----------------------------------------------------------------------
def load_recipe(name: str, overrides: list[str] = ()) -> dict:
    """The recovery recipe `name` as `cqil finetune recipe=<name>` composes it (conf/recipe/<name>.yaml with its
    hydra defaults, then key=value overrides such as train.lr=3e-3; cqil.config.recipe_node): {'recipe_name',
    'lora', 'loss', 'train'}, as cqil.distill reads it."""
    if name not in recipes():
        raise CqilError(f"unknown recipe {name!r} (plan.probe.recipe): no {conf_dir() / 'recipe' / name}.yaml; "
                        f"known: {', '.join(recipes())}")
    try:
        node = recipe_node(name, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise CqilError(f"bad plan.probe.overrides {list(overrides)}: {str(e).strip().splitlines()[0]}") from None
    return recipe_config(node).as_dict()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside: this process trains as if it were the only one. accelerate (under the HF Trainer) reads
    torchrun's environment as a request for DDP over every rank, which would wait for ranks that are not
    training: rank 0 probes alone while the others wait for its plan."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def probe(model: nn.Module, plan: Plan, recipe: dict, train_blocks: torch.Tensor, cal_blocks: torch.Tensor,
          steps: int, batch_size: int = 4) -> float:
    """Calibration perplexity of `model` under `plan` after `steps` steps of the recovery recipe.

    Every probe starts from the same weights with a fresh LoRA adapter (same seed): afterwards the adapter is
    unloaded (peft), and the model's plan, mode, trainability and activation checkpointing are as before.
    """
    was_plan, was_training = get_plan(model), model.training
    was_checkpointing = model.is_activation_checkpointing
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_plan(model, plan)
    on_gpu = next(model.parameters()).device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="cqil-probe-") as tmp, alone():
        trainer = make_trainer(model, plan, train_blocks, recipe, tmp, on_gpu, max_steps=steps)
        try:
            trainer.train()
            peft_model = trainer.model.eval()
            ppl = perplexity(peft_model, cal_blocks, batch_size, desc="probe perplexity")
        finally:
            unload_original(trainer.model)  # the modules of `model` are its own again, weights untouched
            del trainer
    if model.is_activation_checkpointing and not was_checkpointing:  # a recipe may switch it on (on GPUs)
        model.activation_checkpointing_disable()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
    apply_plan(model, was_plan)
    model.train(was_training)
    return ppl


def search_front(n: int, search: str, ok: Callable[[int], bool]) -> int:
    """Index of the winner among front points 0..n-1 sorted by rising reduction (-1: none passes).

    all: the largest passing index; bisect: binary search for the last passing point, assuming the points
    pass up to some index and fail after it (probing ~log2(n+1) of them)."""
    if search == "all":
        passed = [i for i in range(n) if ok(i)]
        return max(passed, default=-1)
    lo, hi = -1, n  # invariant: lo passes (or is -1), hi fails (or is n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


# ---- plan=auto ---------------------------------------------------------------------------------
@dataclass
class Choice:
    plan: Plan
    table: pd.DataFrame
    reason: str
    probes: pd.DataFrame | None = None


def score_candidates(cfg: dict, model: nn.Module, sim: np.ndarray, blocks: torch.Tensor) -> tuple[list[Plan], pd.DataFrame]:
    """Steps 1-2 of plan=auto: single groups, greedy sets and cheapest contiguous spans, each scored on `blocks`.

    Returns the candidates and their table (one row each, in the same order)."""
    n = model.config.num_hidden_layers
    bypass, bs = int(cfg.get("bypass") or 0), int(cfg.get("batch_size") or 4)
    sizes = [int(p) for p in cfg["group_sizes"]]
    windows = {p: single_groups(sim, n, p, float(cfg["min_similarity"]), int(cfg["keep_first"]), int(cfg["keep_last"]))
               for p in sizes}
    if not any(windows.values()):
        raise CqilError(f"no group of {sizes} layers keeps similarity >= plan.min_similarity={cfg['min_similarity']} "
                        f"between keep_first={cfg['keep_first']} and keep_last={cfg['keep_last']}; lower "
                        "plan.min_similarity or give a plan by hand")
    singles = [plan_of_starts([s], p, bypass, n) for p in sizes for s in windows[p]]
    start = time.perf_counter()
    ppl = plan_perplexities(model, blocks, [Plan()] + singles, bs, "plan=auto: single groups")
    original = ppl[0]
    measured = {plan: v for plan, v in zip(singles, ppl[1:])}
    cost = {p: {s: math.log(measured[plan_of_starts([s], p, bypass, n)] / original) for s in windows[p]} for p in sizes}

    greedy_step: dict[Plan, int] = {}
    combos: list[Plan] = []
    for p in sizes:
        for k, starts in enumerate(greedy_sets(windows[p], cost[p], p), 1):
            plan = plan_of_starts(starts, p, bypass, n)
            greedy_step[plan] = k
            combos.append(plan)
        combos += [plan_of_starts(g, p, bypass, n) for g in cheapest_spans(windows[p], cost[p], p,
                                                                            int(cfg["contiguous_per_size"]))]
    combos = [c for c in dict.fromkeys(combos) if c not in measured]
    if combos:
        measured.update(zip(combos, plan_perplexities(model, blocks, [Plan()] + combos, bs, "plan=auto: candidates")[1:]))
    seconds = time.perf_counter() - start

    candidates = list(measured)
    rows = []
    for plan in candidates:
        p = plan.group_size
        sims = [group_similarity(sim, g[0], p) for g in plan.groups]
        predicted = sum(cost[p][g[0]] for g in plan.groups)
        rows.append({"model": cfg.get("model") or model.config.name_or_path, "n_tokens": blocks.numel(),
                     **plan_columns(plan, n), "group_size": p, "n_groups": len(plan.groups),
                     "start": plan.groups[0][0], "end": plan.groups[-1][-1] + 1, "bypass": plan.bypass,
                     "contiguous": is_contiguous(plan), "greedy_step": greedy_step.get(plan),
                     "min_similarity": round(min(sims), 4), "mean_similarity": round(float(np.mean(sims)), 4),
                     "calibration_ppl": round(measured[plan], 3), "original_ppl": round(original, 3),
                     "ppl_ratio": round(measured[plan] / original, 4),
                     "log_ppl_increase": round(math.log(measured[plan] / original), 4),
                     "predicted_log_ppl_increase": round(predicted, 4),
                     "predicted_ppl_ratio": round(math.exp(predicted), 4), "score_seconds": round(seconds, 1)})
    table = pd.DataFrame(rows)
    table["greedy_step"] = table.greedy_step.astype("Int64")
    return candidates, table


def choose_plan(cfg: dict, model: nn.Module, tokenizer, data_cfg) -> Choice:
    """plan=auto: candidates scored on calibration text, chosen within the budget; see the module docstring."""
    budget_kind = cfg.get("budget") or "before"  # one of choices.BUDGETS, and probe.search of SEARCHES (cqil.checks)
    probe_cfg = cfg.get("probe") or {}
    n = model.config.num_hidden_layers
    dcfg = data_config(plain(data_cfg))
    sim = similarity_matrix(cfg["similarity_csv"], n)
    recipe = load_recipe(probe_cfg["recipe"], list(probe_cfg.get("overrides") or [])) \
        if budget_kind == "after_recovery" else None  # a bad recipe fails before minutes of scoring
    blocks = data.token_blocks(dcfg, tokenizer, "calibration", cfg["calibration_tokens"], what="plan.calibration_tokens")
    print(f"plan=auto: scoring single groups of {list(cfg['group_sizes'])} layers, then greedy group sets and "
          f"contiguous spans, on {blocks.numel()} calibration tokens of {dcfg.name}")
    candidates, table = score_candidates(cfg, model, sim, blocks)
    budget = float(cfg["max_ppl_ratio"])
    key, what = rank_key(cfg, model, candidates, table)
    table.insert(2, "data", f"{dcfg.name}/calibration")
    table["pareto"] = pareto_front(table, key)
    table["budget"], table["max_ppl_ratio"] = budget_kind, budget
    show_scores(table, key)
    prov = provenance(str(next(model.parameters()).device))

    probes = None
    if budget_kind == "before":
        table["within_budget"] = table.ppl_ratio <= budget
        metric, measured_as = "ppl_ratio", "calibration perplexity"
    else:
        # the scores so far, in case a probe fails (nothing chosen yet: the table's schema has the column)
        update_table("plan candidates", table.assign(chosen=False, **prov), cfg["table"])
        probes = run_probes(cfg, probe_cfg, recipe, model, tokenizer, dcfg, blocks, candidates, table, key)
        by_plan = probes.set_index("plan")
        table["probe_ppl"] = table.plan.map(by_plan.probe_ppl)
        table["probe_ratio"] = table.plan.map(by_plan.probe_ratio)
        table["within_budget"] = table.probe_ratio <= budget  # unprobed (NaN): False
        metric, measured_as = "probe_ratio", f"calibration perplexity after a {probe_cfg['steps']}-step recovery probe"
    ceiling = cfg.get("max_ideal_reduction")
    if ceiling is not None:  # the table rounds reductions to 4 decimals: 1/6 is 0.1667, within 0.16667 and 0.1667 alike
        table["within_budget"] &= table.ideal_latency_reduction <= float(ceiling) + 5e-5
        measured_as += f" and whose ideal reduction is at most {float(ceiling):.1%}"
    table["chosen"] = False
    ok = table[table.within_budget & table[key].notna()]  # NaN: the plan has no mesh on plan.devices
    original = table.original_ppl.iloc[0]
    if ok.empty:
        considered = table[table[metric].notna()]
        best = considered.loc[considered[metric].idxmin()]
        reason = (f"none of the {len(considered)} candidates keeps its {measured_as} within {budget} x the original "
                  f"({original:.2f}); the closest is {best.plan} at {best[metric]:.2f} x")
    else:
        pick = ok.sort_values([key, "group_size", metric], ascending=[False, True, True]).index[0]
        table.loc[pick, "chosen"] = True
        row = table.loc[pick]
        reason = (f"picked {row.plan}: the largest {what} ({row[key]:.1%}) among the {len(ok)} of "
                  f"{int(table[metric].notna().sum())} candidates whose {measured_as} stays within {budget} x the "
                  f"original's ({row[metric]:.2f} x of {original:.2f}; before recovery {row.ppl_ratio:.2f} x)")
        bolder = table[(table[key] > row[key]) & table[metric].notna()]
        if not bolder.empty:
            b = bolder.loc[bolder[metric].idxmin()]
            reason += (f"; every bolder one exceeds the budget (the best of them, {b.plan} at {b[key]:.1%}, "
                       f"{b[metric]:.2f} x)")
    if probes is not None:
        probes["chosen"] = probes.plan.isin(table[table.chosen].plan)
        update_table("plan probes", probes.assign(**prov), probe_cfg["table"])
    table = table.assign(**prov)
    update_table("plan candidates", table, cfg["table"])
    print(f"plan=auto: {reason}\n  candidate table -> {cfg['table']}"
          + (f"\n  probe table -> {probe_cfg['table']}" if probes is not None else ""))
    if ok.empty:
        raise CqilError(f"{reason}; raise plan.max_ppl_ratio or give a plan by hand (table: {cfg['table']})")
    plan = candidates[pick]  # table rows are in candidate order
    Path(cfg["out"]).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg["out"])
    print(f"  chosen plan -> {cfg['out']} (use it with plan=file)")
    return Choice(plan, table, reason, probes)


def run_probes(cfg: dict, probe_cfg: dict, recipe: dict, model: nn.Module, tokenizer, dcfg: data.DataConfig,
               cal_blocks: torch.Tensor, candidates: list[Plan], table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Probe the Pareto front (points at most probe.max_before_ratio x the original before recovery)."""
    steps = int(probe_cfg["steps"])
    train = recipe["train"]
    block = int(train["block_size"])
    n_blocks = steps * int(train["batch_size"]) * int(train["grad_accum"])
    train_blocks = data.token_blocks(dcfg, tokenizer, "training", n_blocks * block, block, "plan.probe.steps")
    front = table[table.pareto & (table.ppl_ratio <= float(probe_cfg["max_before_ratio"]))].sort_values(key)
    if cfg.get("max_ideal_reduction") is not None:  # a plan above the ceiling cannot be chosen: no probe for it
        front = front[front.ideal_latency_reduction <= float(cfg["max_ideal_reduction"]) + 5e-5]
    if front.empty:
        raise CqilError(f"no candidate on the Pareto front is within plan.probe.max_before_ratio="
                        f"{probe_cfg['max_before_ratio']} x the original before recovery; raise it (table: {cfg['table']})")
    original, budget = table.original_ppl.iloc[0], float(cfg["max_ppl_ratio"])
    search = probe_cfg.get("search", "bisect")
    print(f"plan=auto: recovery probes ({recipe.get('recipe_name', probe_cfg['recipe'])} recipe, {steps} steps of "
          f"{int(train['batch_size']) * int(train['grad_accum'])} x {block} training tokens each) on the Pareto front "
          f"({len(front)} candidates, search={search})")
    rows = []

    def ok(i: int) -> bool:
        row = front.iloc[i]
        start = time.perf_counter()
        ppl = probe(model, candidates[row.name], recipe, train_blocks, cal_blocks, steps, int(cfg.get("batch_size") or 4))
        rows.append({"model": row.model, "data": row.data, "n_tokens": row.n_tokens, "plan": row.plan,
                     "plan_json": row.plan_json, "ideal_latency_reduction": row.ideal_latency_reduction,
                     **({key: row[key]} if key != "ideal_latency_reduction" else {}),
                     "group_size": row.group_size, "n_groups": row.n_groups, "start": row.start,
                     "contiguous": row.contiguous,
                     "greedy_step": row.greedy_step, "recipe": recipe.get("recipe_name", probe_cfg["recipe"]),
                     "steps": steps, "train_tokens": n_blocks * block, "original_ppl": original,
                     "calibration_ppl": row.calibration_ppl, "ppl_ratio": row.ppl_ratio, "probe_ppl": round(ppl, 3),
                     "probe_ratio": round(ppl / original, 4), "within_budget": ppl / original <= budget,
                     "max_ppl_ratio": budget, "seconds": round(time.perf_counter() - start, 1)})
        print(f"  probe {row.plan} ({row[key]:.1%}): {row.ppl_ratio:.3f} x before -> {ppl / original:.3f} x after "
              f"{steps} steps ({rows[-1]['seconds']} s){'' if ppl / original <= budget else '  over budget'}")
        return ppl / original <= budget

    search_front(len(front), search, ok)
    return pd.DataFrame(rows).sort_values("ideal_latency_reduction", ignore_index=True)


def show_scores(table: pd.DataFrame, key: str) -> None:
    """Print the check that costs add up (greedy sets vs the best contiguous span of as many groups) and the front."""
    multi = table[table.n_groups > 1]
    lines = []
    for (p, k), g in multi.groupby(["group_size", "n_groups"]):
        greedy, spans = g[g.greedy_step.notna()], g[g.contiguous]
        best = spans.loc[spans.calibration_ppl.idxmin()] if not spans.empty else None
        lines.append({"P": p, "groups": k, "ideal": f"{g.ideal_latency_reduction.iloc[0]:.1%}",
                      "greedy set": greedy.plan.iloc[0] if not greedy.empty else "-",
                      "greedy x": greedy.ppl_ratio.iloc[0] if not greedy.empty else np.nan,
                      "predicted x": greedy.predicted_ppl_ratio.iloc[0] if not greedy.empty else np.nan,
                      "best span": best.plan if best is not None else "-",
                      "span x": best.ppl_ratio if best is not None else np.nan,
                      "span predicted x": best.predicted_ppl_ratio if best is not None else np.nan})
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 80):
        if lines:
            print("calibration perplexity / original: greedy group set vs best contiguous span of as many groups "
                  "(measured, and predicted from the single groups' costs)")
            print(pd.DataFrame(lines).to_string(index=False))
        front = table[table.pareto].sort_values(key)
        print("Pareto front (reduction vs calibration perplexity):")
        print(front[["plan", key, "ppl_ratio", "predicted_ppl_ratio"]].to_string(index=False))


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
