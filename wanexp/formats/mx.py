"""MXFP4 (OCP Microscaling Formats spec v1.0): E2M1 elements, one E8M0 scale 2**e per 32.

Scale rules (``scale_rule`` option):

* ``"floor"`` (default, the OCP rule): ``e = floor(log2(rho * amax)) - 2``, 2 being E2M1's
  largest exponent. The block max lands in [4, 8) before rounding, so values above 6 saturate.
* ``"ceil"`` (the paper code's "safe_ceil"): ``e = ceil(log2(rho * amax / 6))``, the smallest e with
  6 * 2**e >= rho * amax, which never saturates at rho = 1.

An all-zero block gets e = 0 (E8M0 code 127); e is clamped to E8M0's [-127, 127].
``ties``: E2M1 rounding of the elements, ``"even"`` (default) or ``"toward_zero"`` (the seed paper's
code; see :mod:`.e2m1`).

Exponent shift = clip ratio times a power of two: the seed paper's code tries shifting the shared
exponent by k (``e + k``); since floor/ceil(log2(2**k * rho * amax)) = k + floor/ceil(log2(rho * amax))
and scaling by 2**k is exact in fp32, that is exactly ``clip_ratio = rho * 2**k`` here.
Storage: ``codes`` uint8 (two E2M1 codes a byte), ``scales`` uint8 E8M0 (e + 127).
"""

from __future__ import annotations

import torch

from .base import block_amax, floor_log2, pow2, scaled
from .e2m1 import E2M1Format

E8M0_BIAS = 127


class MXFP4(E2M1Format):
    name = "mxfp4"
    block_size = 32
    scale_bits = 8
    max_keep_blocks = 5  # the seed paper's rule

    def __init__(self, scale_rule: str = "floor", ties: str = "even") -> None:
        if scale_rule not in ("floor", "ceil"):
            raise ValueError(f"mxfp4: scale_rule must be 'floor' or 'ceil', got {scale_rule!r}")
        super().__init__(ties, scale_rule=scale_rule)
        self.scale_rule = scale_rule

    def _scales(self, v, rho):
        block_max = block_amax(v)
        amax = scaled(block_max, rho)
        e, mant = floor_log2(amax)  # exact, unlike torch.log2 near powers of two
        if self.scale_rule == "floor":
            e = e - 2
        else:  # 6 * 2**(E-2) = 1.5 * 2**E covers amax = mant * 2**E iff mant <= 1.5
            e = e - 2 + (mant > 1.5).to(e.dtype)
        e = torch.where(amax > 0, e, torch.zeros_like(e))
        e = torch.where(torch.isinf(amax), E8M0_BIAS, e)  # rho > 1 can overflow fp32
        e = e.clamp(-E8M0_BIAS, E8M0_BIAS)
        return {"X": pow2(e), "amax": block_max}

    def _quantize(self, v, s):
        return self._round(v / s["X"])  # dividing by a power of two is exact

    def _dequantize(self, q, s):
        return q * s["X"]

    def _pack(self, q, s):
        e, _ = floor_log2(s["X"])
        scales = (e + E8M0_BIAS).to(torch.uint8).squeeze(-1)  # (*lead, n_blocks)
        return {"codes": self._pack_codes(q), "scales": scales}

    def _unpack(self, t, view_shape):
        X = pow2(t["scales"].to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
        return self._unpack_codes(t["codes"], view_shape), {"X": X}
