"""The qualitative comparison (seed paper Fig. 5, HiFloat4 paper Fig. 2): one figure per sample, the
BF16 reference and each method in rows, frames at fixed fractions of the video in columns, and beside
each method's frames its per-pixel absolute difference to BF16, every map on one colour scale.

The data (frames decoded from the run's mp4s, the differences, which samples) come from
:mod:`wanexp.analysis`; this module draws them and names the figures ``qualitative_<sample>``.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from wanexp import analysis as A

_FRACTION_NAME = {0.0: "first", 0.25: "1/4", 0.5: "1/2", 0.75: "3/4", 1.0: "last"}


def figure_name(sample: str) -> str:
    return "qualitative_" + re.sub(r"[^\w.-]", "_", sample)


def _column_title(fraction: float, index: int) -> str:
    return f"{_FRACTION_NAME.get(fraction, f'{fraction:g}')} (frame {index})"


def draw_grid(grid: A.Grid, title: str | None = None, cell: float = 1.5):
    """Rows: BF16, then each method; left block: the frames, right block: |frame − BF16| (mean of R, G,
    B) on one shared scale, with its colour bar. The BF16 row's difference cells stay empty. The layout
    is fixed in inches (no layout engine: a grid of 9 × 10 images would spend seconds in one)."""
    from matplotlib.figure import Figure
    rows, cols = grid.frames.shape[:2]
    h, w = grid.frames.shape[2:4]
    cell_h = cell * h / w
    labels = ["\n".join(textwrap.wrap(label, 22)) or label for label in grid.labels]
    heading = "\n".join(textwrap.wrap(grid.prompt, 110) or [grid.sample]) + f"\n{grid.sample} ({grid.category})"
    longest = max(len(line) for label in labels for line in label.splitlines())
    left, right, gap = 0.3 + 0.065 * longest, 1.1, 0.06                     # inches; 8 pt text
    top, bottom = 0.45 + 0.17 * (heading.count("\n") + 1), 0.1
    width, height = left + 2 * cols * (cell + gap) + gap + right, top + rows * (cell_h + gap + 0.18) + bottom
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, 2 * cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "top": 1 - top / height, "bottom": bottom / height,
        "wspace": gap / cell, "hspace": (gap + 0.18) / cell_h})
    image = None
    for r in range(rows):
        for c in range(cols):
            ax, dax = axes[r, c], axes[r, cols + c]
            ax.imshow(grid.frames[r, c], interpolation="nearest")
            if r == 0:
                ax.set_title(_column_title(grid.fractions[c], grid.index[c]), fontsize=8)
                dax.set_title("|Δ| " + _column_title(grid.fractions[c], grid.index[c]), fontsize=8)
                dax.text(0.5, 0.5, "reference", ha="center", va="center", fontsize=8, color="0.5",
                         transform=dax.transAxes)
            else:
                image = dax.imshow(grid.diff[r - 1, c], cmap="inferno", vmin=0.0, vmax=grid.vmax,
                                   interpolation="nearest")
        axes[r, 0].set_ylabel(labels[r], fontsize=8, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    if image is not None:
        low, high = axes[-1, -1].get_position(), axes[min(1, rows - 1), -1].get_position()
        bar = fig.add_axes((high.x1 + 0.15 / width, low.y0, 0.12 / width, high.y1 - low.y0))
        fig.colorbar(image, cax=bar, label="|Δ| vs BF16 (grey levels)")
    fig.suptitle(title or heading, fontsize=9, y=1 - 0.1 / height, va="top")
    return fig


def grid_builders(reference: A.Videos, variants: Sequence[A.Videos], cfg: Mapping[str, Any] | None,
                  errors: pd.DataFrame | None = None) -> dict[str, Callable[[], tuple[Any, dict]]]:
    """``qualitative_<sample>`` → a function returning (figure, its data); the samples as
    ``analysis.qualitative`` chooses them. Raises :class:`A.NotRecorded` when they cannot be chosen."""
    q = A.qualitative_settings(cfg)
    variants = A.distinct_labels(list(variants))
    if not variants:
        raise A.NotRecorded("quant=bf16's videos are the BF16 reference: no quantized video to compare",
                            "no quantized videos")
    picks = A.pick_samples(reference.records, q["samples"], q["count"], errors)

    def build(sample: str, why: str):
        def run():
            grid = A.qualitative_grid(reference, variants, sample, q["fractions"])
            return draw_grid(grid), dict(grid.summary(), picked=why)
        return run

    return {figure_name(sid): build(sid, why) for sid, why in picks}
