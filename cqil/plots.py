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


def finetune_loss(df: pd.DataFrame, out: str | Path) -> Path:
    """Training loss per optimizer step, raw and smoothed, with tokens seen on the top axis (finetune loss CSV)."""
    df = df.sort_values("step")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(df.step, df.loss, lw=0.8, alpha=0.45, label="per step")
    window = max(1, len(df) // 15)
    ax.plot(df.step, df.loss.rolling(window, min_periods=1).mean(), lw=2, label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel({"kl": "KL(original || student)", "ce": "next-token loss"}.get(df.loss_kind.iloc[0], "loss"))
    tokens_per_step = df.tokens.iloc[0] / df.step.iloc[0]
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e3,
                                               lambda t: t * 1e3 / tokens_per_step))
    top.set_xlabel("training tokens (thousands)")
    ax.set_title(f"{df.model.iloc[0]} {df.plan.iloc[0]}: LoRA recovery ({df.loss_kind.iloc[0]} loss)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


# name -> (draw function, config key of the input CSV, config key of the output PNG)
FIGURES = {
    "similarity_heatmap": (similarity_heatmap, "similarity_csv", "similarity_heatmap_png"),
    "adjacent_similarity": (adjacent_similarity, "similarity_csv", "adjacent_similarity_png"),
    "finetune_loss": (finetune_loss, "finetune_loss_csv", "finetune_loss_png"),
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
