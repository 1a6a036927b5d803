"""The figures: each drawn from a stored result table (a DataFrame read from its CSV), never from a live run.

FIGURES maps a name to (function, input CSV config key or a tuple of them, output PNG config key). A library,
not a job: `cqil plot` (cqil/plot.py) draws every figure whose CSVs exist; cqil bench and cqil latency draw their
own figure right after writing its table. No torch here: drawing CSVs needs none.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .outputs import write_file  # noqa: E402
from .results import BENCH_BASELINE  # noqa: E402


def _save(fig: plt.Figure, out: str | Path) -> Path:
    try:  # the format is given: the temporary name does not end in .png
        return write_file(out, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def similarity_heatmap(df: pd.DataFrame, out: str | Path) -> Path:
    """Heatmap of mean cosine similarity between layer inputs (analyze CSV)."""
    n = int(df.layer_i.max()) + 1
    mat = np.full((n, n), np.nan)
    mat[df.layer_i.to_numpy(), df.layer_j.to_numpy()] = df.cos_mean.to_numpy()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    im = ax.imshow(mat, cmap="viridis", vmin=max(0.0, np.nanmin(mat)), vmax=1.0, origin="upper")
    fig.colorbar(im, ax=ax, label="mean cosine similarity")
    ax.set_xlabel("layer input j (0-based; last = final output)")
    ax.set_ylabel("layer input i")
    ax.set_title(f"{df.model.iloc[0]}: similarity of layer inputs\n({df.n_tokens.iloc[0]} tokens of {df.data.iloc[0]})")
    return _save(fig, out)


def adjacent_similarity(df: pd.DataFrame, out: str | Path) -> Path:
    """cos(x_i, x_{i+1}) against i, with its spread over tokens (analyze CSV)."""
    adj = df[df.layer_j == df.layer_i + 1].sort_values("layer_i")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.errorbar(adj.layer_i, adj.cos_mean, yerr=adj.cos_std, marker="o", ms=3, capsize=2)
    ax.set_xlabel("layer i (0-based)")
    ax.set_ylabel("cos(input of i, input of i+1)")
    ax.set_title(f"{df.model.iloc[0]}: adjacent-layer input similarity (mean ± std over tokens)")
    ax.grid(alpha=0.3)
    return _save(fig, out)


LOWER_IS_BETTER = {"perplexity", "kl"}  # eval metrics where a smaller value is better
FRACTIONS = {"acc", "acc_norm", "exact_match", "top1_agreement", "match_fraction"}  # eval metrics in [0, 1]


def accuracy_table(df: pd.DataFrame, out: str | Path) -> Path:
    """One panel per measurement (task, corpus, metric, filter; `acc_norm` only where a task has no `acc`), one bar
    per model side by side with ±stderr and the value printed (eval CSV): original / converted / fine-tuned."""
    keys = ["task", "dataset", "metric", "filter"]
    panels = df.drop_duplicates(keys)[keys]
    has_acc = set(df[df.metric == "acc"].task)
    panels = panels[~((panels.metric == "acc_norm") & panels.task.isin(has_acc))]
    labels = list(dict.fromkeys(df.label))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * max(3.2, 1.0 * len(labels) + 1.2), 3.6 * nrows),
                             squeeze=False, layout="constrained")
    colors = plt.get_cmap("tab10")(np.arange(len(labels)) % 10)
    for ax, (_, f) in zip(axes.flat, panels.iterrows()):
        rows = df[(df[keys] == f[keys]).all(axis=1)].set_index("label")
        rows = rows.loc[[lbl for lbl in labels if lbl in rows.index]]
        x = np.arange(len(rows))
        ax.bar(x, rows.value, yerr=rows.stderr.fillna(0), capsize=3, color=colors[[labels.index(lbl) for lbl in rows.index]])
        for xi, (v, se) in enumerate(zip(rows.value, rows.stderr)):
            ax.annotate(f"{v:.3g}" + (f"\n±{se:.2g}" if se == se else ""), (xi, v + (se if se == se else 0)),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ticks = [lbl if r.plan == lbl else f"{lbl}\n" + _plan_label(r).replace(" (", "\n(") for lbl, r in rows.iterrows()]
        ax.set_xticks(x, ticks, fontsize=7)
        where = f"\n{f.dataset}" if f.task in ("perplexity", "agreement") else ""
        ax.set_title(f"{f.task}{where} (n={int(rows.n.iloc[0])})", fontsize=9)
        better = " (lower is better)" if f.metric in LOWER_IS_BETTER else ""
        ax.set_ylabel(f.metric + ("" if f["filter"] == "none" else f" [{f['filter']}]") + better, fontsize=8)
        ax.margins(y=0.25)
        if f.metric in FRACTIONS:
            ax.set_ylim(0, 1.25)
            ax.set_yticks(np.linspace(0, 1, 6))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{df.model.iloc[0]}: accuracy, generation, perplexity and agreement with the original by model "
                 f"(lm-eval {df.lm_eval.iloc[0]})", fontsize=10)
    return _save(fig, out)


def sweep_perplexity(df: pd.DataFrame, out: str | Path) -> Path:
    """Held-out perplexity against the start layer S, one line per group size P (sweep CSV)."""
    original = df[df.group_size == 1].perplexity.iloc[0]
    plans = df[df.group_size > 1]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = dict(zip(sorted(plans.group_size.unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(sorted(plans.end.unique(), reverse=True), ["-", "--", ":", "-."]))
    for (p, end), part in plans.groupby(["group_size", "end"]):
        part = part.sort_values("start")
        ax.plot(part.start, part.perplexity, marker="o", ms=3, color=colors[p], ls=styles.get(end, "-"),
                label=f"P={p}, E={int(end)}")
    ax.axhline(original, color="k", ls=":", lw=1.5, label=f"original ({original:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("start layer S (0-based; groups of P layers from S up to E, exclusive)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{df.model.iloc[0]}: perplexity after conversion, no fine-tuning\n"
                 f"({df.n_tokens.iloc[0]} tokens of {df.data.iloc[0]}, D={int(plans.bypass.iloc[0])})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out)


def _plan_label(row) -> str:
    """A plan's name, or its shape where the name (a list of groups) would not fit a legend or a tick label."""
    if len(row.plan) < 24:
        return row.plan
    groups = json.loads(row.plan_json)["groups"]
    return f"{len(groups)} groups of {len(groups[0])} (from layer {groups[0][0]})"


