"""Quality of a model: lm-eval tasks, held-out perplexity, and agreement with the original (`cqil eval`).

`cqil eval` compares several models (original, converted, fine-tuned, any checkpoint) on one task
list through one config (conf/eval.yaml). Tasks are:

- local lm-eval tasks, kept as lm-eval YAML configs in cqil/tasks/: `cqil_polarity` (Pang-Lee
  movie-review sentences, two-way multiple choice), and two generation tasks (`generate_until`, exact
  match), because multiple-choice scores hide damage that generation shows: `cqil_cloze` (the last
  word of sentences of the evaluation split of the offline texts) and `cqil_arithmetic` (few-shot two-
  and three-digit addition). Their data files are built deterministically at run time by DATA_BUILDERS
  (parameters in each YAML's `metadata.build`) under $CQIL_CACHE/eval/data, and the YAMLs are copied
  with absolute paths to $CQIL_CACHE/eval/tasks (so plain `lm_eval --include_path` can use them too);
- text tasks, run on the evaluation split of every corpus in `texts` (data configs):
  `perplexity` (cqil.metrics: the same windows and definition that convert, sweep and finetune report)
  and `agreement` with the `reference` model (teacher-forced top-1 agreement and KL(reference || model);
  greedy continuations: fraction of matching tokens, first divergence);
- any lm-eval task or group by name (sciq, winogrande, arc_easy, mmlu, gsm8k, ...): needs the Hugging
  Face hub for its data set (or a local HF cache and HF_HUB_OFFLINE=1).

Every model is evaluated in memory through `HFLM(pretrained=model, tokenizer=tokenizer)`, so the
plan applied by cqil is what lm-eval measures. The reference is evaluated first; only its outputs
(logits of the agreement windows, greedy tokens) are kept for the others, not the model itself.
One CSV row per model x task x metric (x corpus for the text tasks).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from . import CqilError, data, inputs, models
from .config import data_by_name, data_config, model_config
from .metrics import all_logits, greedy_agreement, greedy_tokens, perplexity, teacher_forced_agreement
from .modeling import apply_plan, get_plan
from .paths import cache_dir
from .planning import resolve_plan
from .outputs import write_text
from .results import plan_columns, provenance, update_table

TASK_DIR = Path(__file__).resolve().parent / "tasks"  # lm-eval YAML configs of the local tasks
PERPLEXITY = "perplexity"                               # built-in text task: held-out perplexity
AGREEMENT = "agreement"                                 # built-in text task: agreement with the reference
TEXT_TASKS = (PERPLEXITY, AGREEMENT)                    # run once per corpus of `texts`


# ---- local task data: real labelled text -> jsonl ---------------------------------------
def _write_jsonl(rows: list[dict], out: Path) -> Path:
    """Write rows atomically (cqil.outputs.write_text)."""
    return write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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


# Function words are never cloze targets: the cloze asks for content words, which carry the passage.
STOPWORDS = frozenset("""
about above after again against also although among another anything around away because been before being
below between both cannot could does doing done down during each either else enough even ever every from
have having hence here hers herself himself into itself just less many might mine more most much must myself
neither never none nothing once only other ours ourselves over perhaps quite rather same shall should since
some something still such than that their theirs them themselves then there these they thing this those
though through thus till together under unless until upon very were what whatever when where whether which
while whom whose will with within without would your yours yourself
""".split())
SENTENCE_END = re.compile(r"([A-Za-z]+)[.!?][\"')\]]*")  # a whitespace-delimited word that ends a sentence


def split_texts(data_cfg: data.DataConfig, tokenizer, split: str) -> list[tuple[str, str]]:
    """(document name, text) of one split of every document: exactly the tokens cqil.data assigns to it, decoded."""
    out = []
    for name, text in data.documents(data_cfg):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        part = data.split_ranges(len(ids), data_cfg)[split]
        out.append((name, tokenizer.decode(ids[part.start:part.stop])))
    return out


def cloze_items(text: str, context_words: int, min_length: int) -> list[dict]:
    """Every last word of a sentence in `text` that is a content word (alphabetic, >= min_length letters, not
    in STOPWORDS) preceded by a space and by context_words words (not counting the first word of `text`, which
    may be cut): {"context": the text of those words, ending just before the target, "target": the word}."""
    words = list(re.finditer(r"\S+", text))
    items = []
    for i in range(context_words + 1, len(words)):
        w = words[i]
        m = SENTENCE_END.fullmatch(w.group())
        if not m or len(m.group(1)) < min_length or m.group(1).lower() in STOPWORDS or text[w.start() - 1] != " ":
            continue
        items.append({"context": text[words[i - context_words].start():w.start() - 1], "target": m.group(1)})
    return items


def even_quotas(sizes: list[int], total: int) -> list[int]:
    """`total` split over bins as evenly as possible, no bin above its size (smaller bins leave their rest to others)."""
    quotas, left = [0] * len(sizes), total
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for k, i in enumerate(order):
        quotas[i] = min(sizes[i], left // (len(order) - k))
        left -= quotas[i]
    return quotas


def cloze_jsonl(out: Path, source: str, items: int, context_words: int, min_length: int, split_tokenizer: str) -> Path:
    """Last-word cloze from the evaluation split of data config `source` (split as cqil.data cuts it with the
    tokenizer of the bundled model `split_tokenizer`, so no target lies in training text): `items` targets shared
    evenly among the documents, evenly spaced within each, documents taking turns. Deterministic."""
    tokenizer = models.load_tokenizer(split_tokenizer)
    found = [cloze_items(text, context_words, min_length)
             for _, text in split_texts(data_by_name(source), tokenizer, "evaluation")]
    if sum(map(len, found)) < items:
        raise CqilError(f"the evaluation split of {source!r} has only {sum(map(len, found))} cloze targets, {items} "
                        "asked; lower metadata.build items in cqil/tasks/cqil_cloze.yaml or use more text")
    per_doc = [[doc[k] for k in np.linspace(0, len(doc) - 1, q).round().astype(int)] if q else []
               for doc, q in zip(found, even_quotas(list(map(len, found)), items))]
    rows = [doc[k] for k in range(max(map(len, per_doc))) for doc in per_doc if k < len(doc)]
    return _write_jsonl(rows, out)


def arithmetic_jsonl(out: Path, part: str, digits: list[int], questions: int, shots: int, seed: int) -> Path:
    """Addition questions {"a", "b", "answer"} (cqil.data.addition_problems): part="shots" the few-shot examples,
    part="test" the questions."""
    if part not in ("shots", "test"):
        raise CqilError(f"arithmetic part {part!r}: use shots or test")
    examples, test = data.addition_problems(digits, questions, shots, seed)
    return _write_jsonl(examples if part == "shots" else test, out)


# data file named in a local task YAML -> function(out path, **the YAML's metadata.build[file]) that builds it
DATA_BUILDERS = {
    "pang_lee_polarity.jsonl": lambda out: polarity_jsonl(cache_dir() / "texts" / "pang_lee_polarity.txt", out),
    "cqil_cloze.jsonl": cloze_jsonl,
    "cqil_arithmetic_shots.jsonl": lambda out, **kw: arithmetic_jsonl(out, "shots", **kw),
    "cqil_arithmetic_test.jsonl": lambda out, **kw: arithmetic_jsonl(out, "test", **kw),
}


def prepare_local_tasks(work_dir: Path, task_dir: Path = TASK_DIR) -> dict[str, Path]:
    """Build the data of every local task and write its YAML with absolute data paths.

    Returns {task name: resolved YAML path}; the YAMLs lie in work_dir/tasks (an lm-eval include_path).
    A builder gets the keyword arguments given for its file in the YAML's `metadata.build`.
    """
    out = {}
    for src in sorted(task_dir.glob("*.yaml")):
        config = yaml.safe_load(src.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        build = (config.get("metadata") or {}).get("build", {})
        for split, name in files.items():
            if Path(name).is_absolute():
                continue
            if name not in DATA_BUILDERS:
                raise CqilError(f"{src}: data file {name!r} has no builder in cqil.evaluate.DATA_BUILDERS; "
                                "give an absolute path or add a builder")
            files[split] = str(DATA_BUILDERS[name](work_dir / "data" / name, **build.get(name, {})))
        dst = work_dir / "tasks" / src.name
        write_text(dst, f"# generated by cqil eval from {src}\n" + yaml.safe_dump(config, sort_keys=False))
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
    remote = [t for t in tasks if t not in TEXT_TASKS and t not in offline_names and not Path(t).is_file()]
    if not remote:
        return tm
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    tm = TaskManager(include_path=paths)
    unknown = [t for t in remote if t not in set(tm.all_tasks)]
    if unknown:
        raise CqilError(f"unknown task(s) {', '.join(unknown)}; local tasks: {', '.join(sorted(offline_names))}, "
                        f"{', '.join(TEXT_TASKS)}; or an lm-eval task/group name (sciq, winogrande, arc_easy, mmlu, "
                        "hellaswag, piqa, gsm8k, ...)")
    if not offline_env and not hub_reachable():
        raise CqilError(f"task(s) {', '.join(remote)} download their data sets from the Hugging Face hub, which is "
                        f"unreachable from here; offline, use the local tasks ({', '.join(sorted(offline_names))}, "
                        f"{', '.join(TEXT_TASKS)}), or set HF_HUB_OFFLINE=1 if the data sets are in your HF cache")
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
    if isinstance(files, dict) and files:  # the scored split's file (few-shot examples may come from another)
        scored = [files[config["test_split"]]] if config.get("test_split") in files else files.values()
        return ",".join(Path(f).stem for f in scored)
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


# ---- text tasks: held-out corpora, perplexity, agreement with the reference ---------------
def text_corpora(cfg: DictConfig) -> list[data.DataConfig]:
    """The held-out corpora of the text tasks, from `texts`: data config names (the name of the composed `data`
    group means that group, with its overrides) or inline data configs {name, files, ...}."""
    out = []
    for i, t in enumerate(OmegaConf.to_container(cfg.texts, resolve=True) or []):
        if isinstance(t, dict):
            try:
                out.append(data_config(t, f"texts[{i}]"))
            except CqilError as e:
                raise CqilError(f"texts[{i}] is not a data config ({e}); give a data config name or "
                                "{name: ..., files: [...]}") from None
        else:
            out.append(data_config(cfg.data) if t == cfg.data.name else data_by_name(str(t)))
    names = [c.name for c in out]
    if len(set(names)) < len(names):
        raise CqilError(f"texts names a corpus twice ({', '.join(names)}); each corpus once")
    return out


def check_agreement(cfg: DictConfig, entries: list[dict], tasks: list[str]) -> str | None:
    """The reference label when the agreement task runs (checked: a models[] label; the sizes in agreement.* are
    checked with every value, cqil.checks), else None."""
    if AGREEMENT not in tasks:
        return None
    labels = [e["label"] for e in entries]
    if cfg.reference not in labels:
        raise CqilError(f"reference={cfg.reference!r} is not a model label ({', '.join(labels)}); the agreement task "
                        "compares every model with the entry named by `reference`")
    return cfg.reference


@dataclass
class ReferenceOutputs:
    """What the agreement task keeps of the reference model for one corpus (the model itself is released)."""
    windows: torch.Tensor  # [n, block_size] held-out token ids (teacher-forced)
    logits: torch.Tensor   # [n, block_size, vocab] the reference's logits on them
    prompts: torch.Tensor  # [N, prompt_tokens] held-out prompts
    tokens: torch.Tensor   # [N, new_tokens] the reference's greedy continuations
    vocab: dict            # the reference tokenizer's vocabulary: every model must share it


def reference_outputs(model, tokenizer, corpus: data.DataConfig, a: DictConfig) -> ReferenceOutputs:
    """The reference's teacher-forced logits and greedy continuations on the evaluation split of `corpus`.

    Windows: the first `a.tokens` tokens in data.block_size windows (null: all); prompts: the first `a.prompts`
    blocks of `a.prompt_tokens` tokens; both round-robin over the corpus's documents (cqil.data.token_blocks).
    """
    windows = data.token_blocks(corpus, tokenizer, "evaluation", a.tokens, what="agreement.tokens")
    prompts = data.token_blocks(corpus, tokenizer, "evaluation", a.prompts * a.prompt_tokens,
                                block_size=a.prompt_tokens, what="agreement.prompts x agreement.prompt_tokens")
    return ReferenceOutputs(windows, all_logits(model, windows, a.batch_size, desc=f"reference logits {corpus.name}"),
                            prompts, greedy_tokens(model, prompts, a.new_tokens, a.generate_batch_size),
                            tokenizer.get_vocab())


def agreement_rows(model, tokenizer, ref: ReferenceOutputs, a: DictConfig, label: str, reference: str) -> list[dict]:
    """Rows of top1_agreement, kl (teacher-forced), match_fraction and first_divergence (greedy) against ref."""
    if tokenizer.get_vocab() != ref.vocab:
        raise CqilError(f"{label!r} has another tokenizer than the reference {reference!r}; agreement compares "
                        "token by token, so both need the same vocabulary")
    tf = teacher_forced_agreement(ref.logits, model, ref.windows, a.batch_size, desc=f"{label} agreement")
    greedy = greedy_agreement(ref.tokens, greedy_tokens(model, ref.prompts, a.new_tokens, a.generate_batch_size))
    per_position = {"n": tf["positions"], "num_fewshot": 0}
    per_prompt = {"n": greedy["prompts"], "num_fewshot": 0}
    return [{"metric": "top1_agreement", "value": tf["top1_agreement"], "stderr": tf["top1_agreement_stderr"], **per_position},
            {"metric": "kl", "value": tf["kl"], "stderr": tf["kl_stderr"], **per_position},
            {"metric": "match_fraction", "value": greedy["match_fraction"], "stderr": greedy["match_fraction_stderr"],
             **per_prompt},
            {"metric": "first_divergence", "value": greedy["first_divergence"], "stderr": float("nan"), **per_prompt}]


# ---- models ------------------------------------------------------------------------------
def model_entries(cfg: DictConfig) -> list[dict]:
    """The `models` list as entries with every key (cqil.inputs.model_entries, the reading cqil.checks checked)."""
    return inputs.model_entries(OmegaConf.to_container(cfg.models, resolve=True), cfg.model.path)


def present(entries: list[dict]) -> list[dict]:
    """The entries to evaluate: those whose path exists, or that do not say skip_missing (cqil.checks.EvalModels
    checked every path and plan of these before any work); a skipped one is said."""
    out = []
    for e in entries:
        if e["skip_missing"] and e["path"] not in models.BUNDLED and not Path(e["path"]).expanduser().exists():
            print(f"[{e['label']}] skipped: {e['path']} does not exist yet (run the job that writes it; "
                  "without skip_missing: true this is an error)")
            continue
        out.append(e)
    if not out:
        raise CqilError("every model entry was skipped; nothing to evaluate (check models=[...])")
    return out


def load_entry(entry: dict, cfg: DictConfig, data_cfg: data.DataConfig):
    """(model, tokenizer) of one entry: loaded as saved, then its plan applied if it names one."""
    model, tokenizer = models.load(dataclasses.replace(model_config(cfg.model), name=entry["label"], path=entry["path"]))
    if entry["plan"] is not None:
        apply_plan(model, resolve_plan(entry["plan"], model, tokenizer, data_cfg))
    return model, tokenizer


def text_task_rows(task: str, model, tokenizer, corpus: data.DataConfig, cfg: DictConfig, label: str,
                   refs: dict[str, ReferenceOutputs]) -> list[dict]:
    """Rows of a text task (perplexity or agreement) on the evaluation split of one corpus."""
    common = {"task": task, "dataset": f"{corpus.name}/evaluation", "filter": "none"}
    if task == PERPLEXITY:
        blocks = data.token_blocks(corpus, tokenizer, "evaluation", cfg.perplexity_tokens, what="perplexity_tokens")
        ppl = perplexity(model, blocks, cfg.perplexity_batch_size, desc=f"{label} perplexity {corpus.name}")
        return [{**common, "metric": "perplexity", "value": ppl, "stderr": float("nan"), "n": blocks[:, 1:].numel(),
                 "num_fewshot": 0}]
    if cfg.reference == label:
        # The first model evaluated: what every model is compared with. It gets no rows of its own: against
        # itself they are 1 / 0 / 1 / M by construction (tests/test_evaluate.py checks that) and cost a second pass.
        refs[corpus.name] = reference_outputs(model, tokenizer, corpus, cfg.agreement)
        return []
    return [{**common, "reference": cfg.reference, **r}
            for r in agreement_rows(model, tokenizer, refs[corpus.name], cfg.agreement, label, cfg.reference)]


def evaluate_model(entry: dict, tasks: list[str], tm, cfg: DictConfig, data_cfg: data.DataConfig,
                   corpora: list[data.DataConfig], refs: dict[str, ReferenceOutputs]) -> list[dict]:
    """Rows of every task for one model entry (text tasks once per corpus); the reference fills `refs`."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_entry(entry, cfg, data_cfg)
    plan = get_plan(model)
    n_layers = model.config.num_hidden_layers
    head = {"label": entry["label"], "path": entry["path"], **plan_columns(plan, n_layers), "n_layers": n_layers,
            "parameters": sum(p.numel() for p in model.parameters())}  # a tied head counted once: the model's size
    print(f"[{entry['label']}] {entry['path']} ({plan.describe()}, ideal latency reduction "
          f"{head['ideal_latency_reduction']:.1%})")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    fewshot = OmegaConf.to_container(cfg.num_fewshot) if cfg.num_fewshot else {}
    rows = []
    for task in tasks:
        for corpus in corpora if task in TEXT_TASKS else [None]:
            start = time.perf_counter()
            if corpus is None:
                task_rows = lm_eval_task(lm, tm, task, fewshot.get(task), cfg.limit, cfg)
            else:
                task_rows = text_task_rows(task, model, tokenizer, corpus, cfg, entry["label"], refs)
            seconds = time.perf_counter() - start
            rows += [{**head, **r, "limit": cfg.limit, "seconds": round(seconds, 2)} for r in task_rows]
            print(f"[{entry['label']}] {task}" + (f" on {corpus.name}" if corpus else "") + ": "
                  + ", ".join(f"{r['metric']}={r['value']:.4g}" for r in task_rows) + f" ({seconds:.1f} s)")
    return rows


