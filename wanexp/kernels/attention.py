"""Quantized flash attention (forward only) in Triton: the kernels of ``attention=fp8 | int8_sage``.

The numerics are defined by the plain-torch references of :mod:`wanexp.quant.attention` (module
docstring there); this module computes the same thing in two kernels a call:

1. ``_quantize_kernel`` (one program per (batch·head, block of ``block`` tokens), two passes over
   the block: its amax, then the codes): scale = amax / qmax with IEEE division (1 for an all-zero
   block), code = RNE(x / scale) as INT8 (clamped to ±127) or E4M3 (saturating at 448, the bits
   built by hand, so Triton's interpreter, whose casts truncate, gives the same bits). Bit-exact
   against ``quantize_codes`` (tested). For ``int8_sage`` K's fp32 mean over the tokens
   (``k_mean``, the very torch call the reference makes) is subtracted in the kernel first. K and
   V are written zero-padded to whole key tiles, so the attention loop loads them without masks;
   V for an FP8 P·V is written transposed ([D, S], tokens contiguous) so that both FP8 wgmma
   operands are K-major, as Hopper's FP8 tensor cores require.
2. ``_attention_kernel`` (one program per (block of BLOCK_M queries, batch·head)): Q's codes stay
   in registers; for each tile of BLOCK_N = ``block_n`` keys: ``tl.dot`` of the FP8 (fp32
   accumulation) or INT8 (int32 accumulation) codes, the scores scaled to base 2 (scale · log2 e
   and Q's scale folded per row, K's per tile), the online softmax in fp32 with ``exp2``, P̃ in
   [0, 1] to E4M3(448 · P̃) (the hardware's RNE cast) or fp16, P̂ · V̂ on FP8 or FP16 tensor
   cores, V's block scale and 1/448 applied to the tile's product. The key tail is masked in one
   last step only (full tiles run unmasked). Output bf16.

BLOCK_N is the reference's ``block_n`` (it changes the numerics: the running max and so P̂'s
rounding); BLOCK_M, warps and stages do not, and ``triton.autotune`` picks them per (Sq, Sk, D)
on the GPU. Supported: CUDA (or the interpreter), bf16 ``[B, H, S, D]`` (any strides with
unit stride on D), D in :data:`HEAD_DIMS`, ``block_n`` in :data:`BLOCK_NS`, the same B, H and D
for Q, K and V (Sq and Sk may differ: cross-attention); anything else runs the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

HEAD_DIMS = (32, 64, 128)   # FP8 / INT8 wgmma needs K >= 32 on Q Kᵀ's head dimension
BLOCK_NS = (32, 64, 128)
LOG2E = 1.4426950408889634
_SUB = 32                   # rows per step of the quantizer's loops (divides every supported block)
# Attention variants: 0 FP8 Q Kᵀ + FP8 P V; 1 INT8 Q Kᵀ + FP16 P V; 2 INT8 Q Kᵀ + FP8 P V.
_KIND = {("fp8", "fp16"): 0, ("fp8", "fp8"): 0, ("int8_sage", "fp16"): 1, ("int8_sage", "fp8"): 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- quantizer


@triton.jit
def _e4m3_bits(t):
    """float8_e4m3fn bits (uint8) of a finite fp32 |t| <= 448, round to nearest even as torch's
    cast (subnormals on the 2^-9 grid, the sign of -0 kept)."""
    a = tl.abs(t)
    b = a.to(tl.int32, bitcast=True)
    r = (b + (0x7FFFF + ((b >> 20) & 1))) & -1048576                  # RNE to 3 mantissa bits
    normal = ((((r >> 23) & 255) - 120) << 3) | ((r >> 20) & 7)     # exponent bias 127 -> 7
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)         # 0..8 (8 = the smallest normal)
    bits = tl.where(a >= 0.015625, normal, sub)
    return (bits | tl.where(t.to(tl.int32, bitcast=True) < 0, 128, 0)).to(tl.uint8)


@triton.jit
def _load_rows(base, mean_ptr, rows, S, stride_s, offs_d, HAS_MEAN: tl.constexpr):
    """Rows ``rows`` of one (batch, head) in fp32, K's mean subtracted where given; 0 beyond S."""
    inside = rows[:, None] < S
    x = tl.load(base + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :], mask=inside, other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        x = tl.where(inside, x - tl.load(mean_ptr + offs_d)[None, :], 0.0)
    return x


