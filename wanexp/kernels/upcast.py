"""Fused W4A4 for the 4-bit formats other than MXFP4: one Triton pass quantizes the activations,
then the reference path's own GEMMs run on exactly its operands.

An INT4 value is a 4-bit code times a bf16 group scale: 3 + 8 significant bits, which no FP8 or
bf16 operand holds exactly, and its scale changes every 128 K, so no single tensor-core GEMM takes
the codes directly. What costs in the torch path is not the GEMM but the fake-quantization of the
activations (a dozen elementwise passes over M×K in fp32). Here it is one kernel that reads x once
and writes the bf16 values the reference computes, bit for bit (tested); the weight is decoded
with ``QuantLinear.dequantized_weight`` and the GEMMs are the reference's, so the layer's output
equals the reference path's exactly.

INT4 (``wanexp.formats.integer``), per group of G channels (G = the format's ``group_size``,
a power of two from 32 to 256 dividing K), with v = x_s in fp32 and rho the bin's clip ratio:

    scale = bf16(min(rho · max|v| / 7, bf16 max))        (fp32 product, IEEE division, RNE to bf16)
    q     = clamp(RNE(v / scale), −7, 7)  (+0 for −0);   q = 0 where scale == 0
    xq    = bf16(q · scale)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4 import _to_bf16_rne

_BF16_MAX = 3.3895313892515355e38


@triton.jit
def _int_act_quant_kernel(x_ptr, smooth_ptr, clip_ptr, bin_idx, xq_ptr, M, K, stride_xm, QMAX: tl.constexpr,
                          HAS_SMOOTH: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, NG: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rg = tl.program_id(1) * NG + tl.arange(0, NG)
    cols = rg[None, :, None] * G + tl.arange(0, G)[None, None, :]          # [1, NG, G]
    rows = rm[:, None, None]
    mask = (rows < M) & (cols < K)
    x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
        v = _to_bf16_rne(tl.math.div_rn(x.to(tl.float32), s)).to(tl.float32)   # reference: bf16(x / s)
    else:
        v = x.to(tl.float32)
    rho = tl.load(clip_ptr + bin_idx)
    a = tl.max(tl.abs(v), axis=2) * rho
    scale = _to_bf16_rne(tl.minimum(tl.math.div_rn(a, QMAX * 1.0), _BF16_MAX)).to(tl.float32)
    sc = scale[:, :, None]
    t = tl.where(sc > 0, tl.math.div_rn(v, tl.where(sc > 0, sc, 1.0)), 0.0)
    r = (tl.abs(t) + 8388608.0) - 8388608.0                                # RNE of |t| (< 2^22)
    q = tl.minimum(r, QMAX * 1.0)
    q = tl.where(t < 0, -q, q) + 0.0                                        # no -0 code
    tl.store(xq_ptr + rows.to(tl.int64) * K + cols, _to_bf16_rne(q * sc), mask=mask)


def int_act_quant(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int, smooth: torch.Tensor | None,
                  group_size: int, qmax: int = 7) -> torch.Tensor:
    """The INT4 (qmax 7) fake-quantized bf16 values of bf16 ``x [M, K]`` (see the module docstring)."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert K % group_size == 0 and group_size in (32, 64, 128, 256)
    xq = torch.empty_like(x)
    BLOCK_M, NG = 16, max(1, 256 // group_size)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K // group_size, NG))
    _int_act_quant_kernel[grid](x, smooth if smooth is not None else x, clip_table, int(bin_idx), xq, M, K,
                                x.stride(0), QMAX=qmax, HAS_SMOOTH=smooth is not None, G=group_size,
                                BLOCK_M=BLOCK_M, NG=NG, num_warps=4)
    return xq


def supports_layer(layer) -> bool:
    """INT4 weights and activations, groups of 32..256 dividing K, one smoothing vector, bf16."""
    meta, act = layer.weight_meta, layer.act_format_spec
    if meta is None or act is None or meta["format"] != "int4" or act.get("name") != "int4":
        return False
    g = int(getattr(layer.act_format, "block_size", -1))
    return (layer.compute_dtype == torch.bfloat16 and g in (32, 64, 128, 256) and layer.in_features % g == 0
            and getattr(layer.act_format, "scale_dtype", torch.bfloat16) == torch.bfloat16
            and (layer.smooth is None or layer.smooth.dim() == 1))


@torch.library.custom_op("wanexp::int4_act_quant", mutates_args=())
def _int4_act_quant_op(x2: torch.Tensor, clip_table: torch.Tensor, bin_index: torch.Tensor,
                       smooth: torch.Tensor | None, group_size: int) -> torch.Tensor:
    bin_ = min(int(bin_index), clip_table.numel() - 1)   # a CPU tensor: no device sync
    return int_act_quant(x2, clip_table, bin_, smooth, group_size)


@_int4_act_quant_op.register_fake
def _(x2, clip_table, bin_index, smooth, group_size):
    return torch.empty_like(x2)


def int4_forward(layer, x2: torch.Tensor, bin_index: torch.Tensor) -> torch.Tensor:
    """The reference path's GEMMs on the kernel's activation values: equal to ``reference_forward``."""
    xq = torch.ops.wanexp.int4_act_quant(x2, layer.clip_table, bin_index, layer.smooth,
                                         int(layer.act_format.block_size))
    y = torch.nn.functional.linear(xq, layer.dequantized_weight(), layer.bias)
    if layer.lowrank_up is not None:  # the 16-bit branch sees the smoothed, unquantized input
        xs = x2 if layer.smooth is None else (x2.float() / layer.smooth).to(torch.bfloat16)
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(xs, layer.lowrank_down), layer.lowrank_up)
    return y
