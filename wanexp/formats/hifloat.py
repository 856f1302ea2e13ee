"""HiFloat4 ("hifx4" of the HiF4 challenge library), exactly as shared/spec/FORMATS.md defines it.

A group of 64 elements is 8 sub-groups of 8, each 2 micro-groups of 4, viewed as (8, 2, 4):

    M1 = rho * max|x| of the 64                              (fp32; rho = 1 unless clip_ratio is given)
    S0 = clip(bf16(M1 * bf16(1/7)), 2**-48, 49152)          (the product in fp32, M1 not rounded first)
    S  = S0 rounded to 8 significant bits, then to 2 fractional mantissa bits (ties to even)
    r  = bf16(1 / S)
    L2 = 2 if M2 * r >= 4 else 1          per sub-group (M2 its max |x|)
    L3 = 2 if M3 * r / L2 >= 2 else 1     per micro-group (M3 its max |x|)
    m  = min(floor(4 * |x| * r / (L2 * L3) + 0.5) / 4, 1.75)     (fp32, in that order)
    y  = sign(x) * m * L2 * L3 * S

This is what the HiF4 challenge library's GPU kernel computes on bf16 tensors (and its python
reference on fp32 ones), as FORMATS.md states it since 2026-12-01: it is the group scale S0 that is
clipped, not the block max, so a group whose max lies above 7 * 49152 saturates at 7 * 49152 and one
below 7 * 2**-48 gets S = 2**-48. The bf16 roundings are part of the format.

``clip_ratio``: the challenge library has none for HiF4 (it ignores a clip ratio). wanexp multiplies
M1 by it, in fp32, before the product (so clip_ratio = 1, the default, is exactly the library); only
the group scale moves: L2/L3 still look at the unclipped sub-group maxima, against the smaller r. The sign is x's sign bit: a small negative x gives -0
(as in the worked example) and so does -0.0 itself. (The challenge library multiplies by
torch.sign(x), which turns -0.0 into +0; the values are equal, but keeping the bit lets
``encode(quantize_dequantize(x))`` reproduce its input bit for bit, which GPTQ's storage relies on.)

Storage per 64 elements (4.5 bits/element): ``codes`` uint8, two 4-bit (sign, m * 4) codes a byte;
``scales`` uint8 E6M2: (e + 48) << 2 | 2-bit mantissa, the exponent bias chosen so that the clip
range above, S in [2**-48, 1.5 * 2**15], uses exactly the 64 exponents (layout version 2; the
version-1 layout of the earlier M1 clip had bias 51); ``l2`` uint8, bit j
= L2 of sub-group j is 2; ``l3`` uint8 x 2, bit (2j + k) = L3 of micro-group k of sub-group j is 2.
"""

from __future__ import annotations

import torch

from .base import (NumberFormat, block_amax, floor_log2, pack_bits, pack_nibbles, pow2, scaled, unpack_bits,
                   unpack_nibbles)

S_MIN, S_MAX = 2.0**-48, 49152.0  # the clip range of the group scale S0
BF16_ONE_SEVENTH = 0.142578125  # bf16(1/7): 146/1024
M_MAX = 1.75
E6M2_BIAS = 48


def bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to bfloat16 (RNE) and back."""
    return x.to(torch.bfloat16).float()


def round_significant(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Round x > 0 to 1 + frac_bits significant bits: round(x / 2**e * 2**f) / 2**f * 2**e with
    e = floor(log2 x), torch.round (ties to even). The powers of two make it exact."""
    e, _ = floor_log2(x)
    return torch.round(x * pow2(frac_bits - e)) * pow2(e - frac_bits)


class HiF4(NumberFormat):
    name = "hif4"
    max_keep_blocks = 2  # the HiFloat4 paper's rule
    block_size = 64
    element_bits = 4
    scale_bits = 8 + 8 + 16  # S, the 8 L2 bits, the 16 L3 bits

    def __init__(self) -> None:
        super().__init__()

    def grid_values(self) -> torch.Tensor:
        m = torch.arange(8, dtype=torch.float32) / 4
        return torch.unique(torch.cat([m, m * 2, m * 4]))

    def _view_dims(self, block):
        return (8, 2, 4)

    def _scales(self, v, rho):
        M3 = block_amax(v)  # (*lead, nb, 8, 2, 1)
        M2 = M3.amax(-2, keepdim=True)  # (*lead, nb, 8, 1, 1)
        group_max = M2.amax(-3, keepdim=True)  # (*lead, nb, 1, 1, 1)
        M1 = scaled(group_max, rho)
        S = bf16(M1 * BF16_ONE_SEVENTH).clamp_(S_MIN, S_MAX)  # fp32 product (a representable scalar)
        S = round_significant(S, 7)  # a no-op on a bf16 value; kept because the spec has it
        S = round_significant(S, 2)  # to E6M2
        r = bf16(torch.ones_like(S) / S)  # a true division on every device (see base.div)
        L2 = torch.where(M2 * r >= 4, 2.0, 1.0)
        L3 = torch.where(M3 * r / L2 >= 2, 2.0, 1.0)
        return {"S": S, "r": r, "L2": L2, "L3": L3, "amax": group_max}

    def _quantize(self, v, s):
        m = v.abs().mul_(s["r"]).div_(s["L2"] * s["L3"])  # in place on our own temporary
        m = m.mul_(4).add_(0.5).floor_().div_(4).clamp_(max=M_MAX)  # half away from 0; >= 2 saturates
        return m.copysign_(v)  # sign(x) * m, keeping the sign bit of -0.0 too (see above)

    def _dequantize(self, q, s):
        # L2 * L3 * S is exact (powers of two times S) and small: one full-size product, not three
        return q * (s["L2"] * s["L3"] * s["S"])

    def _pack(self, q, s):
        codes = (q.abs() * 4).to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
        e, mant = floor_log2(s["S"].flatten(-4))  # (*lead, nb)
        scales = ((e + E6M2_BIAS) << 2 | ((mant - 1) * 4).to(torch.int32)).to(torch.uint8)
        return {"codes": pack_nibbles(codes.flatten(-4)), "scales": scales,
                "l2": pack_bits(s["L2"].flatten(-3) == 2).squeeze(-1),
                "l3": pack_bits(s["L3"].flatten(-3) == 2)}

    def _unpack(self, t, view_shape):
        lead_nb = view_shape[:-3]
        codes = unpack_nibbles(t["codes"], lead_nb[-1] * 64).reshape(view_shape)
        m = (codes & 7).float() / 4
        q = torch.where(codes >= 8, -m, m)  # -m keeps the stored -0
        S = pow2((t["scales"] >> 2).to(torch.int32) - E6M2_BIAS) * (1 + (t["scales"] & 3).float() / 4)
        L2 = 1.0 + unpack_bits(t["l2"].unsqueeze(-1)).float()
        L3 = 1.0 + unpack_bits(t["l3"]).float()
        return q, {"S": S.reshape(*lead_nb, 1, 1, 1), "L2": L2.reshape(*lead_nb, 8, 1, 1),
                   "L3": L3.reshape(*lead_nb, 8, 2, 1)}
