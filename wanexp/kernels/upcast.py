"""Fused W4A4 for INT4, NVFP4 and HiFloat4: one Triton pass quantizes the activations, then the
reference path's own GEMMs run on exactly its operands.

An INT4 value is a 4-bit code times a bf16 group scale: 3 + 8 significant bits, which no FP8 or
bf16 operand holds exactly, and its scale changes every 128 K, so no single tensor-core GEMM takes
the codes directly. What costs in the torch path is not the GEMM but the fake-quantization of the
activations (a dozen elementwise passes over M×K in fp32). Here it is one kernel that reads x once
and writes the bf16 values the reference computes, bit for bit (tested); the weight is decoded
with ``QuantLinear.dequantized_weight`` and the GEMMs are the reference's, so the layer's output
equals the reference path's exactly.

INT4 (``wanexp.formats.integer``), per group of G channels (G = the format's ``group_size``,
a power of two from 32 to 256 dividing K), with v = x_s = bf16(x · r) in fp32 and rho the bin's clip ratio:

    scale = bf16(min(rho · max|v| / 7, bf16 max))        (fp32 product, IEEE division, RNE to bf16)
    q     = clamp(RNE(v / scale), −7, 7)  (+0 for −0);   q = 0 where scale == 0
    xq    = bf16(q · scale)

NVFP4 (``wanexp.formats.nv``), blocks of 16, after a first pass for the tensor's max |v|:

    s_t   = max|v|_tensor / 2688  (1 if that is 0);   s_b = RNE_E4M3(min(rho · max|v|_block / 6 / s_t, 448))
    d     = s_b · s_t;   q = E2M1_RNE(v / d) (saturating at 6, sign kept, 0 where d == 0);   xq = bf16(q · d)

every division IEEE, the E4M3 rounding done on the bits (subnormals included), as torch's cast.

HiFloat4 (``wanexp.formats.hifloat``, FORMATS.md), groups of 64 = 8 sub-groups × 2 micro-groups × 4,
each step in the spec's order and precision: S from bf16(rho · M1 · bf16(1/7)) clipped to
[2^-48, 49152] and rounded to 2 fractional bits, r = bf16(1/S), the L2/L3 bits, m = floor(4·|x|·r /
(L2·L3) + 1/2) / 4 saturating at 1.75, the sign bit of x kept; the value m·L2·L3·S is exact in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4 import _e2m1_round, _recip_tile, _to_bf16_rne

_BF16_MAX = tl.constexpr(3.3895313892515355e38)  # a jit kernel reads module globals only as constexpr


@triton.jit
def _with_sign_of(mag, v):
    """``mag`` (>= 0, fp32) with the sign bit of ``v``, -0 included, set on the bits: the compiled
    kernel lowers ``-q`` of a zero to 0 - q = +0 (the interpreter keeps -0)."""
    bits = mag.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_groups(x_ptr, recip_ptr, M, K, stride_xm, HAS_SMOOTH: tl.constexpr, G: tl.constexpr,
                 BLOCK_M: tl.constexpr, NG: tl.constexpr):
    """This program's tile of x as [BLOCK_M rows, NG groups, G channels] in fp32, smoothed as the
    reference smooths (bf16(x · r), one fp32 multiplication); with its pointers' rows, columns and mask."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rg = tl.program_id(1) * NG + tl.arange(0, NG)
    cols = rg[None, :, None] * G + tl.arange(0, G)[None, None, :]          # [1, NG, G]
    rows = rm[:, None, None]
    mask = (rows < M) & (cols < K)
    x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
    if HAS_SMOOTH:
        v = _to_bf16_rne(x.to(tl.float32) * _recip_tile(recip_ptr, rows, cols, mask)).to(tl.float32)
    else:
        v = x.to(tl.float32)
    return v, rows, cols, mask


