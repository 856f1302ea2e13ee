"""Fused MXFP4 W4A4 kernels (Triton): the activation quantizer and the packed-weight GEMM.

One W4A4 layer (:class:`wanexp.quant.linear.QuantLinear`) computes

    x_s = bf16(x · r)                                   (smoothing, optional; r = 1 / s in fp32)
    A   = MXFP4(x_s; rho[bin])                          (per token, per 32 channels)
    y   = A · deq(W_q)ᵀ + (x_s · L2ᵀ) · L1ᵀ + b          (low-rank branch optional)

Two kernels do this in two passes over the activations instead of the reference path's dozen
(plus a per-call dequantization of every weight):

1. :func:`act_quant` (``_act_quant_kernel``), memory-bound, one read of x. For each token m and
   32-channel block j, with v = x_s[m, 32j : 32j + 32] in fp32 and rho the clip ratio of the
   current timestep bin (read on the device from the layer's clip table: no host sync):

       a    = rho · max|v|                               (fp32, as the reference: one rounding)
       E    = floor(log2 a)   read from the fp32 bits of a (exact; frexp in the reference)
       e    = E − 2                                      (scale_rule floor, the OCP rule)
            = E − 2 + [mantissa(a) > 1.5]                (scale_rule ceil)
       e    = 0 if a == 0;  −127 if a is subnormal;  127 if a is inf;  clamp to [−127, 127]
       t    = |v| · 2^−e                                 (exact: a power of two)
       q    = RNE(t / step) · step,  step = 0.5 | 1 | 2 for t < 2 | < 4 | ≥ 4,  min(q, 6)
       A    = sign(v) · q · 2^e                          (exact in bf16)

   RNE is done with the fp32 magic-number trick ((t' + 2^23) − 2^23, t' ≤ 16), the divisions by
   powers of two are multiplications by exact powers of two and the smoothing is one fp32
   multiplication by r (IEEE, as the reference), so every step is the one the reference
   (:mod:`wanexp.formats.mx`) does and the codes and E8M0 scales are bit-identical to
   ``get_format("mxfp4").encode`` (tested). The kernel writes A as bf16 (the exact MXFP4 values,
   what the GEMM reads), and on request the packed codes (two E2M1 codes a byte, element 2i in
   the low nibble, as :func:`wanexp.formats.base.pack_nibbles`) with the E8M0 scales (e + 127), and x_s (the
   low-rank branch's input).

2. :func:`mxfp4_linear` (``_mxfp4_gemm_kernel``), compute-bound. It reads the weight as stored,
   packed E2M1 codes ``[N, K/2]`` + E8M0 scales ``[N, K/32]`` (4.25 bits an element: no bf16 copy
   of the weight ever exists in memory), and computes for an output tile

       acc[m, n] = Σ_k A[m, k] · (c[n, k] · 2^(S[n, k/32] − 127))      fp32 accumulation
       acc      += Σ_r T[m, r] · L1[n, r]         T = x_s · L2ᵀ (bf16, one small cuBLAS GEMM)
       y[m, n]   = bf16(acc + b[n])

   Why bf16 tensor cores and not int8/fp8: Hopper has no FP4 MMA. An MXFP4×MXFP4 product is exact
   as int8 (2·E2M1 ∈ [−12, 12]) or fp8 products, but its scale 2^(ea[m,j] + ew[n,j]) varies with
   the row, the column *and* the 32-wide K block, so an int8/fp8 kernel must finish the MMA every
   32 K and rescale the whole BM×BN accumulator on the CUDA cores (2·BM·BN fp32 ops per 32 K per
   tile: more issue time than the fp8 MMA itself, and it breaks wgmma pipelining). Folding the
   block scales into E4M3 relative to the row's largest one is exact while a row's block
   exponents span at most 14 octaves: that path (``gemm_backend("fp8")``) is
   :mod:`wanexp.kernels.mxfp4_fp8`. In bf16 both scaled operands are *exact* (an E2M1 value times
   a power of two has 2 significant bits; bf16 has 8 bits and fp32's exponent range), so one
   bf16 wgmma with fp32 accumulation gives the exact products of MXFP4 × MXFP4 with no per-block
   rescaling at all: the same products as the reference (which dequantizes to bf16 and calls
   cuBLAS), the same tensor-core rate as the BF16 model, and only the fp32 summation order and
   the single final rounding differ from the reference. The weight's upcast to bf16 happens in
   registers (``tl.dot_scaled`` with an ``e2m1`` operand and a ``bf16`` operand, which Triton
   lowers on Hopper to exactly this upcast + bf16 MMA; ``VARIANT`` 1/3 do the same upcast by hand,
   bit-building the value). Variants 2/3 compute yᵀ = W·xᵀ so that the upcast weight is the left
   (register) operand of wgmma and skips a shared-memory round trip; the fastest variant and tile
   are picked per shape on first use (:func:`_pick_config`).

   Numerics vs the reference path: products are exact in both; the reference rounds
   ``xq·Wᵀ + b`` to bf16, the low-rank output to bf16 and their sum to bf16 again, the fused
   kernel rounds once. Difference: a few bf16 ulps of the output (relative Frobenius error
   4.1e-3 measured on the A14B shapes at 57,600 tokens with rank 32; tested at 1e-2), and the
   fused result is at least as close as the reference to an fp64 evaluation of the same quantized
   operands (tested). Above ``wanexp.kernels.UPCAST_MIN_TOKENS`` the dispatcher replaces this GEMM
   by :func:`upcast_linear` (same products, one rounding, cuBLAS speed).

Limits (the dispatcher checks them and otherwise keeps the reference path): K a multiple of 128,
bf16 compute dtype, MXFP4 weights and activations. No NaN/Inf check is made (it would need a host
sync each call): a NaN input propagates instead of raising as the reference does.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------- activation quantizer


@triton.jit
def _to_bf16_rne(v):
    """fp32 -> bf16, round to nearest even, from the bits (the same on the GPU and in Triton's CPU
    interpreter, whose casts truncate). Finite inputs; overflow gives inf like the hardware cast."""
    b = v.to(tl.int32, bitcast=True)
    b = b + (0x7FFF + ((b >> 16) & 1))
    return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16(v, HW: tl.constexpr):
    """fp32 -> bf16, RNE: the hardware cast on a GPU, the bit-built one in Triton's interpreter (whose casts truncate)."""
    if HW:
        return v.to(tl.bfloat16)
    else:
        return _to_bf16_rne(v)


