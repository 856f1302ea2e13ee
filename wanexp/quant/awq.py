"""AWQ's weight-clipping search (Lin et al. 2024; ``auto_clip`` in the authors' code), run after its
scale search on the scaled weight ``W · diag(s)`` and the scaled calibration inputs ``x / s``.

For every output row o and weight group g (the format's block along the input dim), the clip ratio
ρ from a grid (AWQ: 1, 0.95, …, 0.55) minimising that group's share of the output error,

    Σ_t ( x_{t,g} · (w_{o,g} − Q(w_{o,g}; ρ)) )²      over the calibration tokens t,

each group on its own (the cross terms between groups are ignored, as the authors do). ρ multiplies
the group's max |w| before its scale is computed, so values beyond the clipped range saturate.
ρ = 1 is on every grid: no group's own error can grow. The weight is then stored with those ratios
(``fmt.encode(w, clip_ratio=ratios)``: one ratio per row and group).
"""

from __future__ import annotations

from typing import Sequence

import torch

from wanexp.formats import NumberFormat
from wanexp.quant.clip_search import evenly_spaced_rows

AWQ_RATIOS = tuple(round(1 - i / 20, 2) for i in range(10))  # 1.0, 0.95, …, 0.55 (max shrink 0.5, grid 20)


def group_length(fmt: NumberFormat, k: int) -> int:
    """Elements per weight group along the input dim (a per-row format: the whole row)."""
    return k if fmt.block_size < 0 else int(fmt.block_size)


def ratio_shape(fmt: NumberFormat, ratios: torch.Tensor) -> torch.Tensor:
    """``[out, groups]`` ratios shaped to broadcast against the format's block view ``[out, groups, block]``."""
    if len(fmt._view_dims(max(1, int(fmt.block_size)))) != 1:
        raise ValueError(f"{fmt.name}: the weight-clipping search needs a format of plain blocks (int, fp8, mxfp4, "
                         "nvfp4), not sub-blocked ones")
    return ratios.unsqueeze(-1)


@torch.no_grad()
def clip_ratios(w: torch.Tensor, x: torch.Tensor, fmt: NumberFormat, grid: Sequence[float] = AWQ_RATIOS,
                max_tokens: int = 512, rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(the best ratio per row and group ``[out, groups]``, its error) for weight ``w [out, in]`` and
    inputs ``x [n, in]`` (at most ``max_tokens`` rows, evenly spaced, as the authors subsample)."""
    out_f, k = w.shape
    block = group_length(fmt, k)
    groups = -(-k // block)
    pad = groups * block - k
    xs = evenly_spaced_rows(x, max_tokens).float()
    xs = torch.nn.functional.pad(xs, (0, pad)).reshape(xs.shape[0], groups, block)
    best = torch.ones(out_f, groups, device=w.device)
    best_err = torch.full((out_f, groups), float("inf"), device=w.device)
    for start in range(0, out_f, rows_per_chunk):
        rows = w[start:start + rows_per_chunk].float()
        for rho in grid:
            q = fmt.quantize_dequantize(rows, clip_ratio=float(rho), check_finite=False).float()
            d = torch.nn.functional.pad(rows - q, (0, pad)).reshape(rows.shape[0], groups, block)
            err = torch.einsum("tgk,ogk->otg", xs, d).square().sum(dim=1)  # [rows, groups]
            better = err < best_err[start:start + rows.shape[0]]
            best_err[start:start + rows.shape[0]] = torch.where(better, err, best_err[start:start + rows.shape[0]])
            best[start:start + rows.shape[0]] = torch.where(better, torch.full_like(err, float(rho)),
                                                            best[start:start + rows.shape[0]])
    return best, best_err
