"""INT4 W4A4 on FP8 tensor cores: the integer codes are exact in E4M3, the group scales go to the GEMM.

An INT4 value (``wanexp.formats.integer``) is a code q, an integer with |q| <= 7, times its group's
bf16 scale s. Every such q is exact in E4M3 (4 significant bits hold 3). With groups of 128 along K for
both operands (the INT4 default), the layer's product is

    y[m, n] = Σ_g s_a[m, g] · s_w[n, g] · Σ_{k in g} q_a[m, k] · q_w[n, k]                    (1)

which is cuBLAS's 1x128-by-1x128 block-scaled FP8 GEMM (``torch.nn.functional.scaled_mm`` with
``ScalingType.BlockWise1x128`` on both sides; Hopper, CUDA 12.9+): the inner sums are integers of at
most 128 · 49 = 6272, exact in any accumulator the tensor cores use, and each group's partial sum is
scaled and added in fp32. So (1) evaluates the format's own values, q · s, where the reference path
first rounds each q · s to bf16 (3 + 8 significant bits do not fit bf16's 8): this path is the
closer of the two to the exact product (tested against fp64), and agrees with the reference within
that rounding.

The activation codes and scales come from one Triton pass (``upcast.int_act_codes``, bit-exact
against the format); the weight's packed nibbles are widened to E4M3 per call into a transient
N·K-byte buffer (:func:`int4_weight_e4m3`), so the model still holds only the packed weight. The
low-rank branch's input T = bf16(x · r) · L2ᵀ comes from :func:`wanexp.kernels.mxfp4.lowrank_down`,
and one :func:`wanexp.kernels.mxfp4_fp8.lowrank_add_` pass adds bias and branch, one rounding.

Off the GPU (Triton's interpreter on CPU, for the tests) the GEMM is :func:`blockwise_gemm_reference`,
(1) in fp32 in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4_fp8 import _nibble_tile
from wanexp.kernels.upcast import _int_e4m3_bits, int_act_codes

GROUP = 128   # the block of cuBLAS's 1x128 scaling: INT4's default group size


@triton.jit
def _int4_weight_kernel(w_ptr, out_ptr, N, K, HW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed INT4 [N, K/2] (two's-complement nibbles, element 2i low) -> E4M3 bits [N, K]."""
    _, rows, m, k0, c = _nibble_tile(w_ptr, N, K, BLOCK_N, BLOCK_K)
    v = tl.where(c >= 8, c - 16, c)                                         # two's complement
    bits = _int_e4m3_bits(tl.abs(v).to(tl.float32), v < 0, HW)
    tl.store(out_ptr + rows * K + k0 + tl.arange(0, BLOCK_K)[None, :], bits, mask=m)


def int4_weight_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``[N, K]`` holding the INT4 weight codes of the packed ``codes [N, K/2]`` exactly."""
    N, K = codes.shape[0], codes.shape[1] * 2
    out = torch.empty(N, K, device=codes.device, dtype=torch.uint8)
    _int4_weight_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 128))](codes, out, N, K, HW=codes.is_cuda,
                                                                   BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return out.view(torch.float8_e4m3fn)


def blockwise_gemm_reference(a8: torch.Tensor, w8: torch.Tensor, sa: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """(1) in plain torch: ``a8 [M, K]``, ``w8 [N, K]`` E4M3 codes, ``sa [M, K/G]``, ``sw [N, K/G]`` fp32
    scales; the integer group sums exact in fp32, scaled and summed over groups in fp32. Returns fp32."""
    M, K = a8.shape
    g = K // sa.shape[1]
    inner = torch.einsum("mgk,ngk->mng", a8.float().reshape(M, -1, g), w8.float().reshape(w8.shape[0], -1, g))
    return (inner * sa[:, None, :] * sw[None, :, :]).sum(-1)


def supports(layer, x2: torch.Tensor) -> bool:
    """INT4 weights and activations in groups of 128, shapes cuBLAS's block-scaled GEMM takes (K a
    multiple of 128; M and N multiples of 4 and 16, the alignment of its scale and output rows)."""
    return (layer.weight_meta["format"] == "int4" and int(getattr(layer.act_format, "block_size", -1)) == GROUP
            and int(layer.weight_meta.get("options", {}).get("group_size", -1)) == GROUP
            and layer.in_features % GROUP == 0
            and layer.out_features % 16 == 0 and x2.shape[0] % 4 == 0)


def int4_fp8_linear(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, clip_table: torch.Tensor,
                    bin_: int, smooth_recip: torch.Tensor | None, bias: torch.Tensor | None,
                    up: torch.Tensor | None, down: torch.Tensor | None) -> torch.Tensor:
    """The W4A4 INT4 linear ``y = A · Wᵀ + b (+ (x_s L2ᵀ) L1ᵀ)`` with (1) on FP8 tensor cores (bf16 out)."""
    from wanexp.kernels.mxfp4 import lowrank_down
    from wanexp.kernels.mxfp4_fp8 import lowrank_add_
    a8, sa = int_act_codes(x2, clip_table, bin_, smooth_recip, GROUP)
    w8 = int4_weight_e4m3(codes)
    sw = scales.t().float().contiguous().t()          # [N, K/G], strides (1, N): group-major, as cuBLAS reads
    if x2.is_cuda:
        import torch.nn.functional as F
        y = F.scaled_mm(a8, w8.t(), sa, F.ScalingType.BlockWise1x128, sw, F.ScalingType.BlockWise1x128,
                        output_dtype=torch.bfloat16)
    else:
        y = blockwise_gemm_reference(a8, w8, sa, sw).to(torch.bfloat16)
    del w8
    if up is not None:
        lowrank_add_(y, lowrank_down(x2, smooth_recip, down), up, bias=bias)
    elif bias is not None:
        y.add_(bias)
    return y


@torch.library.custom_op("wanexp::int4_w4a4_fp8", mutates_args=())
def _int4_w4a4_fp8(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, clip_table: torch.Tensor,
                   bin_index: torch.Tensor, smooth_recip: torch.Tensor | None, bias: torch.Tensor | None,
                   up: torch.Tensor | None, down: torch.Tensor | None) -> torch.Tensor:
    """:func:`int4_fp8_linear` as one custom op, which ``torch.compile`` keeps whole."""
    bin_ = min(int(bin_index), clip_table.numel() - 1)   # a CPU tensor: no device sync
    return int4_fp8_linear(x2, codes, scales, clip_table, bin_, smooth_recip, bias, up, down)


@_int4_w4a4_fp8.register_fake
def _(x2, codes, scales, clip_table, bin_index, smooth_recip, bias, up, down):
    return x2.new_empty(x2.shape[0], codes.shape[0])


def int4_fp8_forward(layer, x2: torch.Tensor, bin_index: torch.Tensor) -> torch.Tensor:
    """A QuantLinear's INT4 forward through :func:`int4_fp8_linear`."""
    has_lr = layer.lowrank_up is not None
    return torch.ops.wanexp.int4_w4a4_fp8(x2, layer.wq_codes, layer.wq_scales, layer.clip_table, bin_index,
                                          layer.smooth_recip, layer.bias, layer.lowrank_up if has_lr else None,
                                          layer.lowrank_down if has_lr else None)