def plan_candidates(df: pd.DataFrame, out: str | Path) -> Path:
    """plan=auto: calibration perplexity against ideal latency reduction (greedy group sets, contiguous spans, the
    Pareto front, the budget and the choice), and the check that group costs add up (measured against predicted)."""
    fig, (ax, ax_c) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colors = dict(zip(sorted(df.group_size.unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    greedy = df.greedy_step.notna()
    for p, part in df.groupby("group_size"):
        spans, sets = part[part.contiguous & ~greedy.loc[part.index]], part[greedy.loc[part.index]]
        ax.scatter(100 * spans.ideal_latency_reduction, spans.ppl_ratio, s=14, color=colors[p], marker="o",
                   alpha=0.6, label=f"P={p} contiguous span")
        ax.scatter(100 * sets.ideal_latency_reduction, sets.ppl_ratio, s=30, color=colors[p], marker="^",
                   label=f"P={p} greedy group set")
    front = df[df.pareto].sort_values("ideal_latency_reduction")
    ax.step(100 * front.ideal_latency_reduction, front.ppl_ratio, where="post", color="grey", lw=1, label="Pareto front")
    chosen = df[df.chosen]
    if not chosen.empty:
        ax.scatter(100 * chosen.ideal_latency_reduction, chosen.ppl_ratio, s=160, facecolors="none", edgecolors="k",
                   lw=1.5, label=f"chosen: {_plan_label(chosen.iloc[0])}")
    if df.budget.iloc[0] == "before":
        ax.axhline(df.max_ppl_ratio.iloc[0], color="r", ls="--", lw=1, label=f"budget {df.max_ppl_ratio.iloc[0]} x")
    ax.set_yscale("log")
    ax.set_xlabel("ideal latency reduction g(P-1)/n (%)")
    ax.set_ylabel("calibration perplexity / original (log)")
    ax.set_title(f"candidates, budget {df.budget.iloc[0]}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

    multi = df[df.n_groups > 1]
    for kind, part, marker in (("contiguous span", multi[multi.contiguous & multi.greedy_step.isna()], "o"),
                               ("greedy group set", multi[multi.greedy_step.notna()], "^")):
        ax_c.scatter(part.predicted_log_ppl_increase, part.log_ppl_increase, s=18, marker=marker,
                     c=[colors[p] for p in part.group_size], label=kind)
    hi = max(multi.predicted_log_ppl_increase.max(), multi.log_ppl_increase.max(), 0.01) if len(multi) else 1.0
    ax_c.plot([0, hi], [0, hi], "k-", lw=0.8, label="measured = sum of the single groups' costs")
    ax_c.set_xlabel("sum of its groups' log-perplexity increases (each group alone)")
    ax_c.set_ylabel("measured log-perplexity increase of the plan")
    ax_c.set_title("do the groups' costs add up?", fontsize=10)
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=7)
    fig.suptitle(f"{df.model.iloc[0]}: plan=auto candidates ({df.n_tokens.iloc[0]} tokens of {df.data.iloc[0]})",
                 fontsize=10)
    return _save(fig, out)


def plan_probes(df: pd.DataFrame, out: str | Path) -> Path:
    """plan=auto budget=after_recovery: each probed candidate's calibration perplexity before and after its short
    recovery probe against its ideal reduction; the budget and the chosen plan marked (probe CSV)."""
    df = df.sort_values("ideal_latency_reduction")
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    x = 100 * df.ideal_latency_reduction
    ax.scatter(x, df.ppl_ratio, marker="o", facecolors="none", edgecolors="tab:red", label="before recovery")
    ax.scatter(x, df.probe_ratio, marker="o", color="tab:blue",
               label=f"after a {int(df.steps.iloc[0])}-step probe ({df.recipe.iloc[0]} recipe)")
    for xi, before, after in zip(x, df.ppl_ratio, df.probe_ratio):
        ax.annotate("", (xi, after), (xi, before), arrowprops=dict(arrowstyle="->", color="grey", lw=0.8))
    for r in df.itertuples():
        ax.annotate(_plan_label(r), (100 * r.ideal_latency_reduction, r.probe_ratio), fontsize=6, xytext=(4, -8),
                    textcoords="offset points")
    chosen = df[df.chosen]
    if not chosen.empty:
        ax.scatter(100 * chosen.ideal_latency_reduction, chosen.probe_ratio, s=180, facecolors="none",
                   edgecolors="k", lw=1.5, label=f"chosen: {_plan_label(chosen.iloc[0])}")
    ax.axhline(df.max_ppl_ratio.iloc[0], color="r", ls="--", lw=1, label=f"budget {df.max_ppl_ratio.iloc[0]} x")
    ax.set_yscale("log")
    ax.set_xlabel("ideal latency reduction g(P-1)/n (%)")
    ax.set_ylabel("calibration perplexity / original (log)")
    ax.set_title(f"{df.model.iloc[0]}: recovery probes of the Pareto front ({df.n_tokens.iloc[0]} tokens of "
                 f"{df.data.iloc[0]})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def finetune_loss(df: pd.DataFrame, out: str | Path) -> Path:
    """Training loss per optimizer step, raw and smoothed, with tokens seen on the top axis (finetune loss CSV).
    A table of several runs (its `run` column: each run's out_dir) gets one smoothed line per run."""
    runs = list(df.groupby(df.run.fillna("") if "run" in df else pd.Series("", index=df.index), sort=False))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, part in runs:
        part = part.sort_values("step")
        window = max(1, len(part) // 15)
        if len(runs) == 1:
            ax.plot(part.step, part.loss, lw=0.8, alpha=0.45, label="per step")
        ax.plot(part.step, part.loss.rolling(window, min_periods=1).mean(), lw=2,
                label=f"mean of {window} steps" + (f": {name or 'a run before the run column'}" if len(runs) > 1 else ""))
    df = runs[-1][1].sort_values("step")  # the top axis and the title: the last run written
    ax.set_xlabel("optimizer step")
    ax.set_ylabel({"kl": "KL(original || student)", "ce": "next-token loss",
                   "blockwise": "group output error (relative)"}.get(df.loss_kind.iloc[0], "loss"))
    tokens_per_step = df.tokens.iloc[0] / df.step.iloc[0]
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e3,
                                               lambda t: t * 1e3 / tokens_per_step))
    top.set_xlabel("training tokens (thousands)")
    ax.set_title(f"{df.model.iloc[0]} {df.plan.iloc[0]}: LoRA recovery ({df.loss_kind.iloc[0]} loss)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def recovery_curve(df: pd.DataFrame, out: str | Path) -> Path:
    """Recovery against training tokens, one line per run (recipe, adapters, lr, steps; finetune curve CSV): held-out
    perplexity in and out of domain (original and converted marked) and teacher-forced top-1 agreement with the
    original."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    runs = list(df.groupby(["recipe", "lora_layers", "lr", "max_steps"], sort=False))
    for (recipe, layers, lr, steps), run in runs:
        run = run.sort_values("tokens")
        label = f"{recipe}, {steps} steps (lora.layers={layers}, lr {lr:g})"
        line, = axes[0].plot(run.tokens / 1e3, run.ppl_finetuned, marker=".", label=label)
        if "ood_ppl_finetuned" in run:
            axes[1].plot(run.tokens / 1e3, run.ood_ppl_finetuned, marker=".", color=line.get_color())
            axes[2].plot(run.tokens / 1e3, run.ood_top1_finetuned, marker=".", ls="--", color=line.get_color())
        axes[2].plot(run.tokens / 1e3, run.top1_finetuned, marker=".", color=line.get_color())
    first = df.sort_values("tokens").iloc[0]
    for ax, prefix, title in ((axes[0], "", "in domain"), (axes[1], "ood_", "out of domain")):
        if f"{prefix}ppl_original" in df:
            ax.axhline(first[f"{prefix}ppl_original"], color="k", lw=1, label="original")
            if first.tokens == 0:  # before training: the converted model
                ax.axhline(first[f"{prefix}ppl_finetuned"], color="grey", ls=":", label="converted")
        ax.set_ylabel(f"held-out perplexity, {title}")
    axes[2].set_ylabel("top-1 agreement with the original\n(solid: in domain, dashed: out of domain)")
    for ax in axes:
        ax.set_xlabel("training tokens (thousands)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{df.model.iloc[0]} {df.plan.iloc[0]}: recovery curve ({df.data.iloc[0]}; out of domain: "
                 "a source never trained on)", fontsize=10)
    return _save(fig, out)


def recovery_time(df: pd.DataFrame, out: str | Path) -> Path:
    """Recovery per wall-clock second of training, one line per run (recipe and its options: teacher-written text,
    ranks, fully trained layers; lr, steps; finetune curve CSV): share of the perplexity gap recovered, top-1
    agreement with the original and, when the curve measured it (curve.greedy=true), the median first divergence
    of greedy continuations; solid in domain, dashed out of domain. Runs of recipes with different step costs
    compare at equal x."""
    df = df.assign(options=df["options"].fillna("") if "options" in df else "")
    panels = [("gap_recovered", "share of the perplexity gap recovered"),
              ("top1_finetuned", "top-1 agreement with the original")]
    if df.get("first_divergence_finetuned") is not None and df["first_divergence_finetuned"].notna().any():
        panels.append(("first_divergence_finetuned", "greedy: median first divergence (tokens)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), layout="constrained", squeeze=False)
    for (recipe, options, layers, lr, steps), run in df.groupby(["recipe", "options", "lora_layers", "lr", "max_steps"],
                                                                sort=False):
        run = run.sort_values("train_seconds")
        label = f"{recipe}{f' ({options})' if options else ''}, {steps} steps, lr {lr:g}"
        color = None
        for ax, (column, _) in zip(axes[0], panels):
            line, = ax.plot(run.train_seconds, run[column], marker=".", color=color, label=label)
            color = line.get_color()
            if f"ood_{column}" in run:
                ax.plot(run.train_seconds, run[f"ood_{column}"], marker=".", ls="--", color=color)
    for ax, (_, name) in zip(axes[0], panels):
        ax.set_xlabel("training wall-clock seconds (measurements excluded)")
        ax.set_ylabel(f"{name}\n(solid: in domain, dashed: out of domain)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{df.model.iloc[0]} {df.plan.iloc[0]}: recovery per second of training ({df.data.iloc[0]}; "
                 f"device {df.device.iloc[0]})", fontsize=10)
    return _save(fig, out)


def bench_latency(df: pd.DataFrame, out: str | Path) -> Path:
    """Top: median latency per setup and (T, B), with its bootstrap interval (whisker) and CQIL's ideal marked.
    Bottom: the paired reduction against (a) run the same way, eager or compiled (median over rounds) with its
    interval, the ideal as a line."""
    setups = list(dict.fromkeys(df.setup))
    colors = dict(zip(setups, plt.get_cmap("tab10")(np.arange(len(setups)) % 10)))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.4), layout="constrained")
    for col, (phase, label) in enumerate((("prefill", "time to first token (ms)"), ("decode", "time per output token (ms)"))):
        ax, ax_r = axes[0, col], axes[1, col]
        d = df[df.phase == phase].set_index(["prompt_tokens", "batch_size"])
        shapes = list(dict.fromkeys(d.index))
        ideal = d[d.setup == BENCH_BASELINE].reindex(shapes).median_ms * (1 - d.ideal_reduction.iloc[0])
        width = 0.8 / len(setups)
        for i, setup in enumerate(setups):
            s = d[d.setup == setup].reindex(shapes)
            x = np.arange(len(shapes)) + (i - (len(setups) - 1) / 2) * width
            lo, hi = _interval(s, "median_ci_low_ms", "median_ci_high_ms", s.median_ms)
            ax.bar(x, s.median_ms, width, yerr=[s.median_ms - lo, hi - s.median_ms], capsize=2, color=colors[setup],
                   label=setup)
            if setup.startswith("cqil"):  # the plan's ideal: original latency x (1 - g(P-1)/n)
                ax.hlines(ideal, x - width / 2, x + width / 2, colors="k", lw=2)
            if setup != BENCH_BASELINE:
                lo, hi = _interval(s, "reduction_ci_low", "reduction_ci_high", s.reduction)
                ax_r.errorbar(x, 100 * s.reduction, yerr=[100 * (s.reduction - lo), 100 * (hi - s.reduction)],
                              fmt="o", ms=4, capsize=3, color=colors[setup])
        ax.plot([], [], "k-", lw=2, label="cqil ideal: (a) x (1 - g(P-1)/n)")
        ax_r.axhline(100 * d.ideal_reduction.iloc[0], color="k", lw=1.5, label="cqil ideal g(P-1)/n")
        ax_r.axhline(0, color="grey", lw=0.8, ls="--")
        base = d[d.setup == BENCH_BASELINE].reindex(shapes)
        ticks = [f"T={t} B={b}" + (f"\n{n} rounds" if "rounds" in base else "")
                 for (t, b), n in zip(shapes, base.get("rounds", base.median_ms))]
        for a in (ax, ax_r):
            a.set_xticks(np.arange(len(shapes)), ticks, fontsize=8)
            a.grid(axis="y", alpha=0.3)
        ax.set_ylabel(label)
        ax.set_title(phase)
        ax_r.set_ylabel(f"reduction vs {BENCH_BASELINE}, same compile (%)")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[1, 0].legend(fontsize=7, loc="upper left")
    r = df.iloc[0]
    level = f"{r.confidence:.0%}" if "confidence" in df else "95%"
    fig.suptitle(f"{r.model}, plan {r.plan} (ideal reduction {r.ideal_reduction:.1%}), {r.device}: median over rounds "
                 f"with {level} bootstrap intervals; reductions paired per round", fontsize=10)
    return _save(fig, out)


def _interval(s: pd.DataFrame, low: str, high: str, center: pd.Series) -> tuple[pd.Series, pd.Series]:
    """An interval's ends, the center where the CSV has none (older tables, a single round)."""
    if low not in s:
        return center, center
    return s[low].fillna(center), s[high].fillna(center)


def latency_validation(df: pd.DataFrame, out: str | Path) -> Path:
    """Latency model per CQIL (and tensor-parallel) row: predicted against measured latency (log, error of each
    validation row annotated) and predicted against measured reduction (what a plan is chosen by); y = x on both."""
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(12, 5.4), layout="constrained")
    colors = {"prefill": "tab:blue", "decode": "tab:orange"}
    df = df if "kind" in df else df.assign(kind="cqil")
    for (role, kind, phase), g in df.groupby(["role", "kind", "phase"], sort=False):
        color = colors.get(phase, "k")
        style = dict(s=26, marker="o" if role == "validation" else "x", color=color,
                     label=f"{role}: {phase} ({g.plan.iloc[0]})")
        if kind == "tp":  # hollow squares: never fitted
            style = {**style, "marker": "s", "color": None, "edgecolors": color, "facecolors": "none"}
        ax.scatter(g.measured_ms, g.predicted_ms, **style)
        ax_r.scatter(100 * g.measured_reduction, 100 * g.predicted_reduction, **style)
        if "measured_reduction_ci_low" in g and g.measured_reduction_ci_low.notna().any():  # the bench's interval
            lo, hi = _interval(g, "measured_reduction_ci_low", "measured_reduction_ci_high", g.measured_reduction)
            ax_r.errorbar(100 * g.measured_reduction, 100 * g.predicted_reduction, fmt="none", lw=0.8, alpha=0.6,
                          xerr=[100 * (g.measured_reduction - lo), 100 * (hi - g.measured_reduction)], color=color)
        if role == "validation":
            for r in g.itertuples():
                ax.annotate(f"{r.error_pct:+.0f}%", (r.measured_ms, r.predicted_ms), fontsize=6,
                            xytext=(3, -3), textcoords="offset points")
    for a, cols in ((ax, ["measured_ms", "predicted_ms"]), (ax_r, ["measured_reduction", "predicted_reduction"])):
        scale = 1 if a is ax else 100
        lo, hi = scale * df[cols].min().min(), scale * df[cols].max().max()
        pad = 0.2 * (hi - lo) if a is ax_r else 0
        lo, hi = (lo * 0.8, hi * 1.2) if a is ax else (lo - pad, hi + pad)
        a.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
        a.grid(alpha=0.3, which="both")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured median latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax_r.set_xlabel("measured latency reduction vs original, 1 device (%; paired median, bench interval)")
    ax_r.set_ylabel("predicted latency reduction (%)")
    ax.legend(fontsize=7, loc="upper left")
    val = df[df.role == "validation"]
    mape = "; ".join(f"{kind} {ph} {e.abs().mean():.1f}%" for (kind, ph), e in val.groupby(["kind", "phase"], sort=False).error_pct)
    fig.suptitle(f"{df.model.iloc[0]}: latency model against cqil bench, mean |error| on validation rows: {mape}",
                 fontsize=10)
    return _save(fig, out)


def latency_hybrid(df: pd.DataFrame, out: str | Path) -> Path:
    """Speed-up of the best CQIL x TP over TP=N on the same N GPUs (bars, labelled with the best P x T),
    one panel per hardware and shape, one bar group per model; setups that do not fit are marked."""
    hws, shapes = list(dict.fromkeys(df.hardware)), list(dict.fromkeys(zip(df.phase, df.prompt_tokens)))
    models, devices = list(dict.fromkeys(df.model)), sorted(df.devices.unique())
    fig, axes = plt.subplots(len(hws), len(shapes), figsize=(4.8 * len(shapes), 3.8 * len(hws)), squeeze=False,
                             sharey=True, layout="constrained")
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(devices)))
    width = 0.8 / len(devices)
    for axrow, hw in zip(axes, hws):
        for ax, (phase, t) in zip(axrow, shapes):
            d = df[(df.hardware == hw) & (df.phase == phase) & (df.prompt_tokens == t)].set_index(["model", "devices"])
            for i, n in enumerate(devices):
                x = np.arange(len(models)) + (i - (len(devices) - 1) / 2) * width
                rows = [d.loc[(m, n)] for m in models]
                y = [r.speedup_vs_tp if r.fits and r.tp_shardable else 0.0 for r in rows]
                ax.bar(x, y, width, color=colors[i], label=f"N={n}" if ax is axes[0][0] else None)
                for xi, yi, r in zip(x, y, rows):
                    label = (f"TP={n} cannot cut the heads" if not r.tp_shardable else
                             f"P{int(r.best_p)}xT{int(r.best_t)}" if r.fits else "none fits")
                    ax.annotate(label + ("" if r.tp_fits or not r.tp_shardable else " (TP OOM)"), (xi, yi),
                                ha="center", va="bottom", fontsize=5, rotation=90, xytext=(0, 2), textcoords="offset points")
            ax.axhline(1.0, color="k", lw=1, ls="--")
            ax.set_xticks(np.arange(len(models)), models, fontsize=7)
            ax.set_title(f"{hw}: {phase} " + (f"T={t}" if phase == "prefill" else f"(context {t})"), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.25)
        axrow[0].set_ylabel("TP=N latency / best CQIL x TP")
    fig.legend(loc="outside lower center", ncol=len(devices), fontsize=8)
    fig.suptitle(f"Projected speed-up of CQIL x TP over tensor parallelism on the same N GPUs (batch "
                 f"{df.batch_size.iloc[0]}; figures fitted on gpt-fast's Llama-2-7B TP table; assumptions in the CSV)",
                 fontsize=10)
    return _save(fig, out)


def scale(tables: dict[str, pd.DataFrame], out: str | Path) -> Path:
    """The scale study (conf/study/scale.yaml), every model in one figure: (a) adjacent-layer input similarity against
    relative depth (analyze CSVs); (b) calibration perplexity / original against ideal latency reduction, greedy group
    sets and the best contiguous span of each size (plan=auto candidate tables); (c, d) at the equal ideal reduction
    of the plans `cqil eval` compared, quality loss against model size: held-out perplexity / original and top-1
    agreement with the original (± its standard error), converted and fine-tuned, in and out of domain (eval CSVs)."""
    sim, cand, ev = tables["scale_similarity_csv"], tables["scale_candidates_csv"], tables["scale_eval_csv"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), layout="constrained")
    colors = dict(zip(sorted(set(sim.model) | set(cand.model) | set(ev.model)), plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    ax = axes[0, 0]
    for model, part in sim.groupby("model"):
        n = int(part.n_layers.iloc[0])
        adj = part[part.layer_j == part.layer_i + 1].sort_values("layer_i")
        ax.plot(adj.layer_i / n, adj.cos_mean, marker="o", ms=3, color=colors[model], label=f"{model} ({n} layers)")
    ax.set_xlabel("relative depth i / n of layer i (0-based)")
    ax.set_ylabel("cos(input of i, input of i+1)")
    ax.set_title("(a) adjacent-layer input similarity (calibration text)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for model, part in cand[cand.n_groups > 0].groupby("model"):
        sets = part[part.greedy_step.notna()].sort_values("ideal_latency_reduction")
        spans = part[part.contiguous].groupby("n_groups").ppl_ratio.min()
        ideal = part[part.contiguous].groupby("n_groups").ideal_latency_reduction.first()
        ax.plot(100 * sets.ideal_latency_reduction, sets.ppl_ratio, "^-", color=colors[model], ms=5,
                label=f"{model}: greedy group set")
        ax.plot(100 * ideal[spans.index], spans, "o--", color=colors[model], ms=3, alpha=0.7,
                label=f"{model}: best contiguous span")
        chosen = part[part.chosen]
        if not chosen.empty:
            ax.scatter(100 * chosen.ideal_latency_reduction, chosen.ppl_ratio, s=150, facecolors="none",
                       edgecolors=colors[model], lw=1.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xlabel("ideal latency reduction g(P-1)/n (%)")
    ax.set_ylabel("calibration perplexity / original (log)")
    ax.set_title("(b) damage before recovery at each reduction (circled: the plan evaluated below)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)

    ppl = ev[(ev.task == "perplexity") & (ev.metric == "perplexity")]
    base = ppl[ppl.label == ev.reference.dropna().iloc[0] if ev.reference.notna().any() else "original"]
    top1 = ev[(ev.task == "agreement") & (ev.metric == "top1_agreement")]
    ideal = {m: g[g.ideal_latency_reduction > 0].ideal_latency_reduction.unique() for m, g in ev.groupby("model")}
    styles = {"converted": dict(marker="o", mfc="none"), "finetuned": dict(marker="s")}
    lines = {d: ("-" if i == 0 else "--") for i, d in enumerate(sorted(set(ppl.dataset), key=lambda d: "ood" in d))}
    for label, style in styles.items():
        for dataset, ls in lines.items():
            mine = ppl[(ppl.label == label) & (ppl.dataset == dataset)].set_index("model")
            ref = base[base.dataset == dataset].set_index("model")
            models = [m for m in mine.index if m in ref.index]
            if models:
                size = mine.loc[models, "parameters"]
                ratio = mine.loc[models, "value"] / ref.loc[models, "value"]
                axes[1, 0].plot(size, ratio, ls=ls, color="k", **style, label=f"{label}, {dataset}")
            mine = top1[(top1.label == label) & (top1.dataset == dataset)].sort_values("parameters")
            if not mine.empty:
                axes[1, 1].errorbar(mine.parameters, mine.value, yerr=mine.stderr, ls=ls, color="k", capsize=3,
                                    **style, label=f"{label}, {dataset}")
    at = ", ".join(f"{m}: {', '.join(f'{100 * v:.1f}%' for v in vals)}" for m, vals in ideal.items())
    for ax, what, title in ((axes[1, 0], "held-out perplexity / original", "(c) perplexity"),
                            (axes[1, 1], "top-1 agreement with the original (± s.e.)", "(d) top-1 agreement")):
        for model, size in ev.groupby("model").parameters.first().items():
            ax.axvline(size, color=colors[model], lw=6, alpha=0.15)
            ax.annotate(model, (size, 1), xycoords=("data", "axes fraction"), fontsize=8, ha="center", va="top",
                        color=colors[model])
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log)")
        ax.set_ylabel(what)
        ax.set_title(f"{title} at equal ideal reduction ({at})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right" if ax is axes[1, 1] else "upper right")
    fig.suptitle("CQIL across model sizes: similarity, damage before recovery, quality after "
                 "(two models: a direction, not a trend)", fontsize=11)
    return _save(fig, out)


# name -> (draw function, config key of the input CSV, config key of the output PNG). A tuple of CSV keys: the figure
# reads several tables, each key's `*` matches concatenated (one row set per model), and draws one figure from them.
FIGURES = {
    "similarity_heatmap": (similarity_heatmap, "similarity_csv", "similarity_heatmap_png"),
    "adjacent_similarity": (adjacent_similarity, "similarity_csv", "adjacent_similarity_png"),
    "accuracy": (accuracy_table, "eval_csv", "accuracy_png"),
    "sweep_perplexity": (sweep_perplexity, "sweep_csv", "sweep_perplexity_png"),
    "plan_candidates": (plan_candidates, "plan_candidates_csv", "plan_candidates_png"),
    "plan_probes": (plan_probes, "plan_probes_csv", "plan_probes_png"),
    "finetune_loss": (finetune_loss, "finetune_loss_csv", "finetune_loss_png"),
    "recovery_curve": (recovery_curve, "recovery_curve_csv", "recovery_curve_png"),
    "recovery_time": (recovery_time, "recovery_curve_csv", "recovery_time_png"),
    "bench_latency": (bench_latency, "bench_csv", "bench_latency_png"),
    "latency_validation": (latency_validation, "latency_validation_csv", "latency_validation_png"),
    "latency_hybrid": (latency_hybrid, "latency_hybrid_csv", "latency_hybrid_png"),
    "scale": (scale, ("scale_similarity_csv", "scale_candidates_csv", "scale_eval_csv"), "scale_png"),
}