@triton.jit
def _quantize_kernel(x_ptr, mean_ptr, codes_ptr, scale_ptr, S, S_pad, H, NB, QB, stride_b, stride_h, stride_s,
                     INT8: tl.constexpr, QMAX: tl.constexpr, HAS_MEAN: tl.constexpr, TRANSPOSE: tl.constexpr,
                     D: tl.constexpr, SUB: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    base = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    mean_ptr = mean_ptr + bh * D
    offs_d = tl.arange(0, D)
    r0 = blk * QB
    amax = tl.zeros([D], dtype=tl.float32)
    for i in range(0, QB, SUB):
        x = _load_rows(base, mean_ptr, r0 + i + tl.arange(0, SUB), S, stride_s, offs_d, HAS_MEAN)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    a = tl.max(amax, axis=0)
    scale = tl.where(a > 0, tl.math.div_rn(a, QMAX), 1.0)
    tl.store(scale_ptr + bh * NB + blk, scale)
    out = codes_ptr + bh.to(tl.int64) * S_pad * D
    for i in range(0, QB, SUB):
        rows = r0 + i + tl.arange(0, SUB)
        t = tl.math.div_rn(_load_rows(base, mean_ptr, rows, S, stride_s, offs_d, HAS_MEAN), scale)
        if INT8:
            r = tl.minimum((tl.abs(t) + 8388608.0) - 8388608.0, 127.0)   # RNE (|t| < 2^22), clamped
            code = tl.where(t < 0, -r, r).to(tl.int8)
        else:
            code = _e4m3_bits(tl.minimum(tl.maximum(t, -448.0), 448.0))
        keep = rows[:, None] < S_pad
        if TRANSPOSE:   # [D, S_pad]: tokens contiguous (V as the K-major operand of an FP8 P V)
            tl.store(out + offs_d[None, :] * S_pad + rows[:, None], code, mask=keep)
        else:
            tl.store(out + rows[:, None] * D + offs_d[None, :], code, mask=keep)


def quantize(x: torch.Tensor, kind: str, block: int, pad_to: int = 1, mean: torch.Tensor | None = None,
             transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, S, D]`` (unit stride on D) in ``kind`` ("int8" | "fp8") per (batch, head, block
    of ``block`` tokens), ``mean [B, H, 1, D]`` (fp32) subtracted first where given: the codes
    (int8 or float8_e4m3fn, ``[B, H, S_pad, D]``, or ``[B, H, D, S_pad]`` transposed; S_pad = S
    rounded up to ``pad_to``, zeros there) and the fp32 scales ``[B, H, ceil(S / block)]``."""
    B, H, S, D = x.shape
    assert x.stride(-1) == 1 and block % _SUB == 0
    s_pad = triton.cdiv(S, pad_to) * pad_to
    nb = triton.cdiv(S, block)
    assert triton.cdiv(s_pad, block) == nb, "pad_to must divide block"
    int8 = kind == "int8"
    shape = (B, H, D, s_pad) if transpose else (B, H, s_pad, D)
    codes = torch.empty(shape, device=x.device, dtype=torch.int8 if int8 else torch.uint8)
    scales = torch.empty(B, H, nb, device=x.device, dtype=torch.float32)
    m = mean.contiguous() if mean is not None else scales
    _quantize_kernel[(nb, B * H)](x, m, codes, scales, S, s_pad, H, nb, block, x.stride(0), x.stride(1), x.stride(2),
                                  INT8=int8, QMAX=127.0 if int8 else 448.0, HAS_MEAN=mean is not None, TRANSPOSE=transpose, D=D, SUB=_SUB,
                                  num_warps=4)
    return (codes if int8 else codes.view(torch.float8_e4m3fn)), scales


# ----------------------------------------------------------------------------- attention


@triton.jit
def _to_bf16(v, HW_CAST: tl.constexpr):
    if HW_CAST:
        return v.to(tl.bfloat16)
    b = v.to(tl.int32, bitcast=True)   # RNE from the bits (the interpreter's cast truncates)
    b = b + (0x7FFF + ((b >> 16) & 1))
    return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _p_e4m3(p, HW_CAST: tl.constexpr):
    """E4M3(448 · P̃), round to nearest even (P̃ in [0, 1])."""
    x = p * 448.0
    if HW_CAST:
        return x.to(tl.float8e4nv)
    return _e4m3_bits(x).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _key_tile(acc, l_i, m_i, q, qrow, k_base, ks_base, v_base, vs_base, start_n, Sk, Sk_pad, QB,
              KIND: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              HW_CAST: tl.constexpr):
    """One online-softmax step over the keys [start_n, start_n + BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kt = tl.load(k_base + offs_n[None, :] * D + offs_d[:, None])               # [D, BLOCK_N], K-major
    if KIND == 0:
        qk = tl.dot(q, kt)
    else:
        qk = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
    s = qk * (qrow * tl.load(ks_base + start_n // QB))[:, None]               # base-2 scores
    if MASK:
        s = tl.where(offs_n[None, :] < Sk, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if KIND == 1:
        v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :])             # fp16 [BLOCK_N, D]
        acc = tl.dot(p.to(tl.float16), v, acc)
    else:
        v = tl.load(v_base + offs_d[None, :] * Sk_pad + offs_n[:, None])        # from [D, Sk_pad]: K-major
        vs = tl.load(vs_base + start_n // QB) * (1.0 / 448.0)
        acc += tl.dot(_p_e4m3(p, HW_CAST), v) * vs
    return acc, l_i, m_new


@triton.jit
def _attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, sm_log2, Sq, Sk, Sk_pad, NBQ, NBK, QB,
                      KIND: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HW_CAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < Sq
    q_ptrs = q_ptr + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    if KIND == 0:
        q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=rows[:, None], other=0)
    qrow = tl.load(qs_ptr + bh * NBQ + offs_m // QB, mask=rows, other=0.0) * sm_log2
    k_base = k_ptr + bh * Sk_pad * D
    v_base = v_ptr + bh * Sk_pad * D
    ks_base = ks_ptr + bh * NBK
    vs_base = vs_ptr + bh * NBK
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, qrow, k_base, ks_base, v_base, vs_base, start_n, Sk, Sk_pad, QB,
                                  KIND, D, BLOCK_N, False, HW_CAST)
    if full < Sk:   # the tail tile, masked (its padded keys hold zero codes)
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, qrow, k_base, ks_base, v_base, vs_base, full, Sk, Sk_pad, QB,
                                  KIND, D, BLOCK_N, True, HW_CAST)
    out = _to_bf16(acc / l_i[:, None], HW_CAST)
    tl.store(o_ptr + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], out, mask=rows[:, None])


# BLOCK_M, warps and stages leave the numerics unchanged (rows are independent); Hopper starting points.
# ptxas (sm_90a, D = 128): BLOCK_M 128 with 8 warps spills nothing at BLOCK_N = 64 (the default
# block_n) and ~300 bytes at BLOCK_N = 128; BLOCK_M 64 with 4 warps spills ~240 bytes at 64.
_CONFIGS = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((128, 8, 3), (128, 8, 4), (128, 8, 2), (64, 4, 3))]
_attention_tuned = triton.autotune(configs=_CONFIGS, key=["Sq", "Sk", "KIND", "D", "BLOCK_N"])(_attention_kernel)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 128, block_n: int = 64) -> bool:
    """Shapes and dtypes the kernels take (see the module docstring)."""
    return (q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (q, k, v))
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] == v.shape[3] and q.shape[3] in HEAD_DIMS
            and q.shape[2] > 0 and k.shape[2] > 0 and block_n in BLOCK_NS and block % block_n == 0)


