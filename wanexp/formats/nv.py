"""NVFP4 (NVIDIA): E2M1 elements, an FP8 E4M3 scale per 16, and a per-tensor FP32 scale.

    s_tensor = amax_tensor / (6 * 448)            fp32, so the largest block scale maps to E4M3's 448
    s_E4M3   = RNE_E4M3(rho * amax_block / 6 / s_tensor)
    element  = E2M1_round(x / (s_E4M3 * s_tensor))

(all arithmetic fp32, in that order). ``clip_ratio`` scales the block amax only: the tensor scale
just sets E4M3's range. A zero tensor (or one so small that s_tensor underflows) uses s_tensor = 1;
a block whose E4M3 scale underflows to 0 stores zeros.

Per-tensor scale and GPTQ: by default amax_tensor is the amax of the tensor passed in, which for
``block_state`` on a column block would be that block's amax. Pass ``tensor_amax=`` (float or 0-dim
tensor, e.g. ``W.abs().amax()`` of the layer's weight before GPTQ) to ``block_state``,
``quantize_dequantize`` and ``encode`` alike to fix it for the whole layer; activations can pass
a calibrated value the same way (block scales above 448 * s_tensor then saturate at 448).

``ties``: E2M1 rounding, ``"even"`` (default) or ``"toward_zero"`` (see :mod:`.e2m1`).

Storage: ``codes`` uint8 (two E2M1 codes a byte), ``scales`` torch.float8_e4m3fn per block,
``tensor_scale`` fp32 0-dim.
"""

from __future__ import annotations

import torch

from .base import block_amax, div, safe_divisor, scaled
from .e2m1 import E2M1_MAX, E2M1Format

E4M3_MAX = 448.0


class NVFP4(E2M1Format):
    name = "nvfp4"
    block_size = 16
    scale_bits = 8

    def __init__(self, ties: str = "even") -> None:
        super().__init__(ties)

    def shared_state_options(self, w):
        """One per-tensor scale for the whole weight: from its amax before GPTQ changes any column."""
        return {"tensor_amax": w.abs().amax()}

    def _scales(self, v, rho, tensor_amax=None):
        block_max = block_amax(v)
        if tensor_amax is None:  # the largest block max is the tensor's
            amax_t = block_max.amax() if block_max.numel() else v.new_zeros(())
        else:
            amax_t = torch.as_tensor(tensor_amax, dtype=torch.float32, device=v.device).reshape(())
        s_t = div(amax_t, E2M1_MAX * E4M3_MAX)
        s_t = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
        s_block = div(scaled(block_max, rho), E2M1_MAX)
        # clamp: the cast saturates in recent torch, but not in every version
        s_e4m3 = (s_block / s_t).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
        return {"d": s_e4m3 * s_t, "s_e4m3": s_e4m3, "s_tensor": s_t, "amax": block_max}

    def _quantize(self, v, s):
        return self._round(v / safe_divisor(s["d"]))

    def _dequantize(self, q, s):
        return q * s["d"]

    def _pack(self, q, s):
        return {"codes": self._pack_codes(q),
                "scales": s["s_e4m3"].squeeze(-1).to(torch.float8_e4m3fn),
                "tensor_scale": s["s_tensor"].clone()}

    def _unpack(self, t, view_shape):
        s_e4m3 = t["scales"].float().unsqueeze(-1)
        s_t = t["tensor_scale"].float()
        return self._unpack_codes(t["codes"], view_shape), {"d": s_e4m3 * s_t}
