"""Symmetric integer formats, INT4 and INT8, with one 16-bit scale per group.

    scale = storage_dtype(rho * amax_group / qmax)         qmax = 7 (INT4) or 127 (INT8)
    code  = clamp(round_half_even(x / scale), -qmax, qmax)

``group_size``: elements per group along the last dim (INT4 default 128, the weight setting);
-1 = one group per row, i.e. per output channel for weights, per token for activations (INT8's
default). The scale is rounded to its storage dtype (``scale_dtype``, default bfloat16: it has
fp32's range, so no activation amax can overflow it; "float16" and "float32" are options) *before*
use, so what is stored is exactly what quantized the codes. Scales past the storage range saturate.
Integer codes have no -0: a negative value that rounds to 0 gives +0.

Storage: INT4 ``codes`` uint8, two 4-bit two's-complement codes a byte; INT8 ``codes`` int8;
``scales`` in ``scale_dtype`` per group.
"""

from __future__ import annotations

import torch

from .base import (NumberFormat, block_amax, div, dtype_from_name, pack_nibbles, safe_divisor, scaled,
                   unpack_nibbles)

_SCALE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


class IntFormat(NumberFormat):
    def __init__(self, bits: int, group_size: int, scale_dtype: str = "bfloat16") -> None:
        if not (group_size == -1 or group_size > 0):
            raise ValueError(f"int{bits}: group_size must be positive or -1, got {group_size}")
        if scale_dtype not in _SCALE_BITS:
            raise ValueError(f"int{bits}: scale_dtype must be one of {sorted(_SCALE_BITS)}, "
                             f"got {scale_dtype!r}")
        super().__init__(group_size=group_size, scale_dtype=scale_dtype)
        self.name = f"int{bits}"
        self.element_bits = bits
        self.qmax = 2 ** (bits - 1) - 1
        self.block_size = group_size
        self.scale_bits = _SCALE_BITS[scale_dtype]
        self.scale_dtype = dtype_from_name(scale_dtype)

    def grid_values(self) -> torch.Tensor:
        return torch.arange(self.qmax + 1, dtype=torch.float32)

    def _scales(self, v, rho):
        block_max = block_amax(v)
        scale = div(scaled(block_max, rho), self.qmax)
        big = torch.finfo(self.scale_dtype).max
        return {"scale": scale.clamp(max=big).to(self.scale_dtype).float(), "amax": block_max}

    def _quantize(self, v, s):
        q = (v / safe_divisor(s["scale"])).round_().clamp_(-self.qmax, self.qmax)
        return q.add_(0.0)  # -0.0 + 0.0 = +0.0: the stored integer code has no negative zero

    def _dequantize(self, q, s):
        return q * s["scale"]

    def _pack(self, q, s):
        codes = q.flatten(-2).to(torch.int8)
        if self.element_bits == 4:
            codes = pack_nibbles(codes.view(torch.uint8) & 15)  # two's complement nibbles
        return {"codes": codes, "scales": s["scale"].squeeze(-1).to(self.scale_dtype)}

    def _unpack(self, t, view_shape):
        n = view_shape[-2] * view_shape[-1]
        codes = t["codes"]
        if self.element_bits == 4:
            nib = unpack_nibbles(codes, n).to(torch.int8)
            codes = torch.where(nib >= 8, nib - 16, nib)  # sign-extend the nibble
        q = codes.float().reshape(view_shape)
        return q, {"scale": t["scales"].float().unsqueeze(-1)}


def INT4(group_size: int = 128, scale_dtype: str = "bfloat16") -> IntFormat:
    return IntFormat(4, group_size, scale_dtype)


def INT8(group_size: int = -1, scale_dtype: str = "bfloat16") -> IntFormat:
    return IntFormat(8, group_size, scale_dtype)