def table(df: pd.DataFrame) -> str:
    """Human summary: one line per task/corpus/metric, one column per model, `value ± stderr`."""
    cell = df.apply(lambda r: f"{r.value:.4g}" + (f" ± {r.stderr:.3f}" if r.stderr == r.stderr else ""), axis=1)
    wide = df.assign(cell=cell).pivot_table(index=["task", "dataset", "metric", "filter"], columns="label",
                                            values="cell", aggfunc="first", sort=False)
    return wide[[c for c in dict.fromkeys(df.label) if c in wide.columns]].to_string()


def run(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "pretrained is not a str": intended
    data_cfg = data_config(cfg.data)
    tasks = expand_tasks(list(cfg.tasks), OmegaConf.to_container(cfg.suites))
    corpora = text_corpora(cfg) if set(tasks) & set(TEXT_TASKS) else []
    if set(tasks) & set(TEXT_TASKS) and not corpora:
        raise CqilError(f"texts=[] names no corpus for the task(s) {', '.join(t for t in tasks if t in TEXT_TASKS)}; "
                        "give data config names, e.g. texts=[english]")
    entries = model_entries(cfg)
    reference = check_agreement(cfg, entries, tasks)
    entries = present(entries)
    if reference is not None and reference not in [e["label"] for e in entries]:
        raise CqilError(f"the reference {reference!r} was skipped (its path does not exist yet), so nothing can be "
                        "compared with it; run the job that writes it or name another entry in `reference`")
    work_dir = Path(cfg.work_dir).expanduser() if cfg.work_dir else cache_dir() / "eval"
    local = prepare_local_tasks(work_dir)
    tm = task_manager(tasks, local, list(cfg.include_path)) if set(tasks) - set(TEXT_TASKS) else None
    version = importlib.metadata.version("lm_eval")
    refs: dict[str, ReferenceOutputs] = {}
    by_label = {e["label"]: evaluate_model(e, tasks, tm, cfg, data_cfg, corpora, refs)
                for e in sorted(entries, key=lambda e: e["label"] != reference)}  # the reference first
    rows = [row for e in entries for row in by_label[e["label"]]]               # table order: as in `models`
    df = pd.DataFrame(rows).assign(model=cfg.model.name, lm_eval=version, **provenance(cfg.model.device))
    df = df[["model", *[c for c in df.columns if c != "model"]]]

    def superseded(old: pd.DataFrame) -> pd.Series:
        """Earlier rows of this model this run replaces besides those of its own (label, task, dataset):
        all of them with merge=false; else the reference's agreement rows (it gets none now)."""
        mine = old.model.astype(str) == str(cfg.model.name)
        return mine if not cfg.merge else mine & (old.label == reference) & (old.task == AGREEMENT)

    update_table("eval", df, cfg.out, drop=superseded)  # other models' rows (and runs) stay
    print(table(df))
    print(f"-> {cfg.out}  (figure: cqil plot figures=[accuracy])")
