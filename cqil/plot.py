"""`cqil plot`: draw the figures (cqil.plots.FIGURES) whose input CSVs exist, or only `figures=[...]`."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from . import CqilError
from .plots import FIGURES
from .results import read_csv


def inputs(csv: str, png: str) -> list[tuple[str, str]]:
    """(CSV, PNG) pairs: a `*` in the CSV path draws one figure per match, its part replacing the PNG's `*`."""
    if "*" not in csv:
        return [(csv, png)]
    head, tail = csv.split("*", 1)
    matches = sorted(str(p) for p in Path(head).parent.glob(Path(csv).name))
    return [(m, png.replace("*", m[len(head):len(m) - len(tail)])) for m in matches] or [(csv, png)]


def run(cfg: DictConfig) -> None:
    names = list(cfg.figures) if cfg.figures else list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise CqilError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    drawn = 0
    for name in names:
        draw, csv_key, png_key = FIGURES[name]
        for csv, png in inputs(cfg[csv_key], cfg[png_key]):
            if not Path(csv).is_file():
                if cfg.figures:  # asked for explicitly: its input must exist
                    read_csv(csv)
                continue
            try:  # cqil.checks has read the table's columns; this catches values no figure can draw
                print(f"{name}: {csv} -> {draw(read_csv(csv), png)}")
            except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
                why = (str(e).strip().splitlines() or [""])[0]
                raise CqilError(f"{csv} cannot be drawn as {name} ({type(e).__name__}: {why}); "
                                "is it the table the job named in conf/plot.yaml writes?") from None
            drawn += 1
    if not drawn:
        raise CqilError("no result CSVs found to draw from; run `cqil analyze` (or the job named) first")
