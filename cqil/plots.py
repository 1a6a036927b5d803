"""`cqil plot`: every figure is drawn from a stored result CSV, never from a live run.

FIGURES maps a name to (function, input CSV config key, output PNG config key); `cqil plot`
draws each figure whose input CSV exists (or only `figures=[...]`).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from . import CqilError  # noqa: E402
from .results import read_csv  # noqa: E402


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


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


BENCH_BASELINE = "original, 1 device"  # setup (a) of cqil bench: what reductions are measured against


def bench_latency(df: pd.DataFrame, out: str | Path) -> Path:
    """Median latency per setup (p90 as whisker) for every (T, B), prefill and decode; CQIL's ideal marked."""
    setups = list(dict.fromkeys(df.setup))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (phase, label) in zip(axes, (("prefill", "time to first token (ms)"), ("decode", "time per output token (ms)"))):
        d = df[df.phase == phase].set_index(["prompt_tokens", "batch_size"])
        shapes = list(dict.fromkeys(d.index))
        ideal = d[d.setup == BENCH_BASELINE].reindex(shapes).median_ms * (1 - d.ideal_reduction.iloc[0])
        width = 0.8 / len(setups)
        for i, setup in enumerate(setups):
            s = d[d.setup == setup].reindex(shapes)
            x = np.arange(len(shapes)) + (i - (len(setups) - 1) / 2) * width
            ax.bar(x, s.median_ms, width, yerr=[np.zeros(len(s)), s.p90_ms - s.median_ms], capsize=2, label=setup)
            if setup.startswith("cqil"):  # the plan's ideal: original latency x (1 - g(P-1)/n)
                ax.hlines(ideal, x - width / 2, x + width / 2, colors="k", lw=2)
        ax.plot([], [], "k-", lw=2, label="cqil ideal: (a) x (1 - g(P-1)/n)")
        ax.set_xticks(np.arange(len(shapes)), [f"T={t} B={b}" for t, b in shapes])
        ax.set_ylabel(label)
        ax.set_title(phase)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    r = df.iloc[0]
    fig.suptitle(f"{r.model}, plan {r.plan} (ideal reduction {r.ideal_reduction:.1%}), {r.device}: median, p90 whisker")
    return _save(fig, out)

# name -> (draw function, config key of the input CSV, config key of the output PNG)
FIGURES = {
    "similarity_heatmap": (similarity_heatmap, "similarity_csv", "similarity_heatmap_png"),
    "adjacent_similarity": (adjacent_similarity, "similarity_csv", "adjacent_similarity_png"),
    "bench_latency": (bench_latency, "bench_csv", "bench_latency_png"),
}


def run(cfg: DictConfig) -> None:
    names = list(cfg.figures) if cfg.figures else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise CqilError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    drawn = 0
    for name in names:
        draw, csv_key, png_key = FIGURES[name]
        if not Path(cfg[csv_key]).is_file():
            if cfg.figures:  # asked for explicitly: its input must exist
                read_csv(cfg[csv_key])
            continue
        print(f"{name}: {cfg[csv_key]} -> {draw(read_csv(cfg[csv_key]), cfg[png_key])}")
        drawn += 1
    if not drawn:
        raise CqilError("no result CSVs found to draw from; run `cqil analyze` (or the job named) first")
