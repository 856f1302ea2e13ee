"""The synthetic W4A4 layers and inputs the GPU benches share (core, pipeline, kernels): TS-clip-shaped
QuantLinears built from random weights without calibration, and a denoiser input at a resolution.
Speed and memory do not depend on the values, so no calibration is needed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from wanexp.formats import get_format
from wanexp.quant.linear import QuantLinear


@dataclass
class SyntheticTSClip:
    """Builds a TS-clip-shaped W4A4 MXFP4 QuantLinear from a bf16 linear, without calibration:
    smoothing s ~ U[0.5, 2] (folded into the weight), random rank-r factors L1 L2 (bf16), RTN
    residual of W·diag(s) − L1 L2, and a clip table (one ratio per timestep bin)."""

    rank: int = 32
    smooth: bool = True
    clip_table: tuple[float, ...] = (1.0, 0.9, 0.8, 0.9)
    scale_rule: str = "floor"
    seed: int = 0
    format: str = "mxfp4"  # or nvfp4, int4, hif4: weights and activations in that format (its defaults)

    def build(self, name: str, linear: nn.Linear) -> QuantLinear:
        dev = linear.weight.device
        g = torch.Generator(device=dev).manual_seed(self.seed + hash(name) % 100003)
        k, n = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        s = None
        if self.smooth:
            s = torch.rand(k, device=dev, generator=g) * 1.5 + 0.5
            w = w * s
        lowrank = None
        if self.rank:
            std = float(w.std()) / self.rank ** 0.5
            l1 = (torch.randn(n, self.rank, device=dev, generator=g) * std).to(torch.bfloat16)
            l2 = torch.randn(self.rank, k, device=dev, generator=g).to(torch.bfloat16)
            lowrank = (l1, l2)
            w = w - l1.float() @ l2.float()
        opts = {"scale_rule": self.scale_rule} if self.format == "mxfp4" else {"group_size": 128} if self.format == "int4" else {}
        fmt = {"name": self.format, "opts": opts}
        packed = get_format(self.format, **opts).encode(w)
        del w
        return QuantLinear(k, n, weight=packed, bias=linear.bias, act_format=fmt,
                           clip_table=torch.tensor(self.clip_table, device=dev), smooth=s, lowrank=lowrank)


def make_inputs(height: int, width: int, frames: int, device: torch.device, seed: int = 1) -> tuple[dict, int]:
    lat_f, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(1, 36, lat_f, lat_h, lat_w, device=device, dtype=torch.bfloat16, generator=g),
                  timestep=torch.tensor([950.0], device=device),
                  encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=g))
    return inputs, lat_f * (lat_h // 2) * (lat_w // 2)


def attention_scope(path: str) -> contextlib.AbstractContextManager:
    """``AttentionMode`` of a bench path or video precision "<name>+attn_<attention>[_compiled]" (every SDPA
    call quantized), else nothing."""
    name = path.removesuffix("_compiled").partition("+attn_")[2]
    if not name:
        return contextlib.nullcontext()
    from wanexp.quant.attention import AttentionConfig, AttentionMode
    return AttentionMode(AttentionConfig(name))
