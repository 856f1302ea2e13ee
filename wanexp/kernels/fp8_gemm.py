"""A row- and column-scaled FP8 GEMM (Triton) with the W4A4 layer's whole epilogue in it.

    y = bf16( s_a[m] · s_w[n] · Σ_k A[m, k] W[n, k]  +  b[n]  +  Σ_r T[m, r] U[n, r] )

``A [M, K]`` and ``W [N, K]`` are float8_e4m3fn (the folded MXFP4 operands of
:mod:`wanexp.kernels.mxfp4_fp8`), ``s_a``/``s_w`` fp32, ``b`` the bf16 bias, ``T [M, R]``/``U [N, R]``
the bf16 low-rank branch (T = x_s L2ᵀ, U = L1). cuBLAS's ``torch._scaled_mm`` takes no C operand,
so there the low-rank product is a second pass over y (``lowrank_add_``: read y, add, write y);
here it is one more MMA (K = R) into the fp32 accumulator before the single rounding, so y is
written once and rounded once (the reference path rounds three times).

Accumulation. Hopper's FP8 MMA adds its products at reduced precision; Triton (like cuBLAS without
fast accumulation) then promotes partial sums into the fp32 accumulator every
``max_num_imprecise_acc`` K elements. Here that is every BLOCK_K (64 or 128): the products are exact
(E4M3 × E4M3 fits fp32), and the result differs from an fp64 evaluation by the fp32 summation of
the partial sums and the final bf16 rounding. ``IMPRECISE = 0`` (a diagnostic for the probe only)
lets the MMA accumulate the whole K imprecisely, to measure what the promotion costs.

The plain-torch reference is :func:`fp8_gemm_reference` (fp64); tests/test_kernels.py checks the
kernel against it in Triton's interpreter and on a GPU at Wan's shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4 import _bf16


def fp8_gemm_reference(a8: torch.Tensor, w8: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
                       bias: torch.Tensor | None = None, t: torch.Tensor | None = None,
                       up: torch.Tensor | None = None) -> torch.Tensor:
    """The fp64 value of the kernel's expression (unrounded)."""
    y = (a8.double() @ w8.double().T) * scale_a.double()[:, None] * scale_w.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    if t is not None:
        y = y + t.double() @ up.double().T
    return y


@triton.jit
def _fp8_gemm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, t_ptr, u_ptr, y_ptr, M, N, K,
                     R: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, HW: tl.constexpr,
                     IMPRECISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of y; tiles ordered in groups of GROUP_M row-tiles so that the
    weight tiles a group shares stay in L2. K must be a multiple of BLOCK_K (the caller checks)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # clamped rows/cols (not masked): out-of-range ones read a valid row and are never stored
    am = tl.minimum(rm, M - 1).to(tl.int64)
    wn = tl.minimum(rn, N - 1).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * K + rk[None, :]
    w_ptrs = w_ptr + wn[None, :] * K + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if HW:
            if IMPRECISE:
                acc = tl.dot(a, w, acc)
            else:
                acc = tl.dot(a, w, acc, max_num_imprecise_acc=BLOCK_K)
        else:   # the interpreter: exact products, fp32 sums
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(sa_ptr + am)[:, None] * tl.load(sw_ptr + wn)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + wn)[None, :].to(tl.float32)
    if HAS_LR:
        rr = tl.arange(0, R)
        t = tl.load(t_ptr + am[:, None] * R + rr[None, :])
        u = tl.load(u_ptr + wn[None, :] * R + rr[:, None])
        if HW:
            acc = tl.dot(t, u, acc)
        else:
            acc = tl.dot(t.to(tl.float32), u.to(tl.float32), acc, input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], _bf16(acc, HW), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages); the first is the default (and the interpreter's)
FP8_GEMM_CONFIGS = [(128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3),
                    (128, 128, 64, 8, 4, 5), (128, 256, 64, 8, 8, 4), (64, 256, 128, 8, 4, 4),
                    (128, 128, 128, 8, 4, 4), (256, 128, 64, 8, 8, 4)]


def fp8_gemm(a8: torch.Tensor, w8: torch.Tensor, scale_a: torch.Tensor, scale_w: torch.Tensor,
             bias: torch.Tensor | None = None, t: torch.Tensor | None = None, up: torch.Tensor | None = None,
             config: tuple | None = None, imprecise: bool = False) -> torch.Tensor:
    """``bf16(s_a s_w (A Wᵀ) + b + T Uᵀ)`` (module docstring) for float8_e4m3fn ``a8 [M, K]``, ``w8 [N, K]``
    (both K-contiguous), K a multiple of the config's BLOCK_K, a rank R of 16..128 (a power of two)."""
    M, K = a8.shape
    N = w8.shape[0]
    bm, bn, bk, group, warps, stages = config or FP8_GEMM_CONFIGS[0]
    assert K % bk == 0 and a8.is_contiguous() and w8.is_contiguous()
    R = 0 if t is None else t.shape[1]
    assert R == 0 or R in (16, 32, 64, 128)
    y = torch.empty(M, N, device=a8.device, dtype=torch.bfloat16)
    dummy = scale_a
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _fp8_gemm_kernel[grid](a8, w8, scale_a.contiguous(), scale_w.contiguous(), bias if bias is not None else dummy,
                           t.contiguous() if R else dummy, up.contiguous() if R else dummy, y, M, N, K,
                           R=max(R, 16), HAS_BIAS=bias is not None, HAS_LR=R > 0, HW=a8.is_cuda,
                           IMPRECISE=imprecise, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                           num_warps=warps, num_stages=stages)
    return y


__all__ = ["FP8_GEMM_CONFIGS", "fp8_gemm", "fp8_gemm_reference"]
