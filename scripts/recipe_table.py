"""The recipe comparison table (issue 24): every fine-tuned model that `cqil eval` scored, beside its training run.

    python scripts/recipe_table.py [--eval results/eval/recipes_smollm2-135m.csv] \
        [--finetune results/finetune/perplexity_smollm2-135m.csv] [--out results/eval/recipes_table_smollm2-135m.csv]

Joins the eval table (one row per model x task x metric; `cqil eval 'models=[...]'` with one entry per run's
`<out_dir>/merged`) with the finetune table (one row per run: recipe, options, steps, training seconds) on the
model's path, and prints one markdown row per model: training seconds, then perplexity, top-1 agreement and KL,
greedy match fraction and first divergence in / out of domain, cloze, 4-shot addition and polarity. Models
without a finetune row (original, converted) get the measures only. Writes the same table as CSV.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cqil.results import provenance, read_csv, write_csv

IN, OUT = "english/evaluation", "english_ood/evaluation"
MEASURES = [  # (column, task, dataset, metric)
    ("ppl_in", "perplexity", IN, "perplexity"), ("ppl_out", "perplexity", OUT, "perplexity"),
    ("top1_in", "agreement", IN, "top1_agreement"), ("top1_out", "agreement", OUT, "top1_agreement"),
    ("kl_in", "agreement", IN, "kl"), ("kl_out", "agreement", OUT, "kl"),
    ("greedy_match_in", "agreement", IN, "match_fraction"), ("greedy_match_out", "agreement", OUT, "match_fraction"),
    ("first_divergence_in", "agreement", IN, "first_divergence"),
    ("first_divergence_out", "agreement", OUT, "first_divergence"),
    ("cloze", "cqil_cloze", None, "exact_match"), ("addition", "cqil_arithmetic", None, "exact_match"),
    ("polarity", "cqil_polarity", None, "acc"),
]


def table(evals: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per eval label: its training run's columns (if any) and the MEASURES."""
    runs = runs.assign(where=runs["merged"].map(lambda p: str(Path(p).resolve())))
    rows = []
    for label, scored in evals.groupby("label", sort=False):
        where = str(Path(scored["path"].iloc[0]).resolve())
        run = runs[runs["where"] == where].tail(1)
        row = {"label": label}
        if len(run):
            r = run.iloc[0]
            row |= {"recipe": r["recipe"], "options": r.get("options", ""), "steps": r["steps"],
                    "train_seconds": r["train_seconds"], "train_tokens": r["train_tokens"]}
        for column, task, dataset, metric in MEASURES:
            hit = scored[(scored.task == task) & (scored.metric == metric)
                         & ((scored.dataset == dataset) if dataset else True)]
            row[column] = hit["value"].iloc[-1] if len(hit) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    def pair(r, a, b, fmt):
        return f"{fmt.format(r[a])} / {fmt.format(r[b])}"

    lines = ["| model | recipe (options) | steps | training s | perplexity in / out | top-1 in / out | KL in / out | "
             "greedy match in / out | first divergence in / out | cloze | addition | polarity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        recipe = "" if pd.isna(r.get("recipe")) else f"{r['recipe']}" + (f" ({r['options']})" if isinstance(
            r.get("options"), str) and r["options"] else "")
        trained = "" if pd.isna(r.get("steps")) else f"{int(r['steps'])} | {r['train_seconds']:.0f}"
        lines.append(f"| {r['label']} | {recipe} | {trained or ' | '} | {pair(r, 'ppl_in', 'ppl_out', '{:.2f}')} | "
                     f"{pair(r, 'top1_in', 'top1_out', '{:.3f}')} | {pair(r, 'kl_in', 'kl_out', '{:.3f}')} | "
                     f"{pair(r, 'greedy_match_in', 'greedy_match_out', '{:.3f}')} | "
                     f"{pair(r, 'first_divergence_in', 'first_divergence_out', '{:g}')} | {r['cloze']:.3f} | "
                     f"{r['addition']:.3f} | {r['polarity']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", default="results/eval/recipes_smollm2-135m.csv")
    parser.add_argument("--finetune", default="results/finetune/perplexity_smollm2-135m.csv")
    parser.add_argument("--out", default="results/eval/recipes_table_smollm2-135m.csv")
    args = parser.parse_args()
    df = table(read_csv(args.eval), read_csv(args.finetune))
    print(markdown(df))
    print(f"-> {write_csv(df.assign(**provenance()), args.out)}")


if __name__ == "__main__":
    main()