@triton.jit
def _int_act_quant_kernel(x_ptr, recip_ptr, clip_ptr, bin_idx, xq_ptr, scale_ptr, M, K, stride_xm, QMAX: tl.constexpr,
                          HAS_SMOOTH: tl.constexpr, CODES: tl.constexpr, HW: tl.constexpr, G: tl.constexpr,
                          BLOCK_M: tl.constexpr, NG: tl.constexpr):
    """The INT quantizer of the module docstring on [BLOCK_M rows, NG groups]: writes xq = bf16(q · scale),
    or with CODES the codes q as E4M3 bits (integers |q| <= 7 are exact there) and the scales as fp32 in a
    [K/G, M] array (group-major, as cuBLAS's 1x128 block-scaled FP8 GEMM reads them)."""
    v, rows, cols, mask = _load_groups(x_ptr, recip_ptr, M, K, stride_xm, HAS_SMOOTH, G, BLOCK_M, NG)
    rho = tl.load(clip_ptr + bin_idx)
    a = tl.max(tl.abs(v), axis=2) * rho
    scale = _to_bf16_rne(tl.minimum(tl.math.div_rn(a, QMAX * 1.0), _BF16_MAX)).to(tl.float32)
    sc = scale[:, :, None]
    t = tl.where(sc > 0, tl.math.div_rn(v, tl.where(sc > 0, sc, 1.0)), 0.0)
    r = (tl.abs(t) + 8388608.0) - 8388608.0                                # RNE of |t| (< 2^22)
    q = tl.minimum(r, QMAX * 1.0)
    if CODES:
        tl.store(xq_ptr + rows.to(tl.int64) * K + cols, _int_e4m3_bits(q, t < 0, HW), mask=mask)
        rg = tl.program_id(1) * NG + tl.arange(0, NG)
        srow = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(scale_ptr + rg[None, :].to(tl.int64) * M + srow[:, None], scale,
                 mask=(srow[:, None] < M) & (rg[None, :] < K // G))
    else:
        q = tl.where(t < 0, -q, q) + 0.0                                    # no -0 code
        tl.store(xq_ptr + rows.to(tl.int64) * K + cols, _to_bf16_rne(q * sc), mask=mask)


@triton.jit
def _int_e4m3_bits(q, neg, HW: tl.constexpr):
    """E4M3 bits of the integer code ±q (fp32 magnitude 0 <= q <= 8, exact in E4M3); 0 as +0. HW: the
    hardware cast; otherwise built on the bits (Triton's interpreter casts by truncation)."""
    if HW:
        bits = tl.where(neg & (q > 0), -q, q).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        mb = q.to(tl.int32, bitcast=True)
        normal = (((((mb >> 23) & 255) - 127 + 7) << 3) | ((mb >> 20) & 7))
        bits = (tl.where(q > 0, normal, 0) | tl.where(neg & (q > 0), 128, 0)).to(tl.uint8)
    return bits


@triton.jit
def _round_e4m3(v):
    """RNE of a finite fp32 0 <= v <= 448 to float8_e4m3fn, as an fp32 value (subnormals: 2^-9 grid)."""
    b = v.to(tl.int32, bitcast=True)
    normal = ((b + (0x7FFFF + ((b >> 20) & 1))) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits
    sub = ((v * 512.0 + 8388608.0) - 8388608.0) * (1.0 / 512.0)
    return tl.where(v >= 0.015625, normal, sub)


@triton.jit
def _nvfp4_act_quant_kernel(x_ptr, recip_ptr, clip_ptr, bin_idx, amax_ptr, xq_ptr, M, K, stride_xm,
                            HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    v, rows, cols, mask = _load_groups(x_ptr, recip_ptr, M, K, stride_xm, HAS_SMOOTH, 16, BLOCK_M, NB)
    rho = tl.load(clip_ptr + bin_idx)
    s_t = tl.math.div_rn(tl.load(amax_ptr), 2688.0)
    s_t = tl.where(s_t > 0, s_t, 1.0)
    s_b = tl.math.div_rn(tl.math.div_rn(tl.max(tl.abs(v), axis=2) * rho, 6.0), s_t)
    d = (_round_e4m3(tl.minimum(s_b, 448.0)) * s_t)[:, :, None]
    y = tl.where(d > 0, tl.math.div_rn(v, tl.where(d > 0, d, 1.0)), 0.0)
    t = tl.abs(y)
    q = _e2m1_round(t)
    q = _with_sign_of(q, v)                                              # the sign of v, -0 included
    tl.store(xq_ptr + rows.to(tl.int64) * K + cols, _to_bf16_rne(q * d), mask=mask)


def nvfp4_act_quant(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int,
                    smooth_recip: torch.Tensor | None) -> torch.Tensor:
    """The NVFP4 fake-quantized bf16 values of bf16 ``x [M, K]``, the tensor scale from x itself."""
    from wanexp.kernels.mxfp4 import _row_absmax_kernel
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert K % 16 == 0
    sm = smooth_recip if smooth_recip is not None else x
    rowmax = torch.empty(M, device=x.device, dtype=torch.float32)
    _row_absmax_kernel[(triton.cdiv(M, 16),)](x, sm, rowmax, M, K, x.stride(0), HAS_SMOOTH=smooth_recip is not None,
                                              HW=x.is_cuda, BLOCK_M=16, BLOCK_K=256, num_warps=4)
    amax = rowmax.amax().reshape(1)
    xq = torch.empty_like(x)
    BLOCK_M, NB = 16, 16
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K // 16, NB))
    _nvfp4_act_quant_kernel[grid](x, sm, clip_table, int(bin_idx), amax, xq, M, K, x.stride(0),
                                  HAS_SMOOTH=smooth_recip is not None, BLOCK_M=BLOCK_M, NB=NB, num_warps=4)
    return xq


@triton.jit
def _pow2(e):
    """2^e as fp32 from its bits (normal range)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _hif4_act_quant_kernel(x_ptr, recip_ptr, clip_ptr, bin_idx, xq_ptr, M, K, stride_xm,
                           HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr):
    v, rows, cols, mask = _load_groups(x_ptr, recip_ptr, M, K, stride_xm, HAS_SMOOTH, 64, BLOCK_M, NG)
    a = tl.abs(v)
    M3 = tl.max(tl.reshape(a, [BLOCK_M, NG * 16, 4]), axis=2)              # micro-groups of 4
    M2 = tl.max(tl.reshape(M3, [BLOCK_M, NG * 8, 2]), axis=2)              # sub-groups of 8
    M1 = tl.max(tl.reshape(M2, [BLOCK_M, NG, 8]), axis=2) * tl.load(clip_ptr + bin_idx)
    S = tl.minimum(tl.maximum(_to_bf16_rne(M1 * 0.142578125).to(tl.float32), 3.552713678800501e-15), 49152.0)
    e = ((S.to(tl.int32, bitcast=True) >> 23) & 255) - 127                 # floor(log2 S)
    S = ((S * _pow2(2 - e) + 8388608.0) - 8388608.0) * _pow2(e - 2)        # to 2 fractional bits, RNE
    r = _to_bf16_rne(tl.math.div_rn(tl.full(S.shape, 1.0, tl.float32), S)).to(tl.float32)
    r8 = tl.reshape(tl.broadcast_to(r[:, :, None], [BLOCK_M, NG, 8]), [BLOCK_M, NG * 8])
    L2 = tl.where(M2 * r8 >= 4.0, 2.0, 1.0)                                 # [BLOCK_M, NG*8]
    L2_16 = tl.reshape(tl.broadcast_to(L2[:, :, None], [BLOCK_M, NG * 8, 2]), [BLOCK_M, NG * 16])
    r16 = tl.reshape(tl.broadcast_to(r8[:, :, None], [BLOCK_M, NG * 8, 2]), [BLOCK_M, NG * 16])
    L3 = tl.where(M3 * r16 / L2_16 >= 2.0, 2.0, 1.0)                        # [BLOCK_M, NG*16]
    L = tl.reshape(tl.broadcast_to((L2_16 * L3)[:, :, None], [BLOCK_M, NG * 16, 4]), [BLOCK_M, NG, 64])
    r64 = tl.reshape(tl.broadcast_to(r[:, :, None], [BLOCK_M, NG, 64]), [BLOCK_M, NG, 64])
    S64 = tl.reshape(tl.broadcast_to(S[:, :, None], [BLOCK_M, NG, 64]), [BLOCK_M, NG, 64])
    m = tl.minimum(tl.floor((a * r64 / L) * 4.0 + 0.5) / 4.0, 1.75)        # half away from zero, saturate
    m = _with_sign_of(m, v)                                                # the sign bit of v, -0 too
    tl.store(xq_ptr + rows.to(tl.int64) * K + cols, (m * (L * S64)).to(tl.bfloat16), mask=mask)  # exact in bf16


def hif4_act_quant(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int,
                   smooth_recip: torch.Tensor | None) -> torch.Tensor:
    """The HiFloat4 fake-quantized bf16 values of bf16 ``x [M, K]`` (K % 64 == 0)."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert K % 64 == 0
    xq = torch.empty_like(x)
    BLOCK_M, NG = 16, 4
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K // 64, NG))
    _hif4_act_quant_kernel[grid](x, smooth_recip if smooth_recip is not None else x, clip_table, int(bin_idx), xq, M, K,
                                 x.stride(0), HAS_SMOOTH=smooth_recip is not None, BLOCK_M=BLOCK_M, NG=NG, num_warps=4)
    return xq


def int_act_quant(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int, smooth_recip: torch.Tensor | None,
                  group_size: int, qmax: int = 7) -> torch.Tensor:
    """The INT4 (qmax 7) fake-quantized bf16 values of bf16 ``x [M, K]`` (see the module docstring)."""
    _int_input(x, group_size)
    xq = torch.empty_like(x)
    _int_launch(x, clip_table, bin_idx, smooth_recip, group_size, qmax, xq, None)
    return xq


def int_act_codes(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int, smooth_recip: torch.Tensor | None,
                  group_size: int, qmax: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT codes of bf16 ``x [M, K]`` as float8_e4m3fn ``[M, K]`` and their scales as fp32 ``[M, K/G]``
    with strides (1, M) (group-major storage): the operands of the block-scaled FP8 GEMM
    (:mod:`wanexp.kernels.int4_fp8`). Bit-exact against :class:`wanexp.formats.integer.IntFormat`."""
    M, K = _int_input(x, group_size)
    codes = torch.empty(M, K, device=x.device, dtype=torch.uint8)
    scales = torch.empty(K // group_size, M, device=x.device, dtype=torch.float32)
    _int_launch(x, clip_table, bin_idx, smooth_recip, group_size, qmax, codes, scales)
    return codes.view(torch.float8_e4m3fn), scales.t()


def _int_input(x: torch.Tensor, group_size: int) -> tuple[int, int]:
    """The shape ``(M, K)`` of an INT quantizer's input, checked before anything is allocated."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert group_size in (32, 64, 128, 256) and K % group_size == 0
    return M, K


def _int_launch(x, clip_table, bin_idx, smooth_recip, group_size, qmax, out, scales) -> None:
    """One ``_int_act_quant_kernel`` launch writing ``out`` (xq, or the codes with ``scales``)."""
    M, K = x.shape
    BLOCK_M, NG = 16, max(1, 256 // group_size)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K // group_size, NG))
    _int_act_quant_kernel[grid](x, smooth_recip if smooth_recip is not None else x, clip_table, int(bin_idx), out,
                                out if scales is None else scales, M, K, x.stride(0), QMAX=qmax,
                                HAS_SMOOTH=smooth_recip is not None, CODES=scales is not None, HW=x.is_cuda,
                                G=group_size, BLOCK_M=BLOCK_M, NG=NG, num_warps=4)


FORMATS = ("int4", "nvfp4", "hif4")


def supports_layer(layer) -> bool:
    """INT4 (groups of 32..256 dividing K, bf16 scales) or NVFP4 (ties to even, K % 16 == 0) weights
    and activations, one smoothing vector, bf16 compute."""
    meta, act = layer.weight_meta, layer.act_format_spec
    if meta is None or act is None or meta["format"] not in FORMATS or act.get("name") != meta["format"]:
        return False
    if layer.compute_dtype != torch.bfloat16 or not (layer.smooth is None or layer.smooth.dim() == 1):
        return False
    if meta["format"] == "nvfp4":
        return layer.in_features % 16 == 0 and getattr(layer.act_format, "ties", "even") == "even"
    if meta["format"] == "hif4":
        return layer.in_features % 64 == 0
    g = int(getattr(layer.act_format, "block_size", -1))
    return (g in (32, 64, 128, 256) and layer.in_features % g == 0
            and getattr(layer.act_format, "scale_dtype", torch.bfloat16) == torch.bfloat16)


@torch.library.custom_op("wanexp::act_quant_bf16", mutates_args=())
def _act_quant_op(x2: torch.Tensor, clip_table: torch.Tensor, bin_index: torch.Tensor, smooth_recip: torch.Tensor | None,
                  fmt: str, group_size: int) -> torch.Tensor:
    """The bf16 fake-quantized activations of ``fmt`` (int4 | nvfp4 | hif4), one custom op for compile."""
    bin_ = min(int(bin_index), clip_table.numel() - 1)   # a CPU tensor: no device sync
    if fmt == "hif4":
        return hif4_act_quant(x2, clip_table, bin_, smooth_recip)
    if fmt == "nvfp4":
        return nvfp4_act_quant(x2, clip_table, bin_, smooth_recip)
    return int_act_quant(x2, clip_table, bin_, smooth_recip, group_size)


@_act_quant_op.register_fake
def _(x2, clip_table, bin_index, smooth_recip, fmt, group_size):
    return torch.empty_like(x2)


def upcast_forward(layer, x2: torch.Tensor, bin_index: torch.Tensor) -> torch.Tensor:
    """The reference path's GEMMs on the kernel's activation values: equal to ``reference_forward``."""
    fmt = layer.weight_meta["format"]
    xq = torch.ops.wanexp.act_quant_bf16(x2, layer.clip_table, bin_index, layer.smooth_recip, fmt,
                                         int(layer.act_format.block_size) if fmt == "int4" else 0)
    return layer.gemms(xq, layer.smoothed(x2) if layer.lowrank_up is not None else None)