def _launch(q, k, v, name: str, scale: float, block: int, block_n: int, k_mean: torch.Tensor | None,
            pv: str) -> torch.Tensor:
    kind = _KIND[(name, pv)]
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if kind == 0:
        qc, qs = quantize(q, "fp8", block)
        kc, ks = quantize(k, "fp8", block, pad_to=block_n)
    else:
        qc, qs = quantize(q, "int8", block)
        kc, ks = quantize(k, "int8", block, pad_to=block_n, mean=k_mean)
    if kind == 1:
        sk_pad = triton.cdiv(Sk, block_n) * block_n
        vc = torch.zeros(B, H, sk_pad, D, device=v.device, dtype=torch.float16)
        vc[:, :, :Sk] = v
        vs = ks   # unused
    else:
        vc, vs = quantize(v, "fp8", block, pad_to=block_n, transpose=True)
    out = torch.empty(B, H, Sq, D, device=q.device, dtype=torch.bfloat16)
    args = (qc, qs, kc, ks, vc, vs, out, scale * LOG2E, Sq, Sk, kc.shape[2], qs.shape[2], ks.shape[2], block)
    if _interpreting():
        _attention_kernel[(triton.cdiv(Sq, 32), B * H)](*args, KIND=kind, D=D, BLOCK_M=32, BLOCK_N=block_n,
                                                        HW_CAST=False)
    else:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attention_tuned[grid](*args, KIND=kind, D=D, BLOCK_N=block_n, HW_CAST=True)
    return out


@torch.library.custom_op("wanexp::quantized_attention", mutates_args=())
def _quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, scale: float, block: int,
                         block_n: int, k_mean: torch.Tensor | None, pv: str) -> torch.Tensor:
    """``attention=name`` of bf16 ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]`` -> bf16 ``[B, H, Sq, D]``
    (``k_mean``: int8_sage's fp32 K mean over the tokens, None without smoothing)."""
    return _launch(q, k, v, name, scale, block, block_n, k_mean, pv)


@_quantized_attention.register_fake
def _(q, k, v, name, scale, block, block_n, k_mean, pv):
    return q.new_empty(q.shape, dtype=torch.bfloat16)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, scale: float,
                        block: int = 128, block_n: int = 64, k_mean: torch.Tensor | None = None,
                        pv: str = "fp16") -> torch.Tensor:
    """The fused ``fp8`` | ``int8_sage`` attention (one custom op, ``wanexp::quantized_attention``,
    which ``torch.compile`` keeps whole); the caller checks :func:`supports` and, for a smoothed
    int8_sage, passes K's fp32 mean over the tokens (``wanexp.quant.attention.k_mean``)."""
    return torch.ops.wanexp.quantized_attention(q, k, v, name, float(scale), int(block), int(block_n), k_mean, pv)


__all__ = ["BLOCK_NS", "HEAD_DIMS", "quantize", "quantized_attention", "supports"]