@triton.jit
def _recip_tile(recip_ptr, rows, cols, mask, EVEN_K: tl.constexpr = False):
    """The smoothing multipliers r[cols] for a whole tile of x (``rows``/``cols`` broadcasting to its shape,
    1 outside ``mask``), loaded through a full-shape pointer so that they arrive in x's own register
    layout: a broadcast [1, ...] load costs a layout conversion, 0.14 of 0.59 ms in the FP8 quantizer
    at K = 5120 (round 17r). EVEN_K (every column of the tile inside K): no mask, since r is valid for
    any row, which spares filling the masked lanes (an instruction an element)."""
    if EVEN_K:
        return tl.load(recip_ptr + cols + rows * 0)
    return tl.load(recip_ptr + cols + rows * 0, mask=mask, other=1.0)


@triton.jit
def _load_smoothed_rows(x_ptr, recip_ptr, rm, cols, M, K, stride_xm, HAS_SMOOTH: tl.constexpr, HW: tl.constexpr):
    """The tile x[rm, cols] (bf16, zero outside [M, K]) smoothed as the reference smooths it, bf16(x · r).
    r is a broadcast [1, BLOCK_K] load here, not :func:`_recip_tile`'s full-shape one: in the low-rank
    input kernel, whose tile feeds ``tl.dot``, the full-shape load measured 3.7-4.3x slower on the H200
    (0.58 against 0.158 ms at K = 5120, 57,600 tokens; round 18a)."""
    mask = (rm[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        r = tl.load(recip_ptr + cols, mask=cols < K, other=1.0)
        x = _bf16(x.to(tl.float32) * r[None, :], HW)
    return x


@triton.jit
def _row_absmax_kernel(x_ptr, recip_ptr, out_ptr, M, K, stride_xm,
                       HAS_SMOOTH: tl.constexpr, HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """max_k |x_s[m, k]| (fp32) of each row, x_s = bf16(x · r) as the quantizer sees it."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = _load_smoothed_rows(x_ptr, recip_ptr, rm, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, HAS_SMOOTH, HW)
        acc = tl.maximum(acc, tl.max(tl.abs(v.to(tl.float32)), axis=1))
    tl.store(out_ptr + rm, acc, mask=rm < M)


@triton.jit
def _block_exponent(amax, CEIL: tl.constexpr):
    """The E8M0 exponent e of a block whose clipped absolute maximum is ``amax`` (fp32), from its bits."""
    bits = amax.to(tl.int32, bitcast=True)
    field = (bits >> 23) & 255
    e = field - 129                                                    # floor(log2 a) - 2
    if CEIL:
        e += ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)              # mantissa > 1.5
    e = tl.minimum(tl.maximum(e, -127), 127)
    e = tl.where(field == 0, tl.where(amax > 0, -127, 0), e)
    return tl.where(field == 255, 127, e)


@triton.jit
def _inv_pow2(e):
    """2^-e (fp32) of a block exponent e in [-127, 127], from its bits (2^-127: a subnormal)."""
    return tl.where(e == 127, 1 << 22, (127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_magnitude(v, e):
    """The E2M1 magnitude q of each v [BLOCK_M, NB, 32] in units of its block's 2^e (e [BLOCK_M, NB]),
    round half to even, saturating at 6; and y = v · 2^-e, whose sign bit (−0 too) is the code's."""
    y = v * _inv_pow2(e)[:, :, None]
    return _e2m1_round(tl.abs(y)), y


@triton.jit
def _e2m1_round(a):
    """The E2M1 magnitude nearest a >= 0 (fp32; ties to even, saturating at 6): RNE onto the grid of the
    step (0.5, 1 or 2 by octave) as (t + c) − c with c = step · 2^23, whose ulp is the step, the rounding
    RNE(t / step) · step gives without the reciprocal (a MUFU op an element)."""
    t = tl.minimum(a, 8.0)                                             # >= 7 saturates to 6 anyway
    c = tl.where(t < 2.0, 4194304.0, tl.where(t < 4.0, 8388608.0, 16777216.0))
    return tl.minimum((t + c) - c, 6.0)


@triton.jit
def _act_quant_kernel(x_ptr, recip_ptr, clip_ptr, bin_idx, xq_ptr, xs_ptr, codes_ptr, scales_ptr,
                      M, K, stride_xm, stride_qm,
                      HAS_SMOOTH: tl.constexpr, CEIL: tl.constexpr, WRITE_XQ: tl.constexpr,
                      WRITE_XS: tl.constexpr, WRITE_CODES: tl.constexpr,
                      BLOCK_M: tl.constexpr, NB: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                       # tokens
    rb = pid_k * NB + tl.arange(0, NB)                                 # 32-blocks
    re = tl.arange(0, 32)
    cols = rb[None, :, None] * 32 + re[None, None, :]                  # [1, NB, 32]
    rows = rm[:, None, None]
    mask = (rows < M) & (cols < K)
    x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
    if HAS_SMOOTH:
        xs = _to_bf16_rne(x.to(tl.float32) * _recip_tile(recip_ptr, rows, cols, mask))  # bf16(x.float() * r)
        if WRITE_XS:
            tl.store(xs_ptr + rows.to(tl.int64) * K + cols, xs, mask=mask)
        v = xs.to(tl.float32)
    else:
        v = x.to(tl.float32)
    rho = tl.load(clip_ptr + bin_idx)
    amax = tl.max(tl.abs(v), axis=2) * rho                            # [BLOCK_M, NB]
    e = _block_exponent(amax, CEIL)
    X = tl.where(e == -127, 1 << 22, (127 + e) << 23).to(tl.float32, bitcast=True)  # 2^e (2^-127: subnormal)
    q, y = _e2m1_magnitude(v, e)
    ybits = y.to(tl.int32, bitcast=True)
    neg = ybits < 0                                                    # sign bit (-0 too)
    val = (q.to(tl.int32, bitcast=True) | (ybits & -2147483648)).to(tl.float32, bitcast=True)  # keeps -0
    if WRITE_XQ:
        tl.store(xq_ptr + rows.to(tl.int64) * stride_qm + cols, (val * X[:, :, None]).to(tl.bfloat16), mask=mask)
    if WRITE_CODES:
        idx = tl.where(q < 2.0, q * 2.0, tl.where(q < 4.0, q + 2.0, q * 0.5 + 4.0)).to(tl.int32)
        code = idx | (neg.to(tl.int32) << 3)
        lo, hi = tl.split(tl.reshape(code, [BLOCK_M, NB, 16, 2]))
        byte = (lo | (hi << 4)).to(tl.uint8)
        bcols = rb[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
        tl.store(codes_ptr + rows.to(tl.int64) * (K // 2) + bcols, byte, mask=(rows < M) & (bcols < K // 2))
        srows = rm[:, None]
        tl.store(scales_ptr + srows.to(tl.int64) * (K // 32) + rb[None, :], (e + 127).to(tl.uint8),
                 mask=(srows < M) & (rb[None, :] < K // 32))


# Tiles of the memory-bound quantizer kernels, each element's result independent of them (so
# every choice is bit-identical; tests run each). (BLOCK_M tokens, NB 32-blocks, warps) for
# _act_quant_kernel; (BLOCK_M, BLOCK_K, warps) for _row_absmax_kernel. The first is the default
# (small M, the interpreter); above SMALL_M_TOKENS on a GPU the fastest is timed once per shape.
ACT_TILES = [(16, 8, 4), (32, 8, 4), (32, 4, 4), (64, 4, 8), (16, 16, 8), (64, 8, 8), (8, 16, 4), (128, 2, 8)]
ROWMAX_TILES = [(16, 256, 4), (32, 256, 8), (8, 512, 4), (64, 128, 8), (4, 1024, 4), (32, 128, 4)]
SMALL_M_TOKENS = 2048
_tiles_tuned: dict[tuple, tuple] = {}


def pick_tiles(key: tuple, candidates: list[tuple], launch, x: torch.Tensor) -> tuple:
    """The fastest of ``candidates`` for ``launch(tiles)`` (median of do_bench, once per ``key``;
    a launch only writes its outputs, so repeating it is harmless), or the first one for small M
    and off the GPU."""
    if not x.is_cuda or x.shape[0] <= SMALL_M_TOKENS:
        return candidates[0]
    if key not in _tiles_tuned:
        timed = []
        for tiles in candidates:
            try:
                timed.append((triton.testing.do_bench(lambda: launch(tiles), warmup=3, rep=15, return_mode="median"),
                              tiles))
            except Exception:  # noqa: BLE001  (a tile that does not compile or fit is skipped)
                continue
        _tiles_tuned[key] = min(timed)[1] if timed else candidates[0]
    return _tiles_tuned[key]


def act_quant(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int = 0, smooth_recip: torch.Tensor | None = None,
              *, scale_rule: str = "floor", write_xq: bool = True, write_xs: bool = False,
              write_codes: bool = False, xq_out: torch.Tensor | None = None,
              tiles: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """MXFP4-quantize the rows of a bf16 matrix ``x [M, K]`` (K a multiple of 32).

    ``clip_table[bin_idx]`` is the clip ratio (fp32 on x's device), ``smooth_recip`` the per-channel
    smoothing multiplier r = 1 / s (fp32). Returns a dict with ``xq`` (bf16, the dequantized MXFP4 values),
    and on request ``xs`` (the smoothed bf16 input), ``codes`` (uint8 ``[M, K/2]``) and
    ``scales`` (uint8 E8M0 ``[M, K/32]``), as :meth:`wanexp.formats.mx.MXFP4.encode` stores them.
    ``xq_out`` (bf16 ``[M, ≥K]``, unit column stride) receives xq in its first K columns instead
    of a new tensor. ``tiles`` pins one of :data:`ACT_TILES` (default: :func:`pick_tiles`).
    """
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert K % 32 == 0, "the fused activation quantizer needs K % 32 == 0"
    write_xs = write_xs and smooth_recip is not None
    out: dict[str, torch.Tensor] = {}
    dummy = x.new_empty(1)
    xq = (x.new_empty(M, K) if xq_out is None else xq_out) if write_xq else dummy
    xs = x.new_empty(M, K) if write_xs else dummy
    codes = x.new_empty(M, K // 2, dtype=torch.uint8) if write_codes else dummy
    scales = x.new_empty(M, K // 32, dtype=torch.uint8) if write_codes else dummy

    def launch(tiles):
        block_m, nb, warps = tiles
        grid = (triton.cdiv(M, block_m), triton.cdiv(K // 32, nb))
        _act_quant_kernel[grid](x, smooth_recip if smooth_recip is not None else dummy, clip_table, int(bin_idx),
                                xq, xs, codes, scales, M, K, x.stride(0),
                                xq.stride(0) if write_xq else K,
                                HAS_SMOOTH=smooth_recip is not None, CEIL=scale_rule == "ceil", WRITE_XQ=write_xq,
                                WRITE_XS=write_xs, WRITE_CODES=write_codes, BLOCK_M=block_m,
                                NB=nb, num_warps=warps)
    key = ("act", M, K, smooth_recip is not None, write_xq, write_xs, write_codes)
    launch(tiles or pick_tiles(key, ACT_TILES, launch, x))
    if write_xq:
        out["xq"] = xq if xq_out is None else xq[:, :K]
    if write_xs:
        out["xs"] = xs
    if write_codes:
        out["codes"], out["scales"] = codes, scales
    return out


@triton.jit
def _lowrank_down_kernel(x_ptr, recip_ptr, down_ptr, t_ptr, M, K, stride_xm, R: tl.constexpr,
                         HAS_SMOOTH: tl.constexpr, HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """T = x_s · L2ᵀ for BLOCK_M rows (x [M, K] bf16, L2 [R, K] bf16, T [M, R] bf16), x_s = bf16(x · r)
    formed in registers as the quantizer forms it, so x_s never goes to memory; fp32 sums, one rounding.
    In Triton's interpreter (HW False) the operands go to the dot as fp32: it mis-evaluates bf16 ``tl.dot``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load_smoothed_rows(x_ptr, recip_ptr, rm, cols, M, K, stride_xm, HAS_SMOOTH, HW)
        d = tl.load(down_ptr + rr[None, :] * K + cols[:, None], mask=cols[:, None] < K, other=0.0)  # L2ᵀ tile
        if HW:
            acc += tl.dot(x, d)
        else:
            acc += tl.dot(x.to(tl.float32), d.to(tl.float32), input_precision="ieee")
    tl.store(t_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], _bf16(acc, HW), mask=rm[:, None] < M)


# (BLOCK_M, BLOCK_K, warps) of _lowrank_down_kernel; the first is the default (small M, the interpreter)
DOWN_TILES = [(64, 128, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8), (32, 256, 4), (256, 64, 8)]


def lowrank_down(x: torch.Tensor, smooth_recip: torch.Tensor | None, down: torch.Tensor,
                 tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The low-rank branch's first product ``T = bf16(x · r) · L2ᵀ`` (bf16 ``[M, R]``) from the unsmoothed
    bf16 ``x [M, K]``, with the smoothing in the kernel's load (``_lowrank_down_kernel``): the activation
    quantizer need not write x_s for it. The reference computes ``F.linear(x_s, L2)``: the same products,
    fp32 sums in another order, one rounding. Ranks that are not a power of two from 16 to 128, and
    non-bf16 inputs, take that torch expression."""
    R = down.shape[0]
    if R not in (16, 32, 64, 128) or x.dtype != torch.bfloat16 or down.dtype != torch.bfloat16:
        xs = x if smooth_recip is None else (x.float() * smooth_recip).to(x.dtype)
        return torch.nn.functional.linear(xs, down)
    assert x.dim() == 2 and x.stride(1) == 1
    M, K = x.shape
    down = down.contiguous()
    t = x.new_empty(M, R)

    def launch(tiles):
        block_m, block_k, warps = tiles
        _lowrank_down_kernel[(triton.cdiv(M, block_m),)](
            x, smooth_recip if smooth_recip is not None else x, down, t, M, K, x.stride(0), R=R,
            HAS_SMOOTH=smooth_recip is not None, HW=x.is_cuda, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    launch(tiles or pick_tiles(("down", M, K, R, smooth_recip is not None), DOWN_TILES, launch, x))
    return t


# ---------------------------------------------------------------------------- packed-weight GEMM


@triton.jit
def _e2m1_to_bf16(packed, scale, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS/2] uint8 codes + [ROWS, COLS/32] uint8 E8M0 -> [ROWS, COLS] bf16, by building the
    fp32 bits: sign<<31 | (E - 1 + S)<<23 | m<<22 for codes 2..7 (value 2^(E-1)(1 + m/2) 2^(S-127)),
    (S - 1)<<23 for code 1 (0.5), 0 for code 0; then an exact cast to bf16. Exact for scales
    2^-125 .. 2^125 (S in 2..252)."""
    lo = packed & 15
    hi = packed >> 4
    c = tl.reshape(tl.join(lo, hi), [ROWS, COLS]).to(tl.int32)
    c3 = tl.reshape(c, [ROWS, COLS // 32, 32])
    S = scale.to(tl.int32)[:, :, None]
    idx = c3 & 7
    ex = idx >> 1
    body = tl.where(idx >= 2, ((ex - 1 + S) << 23) | ((idx & 1) << 22), tl.where(idx == 1, (S - 1) << 23, 0))
    b32 = body | ((c3 & 8) << 28)
    return tl.reshape(b32.to(tl.float32, bitcast=True), [ROWS, COLS]).to(tl.bfloat16)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles sweep the N tiles together,
    so the weight tiles they share stay in L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + ((pid % group) % size_m), (pid % group) // size_m


@triton.jit
def _mxfp4_gemm_kernel(a_ptr, w_ptr, ws_ptr, t_ptr, l1_ptr, bias_ptr, c_ptr,
                       M, N, K, R, stride_am, stride_cm,
                       HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, R_PAD: tl.constexpr, LR_FP32: tl.constexpr,
                       VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M                 # wrap: loads stay in bounds
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    rk2 = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 32)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * (K // 2) + rk2[None, :]
    s_ptrs = ws_ptr + rn.to(tl.int64)[:, None] * (K // 32) + rks[None, :]
    if VARIANT >= 2:        # transposed: the upcast weight is the MMA's A operand (kept in registers)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs)
        wp = tl.load(w_ptrs)
        ws = tl.load(s_ptrs)
        if VARIANT == 0:    # Triton's microscaled dot: e2m1 upcast to bf16 in registers, bf16 MMA
            acc = tl.dot_scaled(a, None, "bf16", tl.trans(wp), ws, "e2m1", acc, fast_math=True)
        elif VARIANT == 1:  # the same upcast by hand
            w = _e2m1_to_bf16(wp, ws, BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(w), acc)
        elif VARIANT == 2:  # yᵀ = W xᵀ: the e2m1 operand on the left
            acc = tl.dot_scaled(wp, ws, "e2m1", tl.trans(a), None, "bf16", acc, fast_math=True)
        else:
            w = _e2m1_to_bf16(wp, ws, BLOCK_N, BLOCK_K)
            acc = tl.dot(w, tl.trans(a), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 32
    if VARIANT >= 2:
        acc = tl.trans(acc)
    if HAS_LR:              # (x_s L2ᵀ) L1ᵀ, accumulated in fp32 into the same tile
        rr = tl.arange(0, R_PAD)
        t = tl.load(t_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
        l1 = tl.load(l1_ptr + rn.to(tl.int64)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
        if LR_FP32:         # Triton's CPU interpreter gets bf16 tl.dot wrong; it runs this in fp32
            acc = tl.dot(t.to(tl.float32), tl.trans(l1.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(t, tl.trans(l1), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + cm.to(tl.int64)[:, None] * stride_cm + cn[None, :]
    tl.store(c_ptrs, _to_bf16_rne(acc), mask=(cm[:, None] < M) & (cn[None, :] < N))


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, out_ptr, N, K, stride_om,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed MXFP4 [N, K/2] + E8M0 [N, K/32] -> bf16 [N, K] (row stride ``stride_om``), exact."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rk = tl.arange(0, BLOCK_K)
    rk2 = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 32)
    rows = rn.to(tl.int64)[:, None]
    m = rn[:, None] < N
    wp = tl.load(w_ptr + rows * (K // 2) + k0 // 2 + rk2[None, :], mask=m, other=0)
    ws = tl.load(ws_ptr + rows * (K // 32) + k0 // 32 + rks[None, :], mask=m, other=127)
    w = _e2m1_to_bf16(wp, ws, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows * stride_om + k0 + rk[None, :], w, mask=m)


def dequant_weight(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 values of a packed MXFP4 weight ``[N, K]`` (K % 128 == 0), into the first K columns
    of ``out`` if given. Equal to ``decode(packed).to(bf16)`` for scales in 2^-125..2^125."""
    N, K = codes.shape[0], codes.shape[1] * 2
    out = torch.empty(N, K, device=codes.device, dtype=torch.bfloat16) if out is None else out
    _dequant_kernel[(triton.cdiv(N, 32), K // 128)](codes, scales, out, N, K, out.stride(0),
                                                   BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return out


def upcast_linear(x: torch.Tensor, layer_codes: torch.Tensor, layer_scales: torch.Tensor,
                  clip_table: torch.Tensor, bin_idx: int, smooth_recip: torch.Tensor | None, scale_rule: str,
                  bias: torch.Tensor | None, l1: torch.Tensor | None, l2: torch.Tensor | None) -> torch.Tensor:
    """The large-M path: the same products and one fp32-accumulated bf16 rounding as
    :func:`mxfp4_linear`, on cuBLAS's bf16 tensor-core GEMM (which Triton's upcasting GEMM reaches
    only ~60% of on Hopper). Per call, the packed weight is upcast once into a transient bf16
    buffer (N·(K + r) elements, freed after the call: the model still *holds* only the packed
    weight); the activation quantizer writes ``[xq | x_s L2ᵀ]`` side by side, the buffer holds
    ``[deq(W) | L1]``, so one GEMM ``[xq | T] · [deq(W) | L1]ᵀ + b`` gives main product, low-rank
    branch and bias with a single rounding.
    """
    M, K = x.shape
    N = layer_codes.shape[0]
    R = 0 if l1 is None else l1.shape[1]
    a = x.new_empty(M, K + R)
    act_quant(x, clip_table, bin_idx, smooth_recip, scale_rule=scale_rule, xq_out=a)
    w = torch.empty(N, K + R, device=x.device, dtype=torch.bfloat16)
    dequant_weight(layer_codes, layer_scales, out=w)
    if R:
        a[:, K:] = lowrank_down(x, smooth_recip, l2)
        w[:, K:] = l1
    if bias is not None:
        return torch.addmm(bias, a, w.t())
    return a @ w.t()


# (VARIANT, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried once per (M, N, K, R) by
# :func:`_pick_config` (median of do_bench), the fastest kept. Variants: 0 tl.dot_scaled(x, Wᵀ),
# 1 hand upcast + tl.dot(x, Wᵀ), 2 tl.dot_scaled(W, xᵀ) (upcast weight as the register operand of
# wgmma), 3 hand upcast + tl.dot(W, xᵀ).
CONFIGS = [
    (0, 128, 128, 64, 4, 4),
    (0, 128, 256, 64, 8, 3),
    (2, 128, 128, 64, 4, 4),
    (2, 128, 256, 64, 8, 3),
    (2, 256, 128, 64, 8, 3),
    (3, 128, 128, 64, 4, 4),
    (3, 256, 128, 64, 8, 3),
    (1, 128, 128, 64, 4, 4),
]
_SMALL_M = (0, 64, 128, 128, 4, 4)
_settings: dict = {"variant": None, "config": None}
_tuned: dict[tuple, tuple] = {}


def set_gemm_options(variant: int | None = None, config: tuple | None = None) -> None:
    """Restrict the search to one GEMM variant, and/or pin one config ``(variant, BM, BN, BK, warps,
    stages)`` (None: search all of :data:`CONFIGS`)."""
    _settings["variant"] = None if variant is None else int(variant)
    _settings["config"] = config
    _tuned.clear()


@contextlib.contextmanager
def gemm_options(variant: int | None = None, config: tuple | None = None):
    """:func:`set_gemm_options` for a block of code; the previous settings (and a fresh tuning) after it."""
    before = dict(_settings)
    set_gemm_options(variant, config)
    try:
        yield
    finally:
        set_gemm_options(before["variant"], before["config"])


def _launch(cfg, a, codes, scales, t, l1, bias, out, M, N, K, R):
    variant, BM, BN, BK, warps, stages = cfg
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    dummy = out
    _mxfp4_gemm_kernel[grid](a, codes, scales, t if t is not None else dummy, l1 if l1 is not None else dummy,
                             bias if bias is not None else dummy, out, M, N, K, R, a.stride(0), out.stride(0),
                             HAS_BIAS=bias is not None, HAS_LR=t is not None,
                             R_PAD=max(16, triton.next_power_of_2(max(R, 1))), LR_FP32=not a.is_cuda,
                             VARIANT=variant, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
                             num_warps=warps, num_stages=stages)


def _pick_config(a, codes, scales, t, l1, bias, out, M, N, K, R):
    if _settings["config"] is not None:
        return _settings["config"]
    want = _settings["variant"]
    if M <= 2048 or not a.is_cuda:
        return _SMALL_M if want is None else (want, *_SMALL_M[1:])
    key = (M, N, K, R, want)
    if key not in _tuned:
        best, best_ms = None, float("inf")
        for cfg in CONFIGS:
            if K % cfg[3] or (want is not None and cfg[0] != want):
                continue
            try:
                ms = triton.testing.do_bench(lambda: _launch(cfg, a, codes, scales, t, l1, bias, out, M, N, K, R),
                                             warmup=5, rep=25, return_mode="median")
            except Exception:  # noqa: BLE001  (a config that does not compile or fit is skipped)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"no MXFP4 GEMM config ran for M={M} N={N} K={K}")
        _tuned[key] = best
    return _tuned[key]


def tuned_configs() -> dict:
    """The configs the searches chose: GEMMs by (M, N, K, R, variant restriction), quantizer tiles by shape."""
    return {**{str(k): v for k, v in _tuned.items()}, **{str(k): v for k, v in _tiles_tuned.items()}}


def mxfp4_linear(xq: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 t: torch.Tensor | None = None, l1: torch.Tensor | None = None,
                 variant: int | None = None) -> torch.Tensor:
    """``y = xq · deq(codes, scales)ᵀ + t · l1ᵀ + bias`` in one kernel, bf16 out, fp32 accumulation.

    ``xq [M, K]`` bf16 (the MXFP4 activation values from :func:`act_quant`), ``codes [N, K/2]`` and
    ``scales [N, K/32]`` uint8 (a PackedTensor's ``codes``/``scales`` as stored), ``t [M, R]`` and
    ``l1 [N, R]`` bf16 the low-rank branch (``t = x_s · L2ᵀ``), ``bias [N]``. K % 64 == 0.
    """
    M, K = xq.shape
    N = codes.shape[0]
    assert xq.dtype == torch.bfloat16 and xq.stride(1) == 1 and K % 64 == 0
    assert codes.shape == (N, K // 2) and scales.shape == (N, K // 32)
    R = 0 if t is None else t.shape[1]
    if t is not None:
        t, l1 = t.contiguous(), l1.contiguous()
    out = xq.new_empty(M, N)
    if variant is not None:
        cfg = (variant, *_SMALL_M[1:]) if M <= 2048 or not xq.is_cuda else next(c for c in CONFIGS if c[0] == variant)
    else:
        cfg = _pick_config(xq, codes, scales, t, l1, bias, out, M, N, K, R)
    _launch(cfg, xq, codes, scales, t, l1, bias, out, M, N, K, R)
    return out
