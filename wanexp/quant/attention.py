"""Quantized attention as an experiment axis (``attention=bf16 | fp8 | int8_sage``).

Every attention call of a denoiser, S = softmax(scale · Q Kᵀ), O = S V, with its operands in low
precision, composable with every weight/activation method and format:

* ``fp8`` (the FP8 attention of Hopper kernels): Q, K and V quantized to E4M3 with one fp32 scale
  per head and block of ``block`` tokens (amax / 448, round to nearest even, saturating); the
  products Q Kᵀ exact in fp32; softmax in fp32; P quantized to E4M3 per head and block of queries
  (scale amax / 448) before P V.
* ``int8_sage`` (SageAttention's recipe): K smoothed by subtracting its mean over the tokens
  (softmax is invariant to adding one constant per query row, and Q·mean(K) is exactly that, so
  the result does not change while K's outliers shared by every token stop costing INT8 range);
  Q and K quantized to INT8 per head and block (amax / 127, RNE); P V in fp16 (``pv: fp16``) or
  with P and V in E4M3 (``pv: fp8``).

The functions here are the plain-torch references: they define the numerics, and they are the
path that runs (on the CPU and, until a fused kernel exists, on the GPU too). :class:`AttentionMode`
applies one of them to every ``scaled_dot_product_attention`` call inside its scope (a
``TorchFunctionMode``: nothing global, only what runs inside the ``with``).

The seed papers' rows keep BF16 attention (``attention=bf16``, the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ATTENTION = ("bf16", "fp8", "int8_sage")
E4M3_MAX = 448.0


@dataclass(frozen=True)
class AttentionConfig:
    name: str = "bf16"
    block: int = 128        # tokens per quantization block (per batch and head)
    smooth_k: bool = True   # int8_sage: subtract K's mean over the tokens first
    pv: str = "fp16"        # int8_sage: P·V in fp16 | fp8

    def __post_init__(self) -> None:
        if self.name not in ATTENTION:
            raise ValueError(f"attention={self.name!r} is not one of {', '.join(ATTENTION)}")
        if self.block < 1:
            raise ValueError(f"attention.block={self.block} must be >= 1")
        if self.pv not in ("fp16", "fp8"):
            raise ValueError(f"attention.pv={self.pv!r} is not one of fp16, fp8")


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[B, H, S, D] -> [B, H, nb, block, D] (S zero-padded to whole blocks; zeros never raise an amax)."""
    s = x.shape[-2]
    pad = (-s) % block
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (x.shape[-2] // block, block)), s


def quantize_blocks(x: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """The values ``x [B, H, S, D]`` takes in ``kind`` ("int8" or "fp8") with one fp32 scale per
    (batch, head, block of tokens), as fp32."""
    v, s = _blocks(x.float(), block)
    amax = v.abs().amax(dim=(-2, -1), keepdim=True)
    qmax = 127.0 if kind == "int8" else E4M3_MAX
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    t = v / scale
    q = t.round().clamp(-127, 127) if kind == "int8" else t.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-3, -2)[..., :s, :]


def fp8_attention(q, k, v, scale: float | None = None, block: int = 128) -> torch.Tensor:
    """E4M3 Q, K, V and P (see the module docstring); ``q, k, v [B, H, S, D]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (quantize_blocks(t, block, "fp8") for t in (q, k, v))
    p = torch.softmax((qd @ kd.transpose(-1, -2)) * scale, dim=-1)
    pd = quantize_blocks(p, block, "fp8")
    return (pd @ vd).to(q.dtype)


def sage_attention(q, k, v, scale: float | None = None, block: int = 128, smooth_k: bool = True,
                   pv: str = "fp16") -> torch.Tensor:
    """INT8 Q Kᵀ with K smoothed by its mean over tokens, P V in fp16 or fp8 (see the module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=-2, keepdim=True)
    qd, kd = quantize_blocks(q, block, "int8"), quantize_blocks(kf, block, "int8")
    p = torch.softmax((qd @ kd.transpose(-1, -2)) * scale, dim=-1)
    if pv == "fp16":
        out = (p.half() @ v.half()).float()
    else:
        out = quantize_blocks(p, block, "fp8") @ quantize_blocks(v, block, "fp8")
    return out.to(q.dtype)


def attention(config: AttentionConfig, q, k, v, scale: float | None = None) -> torch.Tensor:
    """``config``'s attention of ``q, k, v [B, H, S, D]`` (bf16: PyTorch's SDPA)."""
    if config.name == "fp8":
        return fp8_attention(q, k, v, scale, config.block)
    if config.name == "int8_sage":
        return sage_attention(q, k, v, scale, config.block, config.smooth_k, config.pv)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class AttentionMode(TorchFunctionMode):
    """Inside ``with AttentionMode(config):`` every plain ``scaled_dot_product_attention`` call (no
    mask, no dropout, not causal: what Wan's attention calls) runs ``config``'s attention; any other
    call, and every other function, runs unchanged. ``calls`` counts the calls it replaced."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.config.name != "bf16":
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
            q, k, v = named["query"], named["key"], named["value"]
            extra = named
            plain = (extra.get("attn_mask") is None and not extra.get("dropout_p") and not extra.get("is_causal")
                     and not extra.get("enable_gqa") and q.shape[-3] == k.shape[-3])
            if plain:
                self.calls += 1
                return attention(self.config, q, k, v, extra.get("scale"))
        return func(*args, **kwargs)
