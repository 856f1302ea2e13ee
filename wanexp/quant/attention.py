"""Quantized attention as an experiment axis (``attention=bf16 | fp8 | int8_sage | fp8_cudnn``).

Every attention call of a denoiser, O = softmax(scale · Q Kᵀ) V, with its operands in low
precision, composable with every weight/activation method and format. The numerics are those of a
one-pass flash-attention kernel (FlashAttention-3's FP8 path, SageAttention2), so that a fused
kernel can compute exactly what is defined here:

* Q, K (and V where it is quantized) get one fp32 scale per (batch, head, block of ``block``
  tokens): ``scale = amax / qmax`` (IEEE division; 1 for an all-zero block), ``code = x / scale``
  rounded to nearest even: INT8 (qmax 127, clamped to ±127) or E4M3 (qmax 448, saturating).
  The codes' products are exact (FP8 products fit fp32; INT8 sums are integers).
* The scores are visited in blocks of ``block_n`` keys (``block % block_n == 0``, so one K and one
  V scale per key block), with the online softmax in base 2: s = (codes_Q · codes_Kᵀ) · (scale_Q ·
  scale · log2 e) · scale_K; m = the running row max; P̃ = 2^(s − m), in [0, 1]; l = l · 2^(m_old − m)
  + Σ P̃ (fp32, unquantized); acc = acc · 2^(m_old − m) + P̂ V̂; O = acc / l.
* P̂ is P̃ in low precision with a fixed scale, not an amax (a one-pass kernel has no row's amax
  over all keys): ``fp8`` and ``pv: fp8`` use E4M3(448 · P̃) with 1/448 and V's block scale folded
  into the product; ``pv: fp16`` uses fp16(P̃) and fp16(V).

Variants:

* ``fp8`` (FP8 attention on Hopper): Q, K, V in E4M3 per block, Q Kᵀ and P V on FP8 tensor cores.
* ``int8_sage`` (SageAttention's recipe): K smoothed by subtracting its mean over the tokens
  (softmax is invariant to adding one constant per query row, and Q·mean(K) is exactly that, so
  the result does not change while K's outliers shared by every token stop costing INT8 range);
  Q and K in INT8 per block, Q Kᵀ on INT8 tensor cores; P V in fp16 (``pv: fp16``) or with P and V
  in E4M3 (``pv: fp8``).
* ``fp8_cudnn`` (cuDNN's FP8 SDPA on Hopper, :mod:`wanexp.kernels.attention_cudnn`): one scale
  per tensor, as cuDNN takes them. K smoothed by its mean over the tokens (fp32), then Q, K and V
  each with one power-of-two scale s = 2^floor(log2(448 / amax)) (the largest with amax · s <=
  448) in E4M3 (RNE, saturating); scores in fp32, one softmax over the whole row; P8 = E4M3(256 · P̃);
  O = (P8 V8) / (256 s_V) / rowsum(P̃), written as E4M3(O · s_V) (Hopper's cuDNN stores O in FP8)
  and returned as bf16. cuDNN rounds P̃ against the running max of its key tiles instead, so the
  kernel agrees with :func:`cudnn_fp8_reference` to FP8 rounding (:data:`CUDNN_RTOL`), not bit for bit.

The functions here are the plain-torch references: they define the numerics and run on the CPU
(and wherever the fused kernel does not apply). :func:`attention` dispatches to the Triton kernels
of :mod:`wanexp.kernels.attention` (``fp8_cudnn``: to cuDNN) on a CUDA input when the fused path is
enabled; the Triton kernels produce
bit-exactly the quantized operands and agree with the references up to accumulation order, ``exp2``
rounding and the bf16 output rounding (relative Frobenius error below :data:`KERNEL_RTOL`, tested).
:class:`AttentionMode` applies :func:`attention` to every ``scaled_dot_product_attention`` call
inside its scope (a ``TorchFunctionMode``: nothing global, only what runs inside the ``with``).

The seed papers' rows keep BF16 attention (``attention=bf16``, the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from wanexp.quant import linear as _linear  # noqa: F401  (registers the wanexp::count_ op the mode counts with)

ATTENTION = ("bf16", "fp8", "int8_sage", "fp8_cudnn")
E4M3_MAX = 448.0
LOG2E = math.log2(math.e)
# Fused kernel vs reference, relative Frobenius error of the bf16 outputs: Triton's interpreter
# (the same fp32 arithmetic in another order) and a Hopper GPU (tensor-core accumulation order,
# FP8 products summed in the tensor cores' own precision, the hardware's approximate exp2).
# kernel vs reference, relative Frobenius: in the interpreter the same arithmetic; on the H200 the
# fp8 variant measured 0.0116 (S = 4096) and 0.0112 (589 keys) against 1e-2 first guessed: the GPU's
# approximate exp2 moves some P values across an E4M3 rounding boundary, and FP8 MMAs accumulate
# at reduced precision (2026-12-01)
KERNEL_RTOL = {"interpreter": 2e-3, "gpu": 2e-2}
# cuDNN's fp8 SDPA vs cudnn_fp8_reference, relative Frobenius: the H200 probe of 2026-12-01 measured
# 0.041 at the A14B 720p shape (P̃ rounded against the running max of cuDNN's key tiles, not the
# row's max, and O written in E4M3 from a differently rounded accumulator)
CUDNN_RTOL = 0.06
CUDNN_P_SCALE = 256.0        # P̃ in [0, 1] to E4M3: a power of two, so the descale is exact
# The reference's scores are processed a chunk of queries at a time, each chunk at most this many
# fp32 scores over all batches and heads (256 MiB), so a 720p call on the GPU fallback fits too.
CUDNN_CHUNK_SCORES = 1 << 26


@dataclass(frozen=True)
class AttentionConfig:
    name: str = "bf16"
    block: int = 128        # tokens per quantization block (per batch and head)
    smooth_k: bool = True   # int8_sage: subtract K's mean over the tokens first
    pv: str = "fp16"        # int8_sage: P·V in fp16 | fp8
    block_n: int = 64       # keys per online-softmax step (the kernel's BLOCK_N); divides block

    def __post_init__(self) -> None:
        if self.name not in ATTENTION:
            raise ValueError(f"attention={self.name!r} is not one of {', '.join(ATTENTION)}")
        if self.block < 1:
            raise ValueError(f"attention.block={self.block} must be >= 1")
        if self.pv not in ("fp16", "fp8"):
            raise ValueError(f"attention.pv={self.pv!r} is not one of fp16, fp8")
        if self.block_n < 1 or self.block % self.block_n:
            raise ValueError(f"attention.block_n={self.block_n} must be >= 1 and divide attention.block={self.block}")


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[B, H, S, D] -> [B, H, nb, block, D] (S zero-padded to whole blocks; zeros never raise an amax)."""
    s = x.shape[-2]
    pad = (-s) % block
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (x.shape[-2] // block, block)), s


def quantize_codes(x: torch.Tensor, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, S, D]`` in ``kind`` ("int8" or "fp8") with one fp32 scale per (batch, head, block
    of tokens): the codes (fp32 values of the INT8 / E4M3 grid, ``[B, H, S, D]``) and the scales
    (``[B, H, ceil(S / block)]``)."""
    v, s = _blocks(x.float(), block)
    amax = v.abs().amax(dim=(-2, -1), keepdim=True)
    qmax = 127.0 if kind == "int8" else E4M3_MAX
    # amax / a tensor, not / a Python float: CUDA divides by a scalar as a multiplication by its
    # reciprocal (not correctly rounded; found on the H200), and the kernels divide exactly (div_rn)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))
    t = v / scale
    q = t.round().clamp(-127, 127) if kind == "int8" else t.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return q.flatten(-3, -2)[..., :s, :], scale.flatten(-3)


def quantize_blocks(x: torch.Tensor, block: int, kind: str) -> torch.Tensor:
    """The values ``x [B, H, S, D]`` takes in ``kind`` ("int8" or "fp8") with one fp32 scale per
    (batch, head, block of tokens), as fp32."""
    codes, scale = quantize_codes(x, block, kind)
    return codes * scale.repeat_interleave(block, dim=-1)[..., :codes.shape[-2], None]


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """K's fp32 mean over the tokens, ``[B, H, 1, D]`` (one call, shared by the reference and the
    kernel path so that both quantize the same smoothed K)."""
    return k.mean(dim=-2, keepdim=True, dtype=torch.float32)


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def flash_reference(qc, qs, kc, ks, v_block, scale: float, block: int, block_n: int, out_dtype) -> torch.Tensor:
    """The blocked online softmax of the module docstring on quantized Q (codes ``qc``, scales
    ``qs``) and K, one key block at a time; ``v_block(j0, j1, p)`` returns P̂ V̂ of the keys
    [j0, j1) for the block's P̃ (fp32)."""
    sk = kc.shape[-2]
    row = (qs * (scale * LOG2E)).repeat_interleave(block, dim=-1)[..., :qc.shape[-2]]   # [B, H, Sq]
    m = torch.full(row.shape, float("-inf"), device=qc.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(*qc.shape[:-1], v_block.dim, device=qc.device)
    for j0 in range(0, sk, block_n):
        j1 = min(j0 + block_n, sk)
        s = (qc @ kc[..., j0:j1, :].transpose(-1, -2)) * (row * ks[..., j0 // block, None])[..., None]
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[..., None])
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + v_block(j0, j1, p)
        m = m_new
    return (acc / l[..., None]).to(out_dtype)


class _PV:
    """P̂ V̂ of one key block: fp16 (P̃ and V in fp16) or fp8 (E4M3(448 P̃), V in E4M3 per block)."""

    def __init__(self, v: torch.Tensor, kind: str, block: int) -> None:
        self.kind, self.block, self.dim = kind, block, v.shape[-1]
        if kind == "fp16":
            self.v = v.half().float()
        else:
            self.v, self.vs = quantize_codes(v, block, "fp8")

    def __call__(self, j0: int, j1: int, p: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp16":
            return p.half().float() @ self.v[..., j0:j1, :]
        pv = _e4m3(p * E4M3_MAX) @ self.v[..., j0:j1, :]
        return pv * (self.vs[..., j0 // self.block] * (1.0 / E4M3_MAX))[..., None, None]


def fp8_attention(q, k, v, scale: float | None = None, block: int = 128, block_n: int = 64) -> torch.Tensor:
    """E4M3 Q, K, V and P (see the module docstring); ``q, k, v [B, H, S, D]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    (qc, qs), (kc, ks) = quantize_codes(q, block, "fp8"), quantize_codes(k, block, "fp8")
    return flash_reference(qc, qs, kc, ks, _PV(v, "fp8", block), scale, block, block_n, q.dtype)


def sage_attention(q, k, v, scale: float | None = None, block: int = 128, smooth_k: bool = True,
                   pv: str = "fp16", block_n: int = 64) -> torch.Tensor:
    """INT8 Q Kᵀ with K smoothed by its mean over tokens, P V in fp16 or fp8 (see the module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float() - k_mean(k) if smooth_k else k
    (qc, qs), (kc, ks) = quantize_codes(q, block, "int8"), quantize_codes(kf, block, "int8")
    return flash_reference(qc, qs, kc, ks, _PV(v, pv, block), scale, block, block_n, q.dtype)


def pow2_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The largest power of two s with max|x| · s <= 448 (fp32 scalar tensor; 1 for an all-zero x):
    2^floor(log2(448 / amax)) by fp32 log2, then corrected by one step either way where the
    division and the log2 rounded across a power of two."""
    amax = x.abs().amax().float()
    e = torch.floor(torch.log2(E4M3_MAX / amax.clamp_min(torch.finfo(torch.float32).tiny))).clamp(-126, 126)
    e = torch.where(amax * torch.exp2(e) > E4M3_MAX, e - 1, e)
    e = torch.where((amax * torch.exp2(e + 1) <= E4M3_MAX) & (e < 126), e + 1, e)
    return torch.where(amax > 0, torch.exp2(e), torch.ones_like(amax))


def e4m3_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn of x · scale, round to nearest even, saturating at ±448."""
    return torch.clamp(x.float() * scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def cudnn_fp8_operands(q, k, v):
    """``fp8_cudnn``'s quantized operands: (q8, k8, v8) in float8_e4m3fn and their scales
    (s_q, s_k, s_v), K smoothed by :func:`k_mean` in fp32 first."""
    ks = k.float() - k_mean(k)
    scales = [pow2_tensor_scale(t) for t in (q, ks, v)]
    return tuple(e4m3_tensor(t, s) for t, s in zip((q, ks, v), scales)) + tuple(scales)


def cudnn_fp8_reference(q, k, v, scale: float | None = None, chunk: int | None = None) -> torch.Tensor:
    """``fp8_cudnn`` (see the module docstring) in plain torch, ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``;
    the queries ``chunk`` rows at a time (default: :data:`CUDNN_CHUNK_SCORES` scores a chunk), so no
    score matrix larger than chunk x Sk per head is held; each row still sees all its keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q8, k8, v8, s_q, s_k, s_v = cudnn_fp8_operands(q, k, v)
    b, h, sq, _ = q.shape
    chunk = chunk or max(1, CUDNN_CHUNK_SCORES // max(1, b * h * k.shape[-2]))
    kt, vf = k8.float().transpose(-1, -2), v8.float()
    score_scale = scale / (s_q * s_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for i0 in range(0, sq, chunk):
        s = (q8[..., i0:i0 + chunk, :].float() @ kt) * score_scale
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        o = (_e4m3(p * CUDNN_P_SCALE) @ vf) / (CUDNN_P_SCALE * s_v) / p.sum(dim=-1, keepdim=True)
        out[..., i0:i0 + chunk, :] = (e4m3_tensor(o, s_v).float() / s_v).to(q.dtype)
    return out


def _fused(config: AttentionConfig, q, k, v) -> bool:
    """The Triton kernel runs this call (:mod:`wanexp.kernels.attention`)."""
    if not q.is_cuda:
        return False
    from wanexp import kernels
    if not (kernels.fused_enabled() and kernels.triton_available()):
        return False
    from wanexp.kernels.attention import supports
    return supports(q, k, v, config.block, config.block_n)


def _on_cudnn(q, k, v) -> bool:
    """cuDNN's FP8 SDPA runs this ``fp8_cudnn`` call (:mod:`wanexp.kernels.attention_cudnn`)."""
    if not q.is_cuda:
        return False
    from wanexp import kernels
    if not kernels.fused_enabled():
        return False
    from wanexp.kernels import attention_cudnn
    return attention_cudnn.available(q.device) and attention_cudnn.supports(q, k, v)


def attention(config: AttentionConfig, q, k, v, scale: float | None = None) -> torch.Tensor:
    """``config``'s attention of ``q, k, v [B, H, S, D]`` (bf16: PyTorch's SDPA): the Triton kernel
    (``fp8_cudnn``: cuDNN's) on a CUDA input it supports while the fused path is enabled, the
    reference otherwise."""
    if config.name == "bf16":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if config.name == "fp8_cudnn":
        if _on_cudnn(q, k, v):
            from wanexp.kernels.attention_cudnn import cudnn_fp8_attention
            return cudnn_fp8_attention(q, k, v, scale)
        return cudnn_fp8_reference(q, k, v, scale)
    if _fused(config, q, k, v):
        from wanexp.kernels.attention import quantized_attention
        mean = k_mean(k) if config.name == "int8_sage" and config.smooth_k else None
        return quantized_attention(q, k, v, config.name, scale, config.block, config.block_n, mean, config.pv)
    if config.name == "fp8":
        return fp8_attention(q, k, v, scale, config.block, config.block_n)
    return sage_attention(q, k, v, scale, config.block, config.smooth_k, config.pv, config.block_n)


class AttentionMode(TorchFunctionMode):
    """Inside ``with AttentionMode(config):`` every plain ``scaled_dot_product_attention`` call (no
    mask, no dropout, not causal: what Wan's attention calls) runs ``config``'s attention; any other
    call, and every other function, runs unchanged. ``calls`` counts the calls it replaced (kept
    in a CPU tensor that a custom op adds to: a Python int would be guarded on by a compiled block,
    which then recompiled at every call)."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.counter = torch.zeros(1, dtype=torch.int64)

    @property
    def calls(self) -> int:
        return int(self.counter[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.config.name != "bf16":
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
            q, k, v = named["query"], named["key"], named["value"]
            extra = named
            plain = (extra.get("attn_mask") is None and not extra.get("dropout_p") and not extra.get("is_causal")
                     and not extra.get("enable_gqa") and q.shape[-3] == k.shape[-3])
            if plain:
                torch.ops.wanexp.count_(self.counter, 0)
                return attention(self.config, q, k, v, extra.get("scale"))
        return func(*args, **kwargs)
