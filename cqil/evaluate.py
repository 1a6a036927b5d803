"""Quality of a model: perplexity on held-out token blocks, and lm-eval accuracy (`cqil eval`).

`cqil eval` compares several models (original, converted, fine-tuned, any checkpoint) on one task
list through one config (conf/eval.yaml). Tasks are:

- local lm-eval tasks, kept as lm-eval YAML configs in cqil/tasks/ (e.g. `cqil_polarity`, the Pang-Lee
  movie-review sentences as two-way multiple choice). Their data files are built from the offline
  texts at run time under $CQIL_CACHE/eval/data, and the YAMLs are copied with absolute paths to
  $CQIL_CACHE/eval/tasks (so plain `lm_eval --include_path` can use them too);
- `perplexity`: token perplexity on the held-out (evaluation) split of `data` (cqil.data), the same
  measure `cqil sweep` and `cqil finetune` report;
- any lm-eval task or group by name (sciq, winogrande, arc_easy, mmlu, ...): needs the Hugging Face
  hub for its data set (or a local HF cache and HF_HUB_OFFLINE=1).

Every model is evaluated in memory through `HFLM(pretrained=model, tokenizer=tokenizer)`, so the
plan applied by cqil is what lm-eval measures. One CSV row per model x task x metric.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import AutoConfig

from . import CqilError, data, models
from .modeling import apply_plan, get_plan
from .plan import plan_from_config
from .results import provenance, read_csv, write_csv

TASK_DIR = Path(__file__).resolve().parent / "tasks"  # lm-eval YAML configs of the local tasks
PERPLEXITY = "perplexity"                               # the built-in held-out perplexity task
ENTRY_KEYS = {"label", "path", "plan", "skip_missing"}   # keys of one `models` entry


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over blocks [n, T], each block scored on its own (T-1 targets each)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


# ---- local task data: real labelled text -> jsonl ---------------------------------------
def _write_jsonl(rows: list[dict], out: Path) -> Path:
    """Write rows atomically (temp file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out


def polarity_jsonl(source: Path, out: Path) -> Path:
    """Pang-Lee lines `__label__neg|pos <sentence>` -> jsonl rows {"sentence", "label": 0 neg / 1 pos}."""
    if not source.is_file():
        raise CqilError(f"{source} does not exist; run `make install` to assemble the offline texts")
    labels = {"__label__neg": 0, "__label__pos": 1}
    rows = []
    for i, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, sentence = line.strip().partition(" ")
        if tag not in labels or not sentence.strip():
            raise CqilError(f"{source}:{i}: expected `__label__neg <sentence>` or `__label__pos <sentence>`, "
                            f"got {line[:60]!r}")
        rows.append({"sentence": sentence.strip(), "label": labels[tag]})
    random.Random(0).shuffle(rows)  # the source is sorted by label: `limit` must still see both labels
    return _write_jsonl(rows, out)


# data file named in a local task YAML -> function(out path) that builds it from the offline texts
DATA_BUILDERS = {
    "pang_lee_polarity.jsonl": lambda out: polarity_jsonl(models.cache_dir() / "texts" / "pang_lee_polarity.txt", out),
}


def prepare_local_tasks(work_dir: Path, task_dir: Path = TASK_DIR) -> dict[str, Path]:
    """Build the data of every local task and write its YAML with absolute data paths.

    Returns {task name: resolved YAML path}; the YAMLs lie in work_dir/tasks (an lm-eval include_path).
    """
    out = {}
    for src in sorted(task_dir.glob("*.yaml")):
        config = yaml.safe_load(src.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            if Path(name).is_absolute():
                continue
            if name not in DATA_BUILDERS:
                raise CqilError(f"{src}: data file {name!r} has no builder in cqil.evaluate.DATA_BUILDERS; "
                                "give an absolute path or add a builder")
            files[split] = str(DATA_BUILDERS[name](work_dir / "data" / name))
        dst = work_dir / "tasks" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_text(f"# generated by cqil eval from {src}\n" + yaml.safe_dump(config, sort_keys=False))
        tmp.replace(dst)
        out[config["task"]] = dst
    return out


# ---- which tasks: names, suites, local vs hub ---------------------------------------------
def expand_tasks(names: list[str], suites: dict[str, list[str]]) -> list[str]:
    """Task names with suite names (e.g. `local`, `paper`) replaced by their tasks, in order, once each."""
    out: list[str] = []
    for name in names:
        for task in suites.get(name, [name]):
            if task not in out:
                out.append(task)
    if not out:
        raise CqilError("no tasks to run; give tasks=[...] (task names or suites: " + ", ".join(suites) + ")")
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hugging Face hub? (fast check, no retries)"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def task_manager(tasks: list[str], local: dict[str, Path], include_path: list[str]):
    """An lm-eval TaskManager that knows every task in `tasks`, or one clear error line.

    Local tasks (cqil's and the user's include_path directories) are indexed first; lm-eval's own
    task index (~10 s to build) is loaded only when a task is not local, and such a task's data set
    is fetched here, before any model is loaded, so an offline machine fails at once.
    """
    from lm_eval.tasks import TaskManager

    dirs = [Path(p).expanduser() for p in include_path]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise CqilError(f"include_path director{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)} "
                        "not found; give directories of lm-eval task YAMLs")
    paths = sorted({str(p.parent) for p in local.values()}) + [str(d) for d in dirs]
    tm = TaskManager(include_path=paths, include_defaults=False)
    offline_names = set(tm.all_tasks)
    remote = [t for t in tasks if t != PERPLEXITY and t not in offline_names and not Path(t).is_file()]
    if not remote:
        return tm
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    tm = TaskManager(include_path=paths)
    unknown = [t for t in remote if t not in set(tm.all_tasks)]
    if unknown:
        raise CqilError(f"unknown task(s) {', '.join(unknown)}; local tasks: {', '.join(sorted(offline_names))}, "
                        f"{PERPLEXITY}; or an lm-eval task/group name (sciq, winogrande, arc_easy, mmlu, "
                        "hellaswag, piqa, gsm8k, ...)")
    if not offline_env and not hub_reachable():
        raise CqilError(f"task(s) {', '.join(remote)} download their data sets from the Hugging Face hub, which is "
                        f"unreachable from here; offline, use the local tasks ({', '.join(sorted(offline_names))}, "
                        f"{PERPLEXITY}), or set HF_HUB_OFFLINE=1 if the data sets are in your HF cache")
    try:
        tm.load(remote)  # fetch (or find cached) data sets now, not after the first model has run
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ...: lm-eval lets many kinds through
        first = (str(e).strip().splitlines() or [""])[0]
        raise CqilError(f"cannot load task(s) {', '.join(remote)}: {type(e).__name__}: {first}") from None
    return tm


# ---- lm-eval results -> rows -------------------------------------------------------------
def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # lm-eval writes "N/A" for a stderr it could not compute


def _n_samples(results: dict, name: str) -> int:
    """Documents scored for a task, or summed over a group's subtasks."""
    if name in results.get("n-samples", {}):
        return int(results["n-samples"][name]["effective"])
    return sum(_n_samples(results, sub) for sub in results.get("group_subtasks", {}).get(name, []))


def _dataset(results: dict, name: str) -> str:
    config = results.get("configs", {}).get(name, {})
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict) and files:
        return ",".join(Path(f).stem for f in files.values())
    return config.get("dataset_path") or ("group" if name in results.get("group_subtasks", {}) else "")


def metric_rows(results: dict, name: str, num_fewshot: int | None = None) -> list[dict]:
    """One row per metric (and filter) of task or group `name` in a simple_evaluate result."""
    scores = results["results"][name]
    rows = []
    for key, value in scores.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        rows.append({"task": name, "dataset": _dataset(results, name), "metric": metric, "filter": filt,
                     "value": _number(value), "stderr": _number(scores.get(f"{metric}_stderr,{filt}")),
                     "n": _n_samples(results, name),
                     "num_fewshot": results.get("n-shot", {}).get(name, num_fewshot)})
    return rows


def lm_eval_task(lm, tm, task: str, num_fewshot: int | None, limit, cfg: DictConfig) -> list[dict]:
    """Run one lm-eval task (or group) on an HFLM; rows of its metrics."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=[task], task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                              log_samples=False, bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed,
                              numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    names = [task] if task in results["results"] else list(results["results"])  # a tag expands to its tasks
    return [row for name in names for row in metric_rows(results, name, num_fewshot)]


# ---- models ------------------------------------------------------------------------------
def model_entries(cfg: DictConfig) -> list[dict]:
    """The `models` list, checked: label (unique), path (default model.path), plan, skip_missing."""
    entries = OmegaConf.to_container(cfg.models, resolve=True)
    if not entries:
        raise CqilError("models=[] names no model; give at least one entry {label: ..., path: ...}")
    out, seen = [], set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"label": Path(e).name, "path": e}
        if not isinstance(e, dict) or not e.get("label"):
            raise CqilError(f"models[{i}] needs a label, e.g. {{label: converted, path: smollm2-135m, plan: {{...}}}}")
        extra = set(e) - ENTRY_KEYS
        if extra:
            raise CqilError(f"models[{i}] ({e['label']}) has unknown key(s) {', '.join(sorted(extra))}; "
                            f"allowed: {', '.join(sorted(ENTRY_KEYS))}")
        if e["label"] in seen:
            raise CqilError(f"two models are labelled {e['label']!r}; labels must be unique")
        seen.add(e["label"])
        out.append({"path": cfg.model.path, "plan": None, "skip_missing": False, **e})
    return out


def check_entries(entries: list[dict]) -> list[dict]:
    """The entries to evaluate, checked before any model runs: paths exist, given plans fit the model.

    A missing local path is skipped (with a message) when the entry says skip_missing, else an error;
    a manual or file plan is validated against the model's layer count (read from its config only).
    """
    out = []
    for e in entries:
        path = e["path"]
        local_missing = path not in models.BUNDLED and not Path(path).expanduser().exists()
        if local_missing and e["skip_missing"]:
            print(f"[{e['label']}] skipped: {path} does not exist yet (run the job that writes it; "
                  "without skip_missing: true this is an error)")
            continue
        if local_missing:
            models.resolve(path)  # a missing local path fails here with one line; a hub id passes
        if e["plan"] is not None and e["plan"].get("mode") != "auto" and not local_missing:
            location, extra = models.resolve(path)
            n_layers = AutoConfig.from_pretrained(location, trust_remote_code=True, **extra).num_hidden_layers
            plan_from_config(e["plan"], n_layers)
        out.append(e)
    if not out:
        raise CqilError("every model entry was skipped; nothing to evaluate (check models=[...])")
    return out


def load_entry(entry: dict, cfg: DictConfig, data_cfg: data.DataConfig):
    """(model, tokenizer) of one entry: loaded as saved, then its plan applied if it names one."""
    from .convert import resolve_plan  # here, not at the top: cqil.convert imports perplexity from this module

    model, tokenizer = models.load({"name": entry["label"], "path": entry["path"],
                                    "dtype": cfg.model.dtype, "device": cfg.model.device})
    if entry["plan"] is not None:
        apply_plan(model, resolve_plan(entry["plan"], model, tokenizer, data_cfg))
    return model, tokenizer


def evaluate_model(entry: dict, tasks: list[str], tm, cfg: DictConfig, data_cfg: data.DataConfig) -> list[dict]:
    """Rows of every task for one model entry."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_entry(entry, cfg, data_cfg)
    plan = get_plan(model)
    n_layers = model.config.num_hidden_layers
    head = {"label": entry["label"], "path": entry["path"], "plan": plan.describe(),
            "ideal_latency_reduction": round(plan.ideal_latency_reduction(n_layers), 4)}
    print(f"[{entry['label']}] {entry['path']} ({plan.describe()}, ideal latency reduction "
          f"{head['ideal_latency_reduction']:.1%})")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    fewshot = OmegaConf.to_container(cfg.num_fewshot) if cfg.num_fewshot else {}
    rows = []
    for task in tasks:
        start = time.perf_counter()
        if task == PERPLEXITY:
            blocks = data.token_blocks(data_cfg, tokenizer, "evaluation", cfg.perplexity_tokens)
            ppl = perplexity(model, blocks, cfg.perplexity_batch_size, desc=f"{entry['label']} perplexity")
            task_rows = [{"task": PERPLEXITY, "dataset": f"{data_cfg.name}/evaluation", "metric": "perplexity",
                          "filter": "none", "value": ppl, "stderr": float("nan"), "n": blocks[:, 1:].numel(),
                          "num_fewshot": 0}]
        else:
            task_rows = lm_eval_task(lm, tm, task, fewshot.get(task), cfg.limit, cfg)
        seconds = time.perf_counter() - start
        rows += [{**head, **r, "limit": cfg.limit, "seconds": round(seconds, 2)} for r in task_rows]
        print(f"[{entry['label']}] {task}: " + ", ".join(f"{r['metric']}={r['value']:.4g}" for r in task_rows)
              + f" ({seconds:.1f} s)")
    return rows


def table(df: pd.DataFrame) -> str:
    """Human summary: one line per task/metric, one column per model, `value ± stderr`."""
    cell = df.apply(lambda r: f"{r.value:.4g}" + (f" ± {r.stderr:.3f}" if r.stderr == r.stderr else ""), axis=1)
    wide = df.assign(cell=cell).pivot_table(index=["task", "metric", "filter"], columns="label", values="cell",
                                            aggfunc="first", sort=False)
    return wide[[c for c in dict.fromkeys(df.label) if c in wide.columns]].to_string()


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Keep earlier rows of (label, task) pairs that this run did not evaluate; replace the others."""
    done = set(zip(new.label, new.task))
    keep = old[[(lbl, t) not in done for lbl, t in zip(old.label, old.task)]]
    return pd.concat([keep, new], ignore_index=True) if len(keep) else new


def run(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str": intended
    data_cfg = data.DataConfig(**OmegaConf.to_object(cfg.data))
    tasks = expand_tasks(list(cfg.tasks), OmegaConf.to_container(cfg.suites))
    entries = check_entries(model_entries(cfg))
    work_dir = Path(cfg.work_dir).expanduser() if cfg.work_dir else models.cache_dir() / "eval"
    local = prepare_local_tasks(work_dir)
    tm = task_manager(tasks, local, list(cfg.include_path)) if set(tasks) - {PERPLEXITY} else None
    version = importlib.metadata.version("lm_eval")
    rows = [row for entry in entries for row in evaluate_model(entry, tasks, tm, cfg, data_cfg)]
    df = pd.DataFrame(rows).assign(model=cfg.model.name, lm_eval=version, **provenance(cfg.model.device))
    df = df[["model", *[c for c in df.columns if c != "model"]]]
    if cfg.merge and Path(cfg.out).is_file():
        df = merge(read_csv(cfg.out), df)
    write_csv(df, cfg.out)
    print(table(df))
    print(f"-> {cfg.out}  (figure: cqil plot figures=[accuracy])")
