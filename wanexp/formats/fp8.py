"""FP8 E4M3 with an FP32 scale per row (per output channel for weights, per token for activations),
for W8A8 baselines.

    scale   = rho * amax_row / 448                  fp32
    element = float8_e4m3fn(clamp(x / scale, -448, 448))     (RNE; the clamp makes it saturating)

``group_size`` (default -1 = per row) may be set to use one scale per group instead.
Storage: ``codes`` torch.float8_e4m3fn, ``scales`` fp32 per row / group.
"""

from __future__ import annotations

import torch

from .base import NumberFormat, block_amax, div, safe_divisor, scaled

E4M3_MAX = 448.0


def e4m3_grid() -> torch.Tensor:
    """All finite non-negative E4M3 (fn) values, ascending: codes 0x00..0x7E (0x7F is NaN)."""
    return torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


class FP8E4M3(NumberFormat):
    name = "fp8_e4m3"
    element_bits = 8
    scale_bits = 32

    def __init__(self, group_size: int = -1) -> None:
        if not (group_size == -1 or group_size > 0):
            raise ValueError(f"fp8_e4m3: group_size must be positive or -1, got {group_size}")
        super().__init__(group_size=group_size)
        self.block_size = group_size

    def grid_values(self) -> torch.Tensor:
        return e4m3_grid()

    def _scales(self, v, rho):
        block_max = block_amax(v)
        return {"scale": div(scaled(block_max, rho), E4M3_MAX), "amax": block_max}

    def _quantize(self, v, s):
        x = (v / safe_divisor(s["scale"])).clamp_(-E4M3_MAX, E4M3_MAX)
        return x.to(torch.float8_e4m3fn).float()

    def _dequantize(self, q, s):
        return q * s["scale"]

    def _pack(self, q, s):
        return {"codes": q.flatten(-2).to(torch.float8_e4m3fn), "scales": s["scale"].squeeze(-1).clone()}

    def _unpack(self, t, view_shape):
        q = t["codes"].float().reshape(view_shape)
        return q, {"scale": t["scales"].float().unsqueeze(-1)}
