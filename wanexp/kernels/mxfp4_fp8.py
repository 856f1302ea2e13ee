"""MXFP4 W4A4 on FP8 tensor cores: the block scales of a row folded into its E4M3 values.

An MXFP4 row (a token of the activations, an output row of the weight) holds E2M1 magnitudes q
and one E8M0 exponent e_b per 32-element block b: value = ±q · 2^e_b. With S the row's largest
block exponent (over blocks holding a nonzero code) and d_b = S − e_b >= 0 its gap,

    value = ±q · 2^(H − d_b) · 2^(S − H),        H = 6 (headroom)

so the row becomes an E4M3 operand v = ±q · 2^(H − d_b) times one fp32 scale 2^(S − H). Then

    y[m, n] = Σ_k A[m, k] W[n, k] = 2^(S_a[m] − H) · 2^(S_w[n] − H) · Σ_k v_a[m, k] v_w[n, k]

is one FP8 GEMM with a scale per row and per column (``torch._scaled_mm``: row-wise scaling, or the
tensor-wise kernel on the bare operands with the power-of-two scales applied exactly in the
low-rank branch's pass, see :func:`fp8_linear`), the products exact (E4M3 × E4M3 fits fp32) and
only the summation order differs from the bf16 reference path.

When the fold is exact. The nonzero E2M1 magnitudes are j/2, j ∈ {1, 2, 3, 4, 6, 8, 12}: at
most two significant bits. E4M3 (``float8_e4m3fn``) holds every such number from its smallest
subnormal 2^-9 up to 448: normals 2^-6 … 448 keep 3 mantissa bits, subnormals are the multiples
of 2^-9. So v = j · 2^(H − 1 − d) is exact iff it is at most 448 and a multiple of 2^-9:

* top: j = 12 at d = 0 gives 12 · 2^(H−1) = 384 <= 448 with H = 6 (H = 7 would give 768): H = 6
  is the largest headroom;
* bottom: j odd (q = 0.5, 1.5) needs 2^(H − 1 − d) >= 2^-9, i.e. d <= H + 8 = 14; even j reach
  one or more octaves further.

Hence :data:`MAX_SPREAD` = 14: a row whose block exponents (over blocks with a nonzero code)
span at most 14 octaves folds exactly; at 15, q = 0.5 and 1.5 of its lowest blocks would round
(tested both ways). Rows beyond the bound take the exact fallback: that row's output is
computed by the bf16 path (exact upcast, as the reference), and the layer counts them
(``QuantLinear.fallbacks``: activation rows and weight rows, summed over calls; the bench
reports them).

Everything here has its plain-torch reference (:func:`fold_reference`), against which the Triton
activation quantizer's FP8 output (``_act_fp8_kernel``) and the weight fold
(``_fold_weight_kernel``) are bit-exact (tests/test_kernels.py, in Triton's interpreter on CPU and
compiled on a GPU). The weight is folded per call into a transient E4M3 buffer (N·K bytes, half
the bf16 upcast path's), so the model still holds only the packed weight; the row exponents and
spreads of the weight are computed once per layer (``wanexp.kernels.weight_rows``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4 import (_bf16, _block_exponent, _e2m1_magnitude, _inv_pow2, _recip_tile, _to_bf16_rne, act_quant,
                                  dequant_weight, lowrank_down, pick_tiles)

HEADROOM = 6      # H: 12 · 2^(H-1) = 384 <= 448, the E4M3 maximum
MAX_SPREAD = 14   # H + 8: the widest block-exponent span of a row that folds exactly
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---------------------------------------------------------------------------- the reference


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] (element 2i in the low nibble) -> int64 codes [R, K]."""
    c = codes.to(torch.int64)
    return torch.stack((c & 15, c >> 4), dim=-1).flatten(-2)


def row_exponents(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, spread) of each row of a packed MXFP4 matrix: S the largest block exponent over blocks
    holding a nonzero code (0 for an all-zero row), spread = max over those blocks of S − e_b."""
    c = _unpack(codes)
    rows, k = c.shape
    live = ((c & 7) > 0).reshape(rows, k // 32, 32).any(-1)
    e = scales.to(torch.int64) - 127
    low = torch.iinfo(torch.int64).min
    S = torch.where(live, e, low).amax(1)
    S = torch.where(live.any(1), S, 0)
    spread = torch.where(live, S[:, None] - e, 0).amax(1)
    return S.to(torch.int32), spread.to(torch.int32)


def fold_reference(codes: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fold of a packed MXFP4 matrix, from the definition: ``values`` (float8_e4m3fn [R, K],
    ±q · 2^(H − d_b), cast with round-to-nearest-even, exact where ``spread <= MAX_SPREAD``),
    ``scale`` (fp32 [R], 2^(S − H)), ``spread`` (int32 [R]) and ``exponent`` (S, int32 [R])."""
    c = _unpack(codes)
    rows, k = c.shape
    S, spread = row_exponents(codes, scales)
    lut = torch.tensor(_E2M1, dtype=torch.float64, device=c.device)
    mag = lut[c & 7]
    d = (S.to(torch.int64)[:, None] - (scales.to(torch.int64) - 127)).clamp_min(0)
    d = d.repeat_interleave(32, dim=1)
    v = torch.ldexp(mag, (HEADROOM - d).to(torch.float64))
    v = torch.where((c & 8).bool() & (mag > 0), -v, v)
    scale = torch.ldexp(torch.ones(rows, dtype=torch.float64, device=c.device), (S - HEADROOM).to(torch.float64))
    return {"values": v.to(torch.float32).to(torch.float8_e4m3fn), "scale": scale.to(torch.float32),
            "spread": spread, "exponent": S}


def linear_reference(a: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp64 Σ_k of the folded operands, rescaled: equal to A · Wᵀ of the MXFP4 values on rows that fit."""
    prod = a["values"].double() @ w["values"].double().T
    return prod * a["scale"].double()[:, None] * w["scale"].double()[None, :]


# ---------------------------------------------------------------------------- the kernels


@triton.jit
def _e4m3_bits(q, d, neg, HW: tl.constexpr = False):
    """E4M3 bits of ±q · 2^(6 − d) for an E2M1 magnitude q (fp32) and a block's exponent gap d >= 0:
    exact while d <= 14 (MAX_SPREAD, the module docstring); beyond, round to nearest even like a cast;
    −0 written as +0. HW (on a GPU): the hardware cast, which rounds the same way; otherwise built on
    the bits, as Triton's interpreter (whose casts truncate) needs."""
    p = ((127 + 6 - tl.minimum(d, 40)) << 23).to(tl.float32, bitcast=True)   # 2^(6 - d), exact
    mag = q * p
    if HW:
        bits = tl.where(neg & (q > 0), -mag, mag).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        mb = mag.to(tl.int32, bitcast=True)
        ex = ((mb >> 23) & 255) - 127
        normal = (((ex + 7) << 3) | ((mb >> 20) & 7))                # 3 mantissa bits suffice (q has 2)
        sub = ((mag * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)   # multiples of 2^-9, RNE
        bits = (tl.where(ex >= -6, normal, sub) | tl.where(neg & (q > 0), 128, 0)).to(tl.uint8)
    return bits


@triton.jit
def _nibble_tile(w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's [BLOCK_N, BLOCK_K] tile of 4-bit codes (int32 0..15) from a packed [N, K/2] uint8 weight
    (element 2i in the low nibble); with its rows (int32 and int64 column), row mask and first column."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = rn.to(tl.int64)[:, None]
    m = rn[:, None] < N
    packed = tl.load(w_ptr + rows * (K // 2) + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=m, other=0)
    return rn, rows, m, k0, tl.reshape(tl.join(packed & 15, packed >> 4), [BLOCK_N, BLOCK_K]).to(tl.int32)


@triton.jit
def _fold_weight_kernel(w_ptr, ws_ptr, exp_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed MXFP4 [N, K/2] + E8M0 [N, K/32] + row exponents S [N] -> E4M3 bits [N, K]."""
    rn, rows, m, k0, c = _nibble_tile(w_ptr, N, K, BLOCK_N, BLOCK_K)
    c3 = tl.reshape(c, [BLOCK_N, BLOCK_K // 32, 32])
    e = tl.load(ws_ptr + rows * (K // 32) + k0 // 32 + tl.arange(0, BLOCK_K // 32)[None, :], mask=m,
                other=127).to(tl.int32) - 127
    S = tl.load(exp_ptr + rn, mask=rn < N, other=0)
    d = tl.maximum(S[:, None] - e, 0)[:, :, None]
    idx = (c3 & 7).to(tl.float32)
    q = tl.where(idx < 4.0, idx * 0.5, tl.where(idx < 6.0, idx - 2.0, (idx - 4.0) * 2.0))
    bits = tl.reshape(_e4m3_bits(q, d, (c3 & 8) > 0), [BLOCK_N, BLOCK_K])
    tl.store(out_ptr + rows * K + k0 + tl.arange(0, BLOCK_K)[None, :], bits, mask=m)


def fold_weight(codes: torch.Tensor, scales: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] fold of a packed weight, given its row exponents (:func:`row_exponents`)."""
    N, K = codes.shape[0], codes.shape[1] * 2
    out = torch.empty(N, K, device=codes.device, dtype=torch.uint8)
    _fold_weight_kernel[(triton.cdiv(N, 32), K // 128)](codes, scales, exponent, out, N, K,
                                                        BLOCK_N=32, BLOCK_K=128, num_warps=4)
    return out.view(torch.float8_e4m3fn)


@triton.jit
def _act_fp8_kernel(x_ptr, recip_ptr, clip_ptr, bin_idx, xs_ptr, a8_ptr, scale_ptr, spread_ptr, exp_ptr,
                    M, K, stride_xm, HAS_SMOOTH: tl.constexpr, WRITE_XS: tl.constexpr, CEIL: tl.constexpr,
                    HW: tl.constexpr, READBACK: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr,
                    EVEN_K: tl.constexpr = False):
    """BLOCK_M whole rows of x, two passes over K: the row maximum of |x_s| (which fixes S), then the
    quantizer writing E4M3 bits, x_s on request, and each row's spread, S and scale 2^(S − H). The
    second pass reads mostly from L2, so HBM sees x once. READBACK (with x_s written): the first
    pass writes x_s and the second reads it back, so the smoothing runs once an element, not
    twice (which is faster depends on the shape: the tile picker times both). HW (on a GPU): the
    hardware bf16 and E4M3 casts, both RNE, as the interpreter's bit-built ones."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = rm[:, None, None]
    rb = tl.arange(0, NB)
    re = tl.arange(0, 32)
    rho = tl.load(clip_ptr + bin_idx)
    top = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, NB * 32):                                   # pass 1: max_k |x_s|
        cols = k0 + rb[None, :, None] * 32 + re[None, None, :]
        mask = (rows < M) & (cols < K)
        v = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
        if HAS_SMOOTH:   # reference: bf16(x.float() * r)
            v = v.to(tl.float32) * _recip_tile(recip_ptr, rows, cols, mask, EVEN_K)
            if WRITE_XS and READBACK:
                v = _bf16(v, HW)
                tl.store(xs_ptr + rows.to(tl.int64) * K + cols, v, mask=mask)
        top = tl.maximum(top, tl.max(tl.max(tl.abs(v.to(tl.float32)), axis=2), axis=1))
    if HAS_SMOOTH:
        # max_k |bf16(p_k)| = bf16(max_k |p_k|): RNE is monotone and odd, so the row's max of the
        # fp32 products rounds once instead of every product (the same bits)
        top = _bf16(top, HW).to(tl.float32)
    S = _block_exponent(top * rho, CEIL)                              # the row's top block exponent
    if WRITE_XS and READBACK:
        tl.debug_barrier()                                            # pass 2 reads back what pass 1 wrote
    spread = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, NB * 32):                                   # pass 2: the quantizer
        cols = k0 + rb[None, :, None] * 32 + re[None, None, :]
        mask = (rows < M) & (cols < K)
        if WRITE_XS and READBACK:
            v = tl.load(xs_ptr + rows.to(tl.int64) * K + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            v = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
            if HAS_SMOOTH:
                v = _bf16(v.to(tl.float32) * _recip_tile(recip_ptr, rows, cols, mask, EVEN_K), HW)
                if WRITE_XS:
                    tl.store(xs_ptr + rows.to(tl.int64) * K + cols, v, mask=mask)
            v = v.to(tl.float32)
        top_b = tl.max(tl.abs(v), axis=2)                            # [BLOCK_M, NB]
        e = _block_exponent(top_b * rho, CEIL)                        # as _act_quant_kernel
        q, y = _e2m1_magnitude(v, e)
        neg = y.to(tl.int32, bitcast=True) < 0
        d = tl.maximum(S[:, None] - e, 0)                             # >= 0 on every block with a code
        # a block holds a nonzero code iff its largest |y| rounds above 0, i.e. exceeds 0.25: taken from
        # the block maximum (scaling by 2^-e is monotone, so max |y| = top_b · 2^-e), not a second reduction
        live = (top_b * _inv_pow2(e) > 0.25) & ((k0 // 32 + rb)[None, :] < K // 32)
        spread = tl.maximum(spread, tl.max(tl.where(live, d, 0), axis=1))
        tl.store(a8_ptr + rows.to(tl.int64) * K + cols, _e4m3_bits(q, d[:, :, None], neg, HW), mask=mask)
    live_rows = rm < M
    tl.store(spread_ptr + rm, spread, mask=live_rows)
    tl.store(exp_ptr + rm, S, mask=live_rows)
    g = S - 6                                                         # 2^(S − H) from its bits; subnormal below 2^-126
    scale_bits = tl.where(g >= -126, (g + 127) << 23, 1 << tl.maximum(g + 149, 0))
    tl.store(scale_ptr + rm, scale_bits.to(tl.float32, bitcast=True), mask=live_rows)


# (BLOCK_M rows, NB 32-blocks a step, warps, READBACK) of _act_fp8_kernel; every choice gives the same
# bits (tested). Round 12 (H200, 57,600 tokens) picked (4, 8, 4) with the read-back, 0.90 ms at K = 5120.
FP8_ACT_TILES = [(4, 8, 4, True), (4, 16, 4, True), (2, 32, 4, True), (8, 8, 4, True), (8, 16, 8, True),
                 (16, 8, 8, True), (4, 8, 4, False), (4, 16, 4, False), (2, 32, 4, False), (8, 8, 4, False),
                 (8, 16, 8, False), (16, 4, 4, False), (2, 16, 4, False), (4, 32, 8, False), (2, 64, 8, False)]


def act_quant_fp8(x: torch.Tensor, clip_table: torch.Tensor, bin_idx: int = 0, smooth_recip: torch.Tensor | None = None,
                  *, scale_rule: str = "floor", write_xs: bool = False,
                  tiles: tuple[int, int, int, bool] | None = None) -> dict[str, torch.Tensor]:
    """MXFP4-quantize the rows of bf16 ``x [M, K]`` straight into the folded FP8 operand: ``values``
    (float8_e4m3fn [M, K]), ``scale`` (fp32 [M], 2^(S − H)), ``spread`` and ``exponent`` (S) (int32
    [M]) and, on request, ``xs`` (the smoothed bf16 input). One kernel (``_act_fp8_kernel``: whole
    rows, two passes over K). ``tiles`` pins one of :data:`FP8_ACT_TILES`; by default the fastest
    is picked per shape (tiles and READBACK alike)."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
    M, K = x.shape
    assert K % 32 == 0, "the fused activation quantizer needs K % 32 == 0"
    write_xs = write_xs and smooth_recip is not None
    out = {"values": torch.empty(M, K, device=x.device, dtype=torch.uint8),
           "scale": torch.empty(M, device=x.device, dtype=torch.float32),
           "spread": torch.empty(M, device=x.device, dtype=torch.int32),
           "exponent": torch.empty(M, device=x.device, dtype=torch.int32)}
    xs = x.new_empty(M, K) if write_xs else x

    def launch(t):
        block_m, nb, warps, readback = t
        _act_fp8_kernel[(triton.cdiv(M, block_m),)](
            x, smooth_recip if smooth_recip is not None else x, clip_table, int(bin_idx), xs, out["values"],
            out["scale"], out["spread"], out["exponent"], M, K, x.stride(0), HAS_SMOOTH=smooth_recip is not None,
            WRITE_XS=write_xs,
            CEIL=scale_rule == "ceil", HW=x.is_cuda, READBACK=readback and write_xs, BLOCK_M=block_m, NB=nb,
            EVEN_K=K % (nb * 32) == 0,
            num_warps=warps)
    launch(tiles or pick_tiles(("act_fp8", M, K, smooth_recip is not None, write_xs), FP8_ACT_TILES, launch, x))
    out["values"] = out["values"].view(torch.float8_e4m3fn)
    if write_xs:
        out["xs"] = xs
    return out


@triton.jit
def _lowrank_add_kernel(y_ptr, t_ptr, up_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, M, N, R: tl.constexpr,
                        SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, HW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = bf16(y · s_row[m] · s_col[n] + b[n] + T · L1ᵀ) in place (y [M, N], T [M, R], L1 [N, R], bf16;
    the scales fp32, with SCALED; the bias bf16, with HAS_BIAS): the rank-R products exact in fp32,
    summed with y in fp32 and rounded once, so y is read and written once. In Triton's interpreter
    (HW False) the operands go to the dot as fp32: it mis-evaluates bf16 ``tl.dot`` on CPU."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R)
    t = tl.load(t_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=rm[:, None] < M, other=0.0)
    u = tl.load(up_ptr + rn[None, :] * R + rr[:, None], mask=rn[None, :] < N, other=0.0)
    if HW:
        p = tl.dot(t, u)
    else:
        p = tl.dot(t.to(tl.float32), u.to(tl.float32), input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        y = y * tl.load(row_scale_ptr + rm, mask=rm < M, other=0.0)[:, None] \
              * tl.load(col_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        p += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(ptrs, _bf16(y + p, HW), mask=mask)


# (BLOCK_M, BLOCK_N, warps) of lowrank_add_ with the scales and bias: the fastest of seven on the H200 at 57,600
# tokens, rank 32 (0.386 ms into 5,120 outputs and 1.020 into 13,824, against 0.486 and 1.328 in the unscaled
# pass's tile (64, 128, 4); experiments/results/round18/epilogue_probe.json)
SCALED_ADD_TILES = (32, 128, 4)


def lowrank_add_(y: torch.Tensor, t: torch.Tensor, up: torch.Tensor,
                 tiles: tuple[int, int, int] = (64, 128, 4), row_scale: torch.Tensor | None = None,
                 col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = y · row_scale[:, None] · col_scale[None, :] + bias + t · upᵀ`` for bf16 ``y [M, N]``,
    ``t [M, R]``, ``up [N, R]``, in place, one rounding (``_lowrank_add_kernel``); the scales (fp32
    ``[M]`` and ``[N]``, both or neither) and the bias are optional. Ranks that are not a power of
    two from 16 to 128 take torch (``addmm_``: two roundings; with scales or bias, fp32 and one).
    ``tiles`` (BLOCK_M, BLOCK_N, warps): round 14's probe (H200, rank 32, 57,600 and 24,960 tokens,
    into 5,120 and 13,824 outputs) found (64, 128, 4) the fastest of five in all four cases for the
    unscaled pass: 0.853 ms into 13,824 outputs at 57,600 tokens and 0.312 ms into 5,120, against
    1.361 and 0.473 ms for ``addmm_``; with the scales, :data:`SCALED_ADD_TILES`."""
    M, N = y.shape
    R = t.shape[1]
    scaled = row_scale is not None
    if scaled != (col_scale is not None):
        raise ValueError("lowrank_add_: row_scale and col_scale come together")
    if R not in (16, 32, 64, 128) or not (y.is_contiguous() and y.dtype == torch.bfloat16):
        if not scaled and bias is None:
            return y.addmm_(t, up.t())
        out = y.float()                                  # one rounding here too, through an fp32 temporary
        if scaled:
            out.mul_(row_scale[:, None]).mul_(col_scale[None, :])
        if bias is not None:
            out.add_(bias.float())
        return y.copy_(out.addmm_(t.float(), up.float().t()))
    t, up = t.contiguous(), up.contiguous()
    bm, bn, warps = tiles
    _lowrank_add_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        y, t, up, row_scale if scaled else y, col_scale if scaled else y, y if bias is None else bias, M, N, R=R,
        SCALED=scaled, HAS_BIAS=bias is not None, HW=y.is_cuda, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y


def fp8_linear(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, clip_table: torch.Tensor, bin_: int,
               smooth_recip: torch.Tensor | None, bias: torch.Tensor | None, up: torch.Tensor | None,
               down: torch.Tensor | None, w_exponent: torch.Tensor, w_spread: torch.Tensor, scale_rule: str,
               counters: torch.Tensor, check: bool = True, triton_gemm: bool = False,
               rowwise: bool = False, spread_peak: torch.Tensor | None = None) -> torch.Tensor:
    """The W4A4 MXFP4 linear ``y = A · deq(W)ᵀ + b (+ (x_s L2ᵀ) L1ᵀ)`` on FP8 tensor cores: rows
    that fold exactly in one FP8 GEMM, the others (activation rows or weight rows beyond
    :data:`MAX_SPREAD`) recomputed by the exact bf16 path and added to ``counters[:2]``
    ([activation rows, weight rows]). The branch's input T = x_s L2ᵀ (bf16,
    :func:`~wanexp.kernels.mxfp4.lowrank_down`, which smooths x in its own load so that the quantizer
    writes no x_s). Two GEMM forms, each two roundings where the reference path has three:

    * with a branch: cuBLAS's tensor-wise FP8 GEMM on the bare operands, bf16(Σ v_a v_w), then one
      :func:`lowrank_add_` pass that scales it by 2^(S_a − H) 2^(S_w − H) (exact: powers of two),
      adds bias and branch and rounds once. The row-wise kernel would scale in its own epilogue, but
      the branch's pass reads and writes y anyway, and the tensor-wise kernel is the faster one
      (H200, 720p expert compiled: 6.251 against 6.380 s; round 18b);
    * without a branch, or with ``rowwise`` (backend "fp8_rowwise"): the row-wise-scaled GEMM with
      the bias in its epilogue (then the branch in :func:`lowrank_add_`).

    (Folding the smoothing into L2 instead would round L2·r where the reference rounds x·r: measured
    on the H200, the output then drifts further from an exact evaluation than the reference does, so
    it is not done.) ``check=False`` skips the search for rows beyond the bound and its host sync
    (the bench's diagnostic "fp8_unchecked" backend only: 0.05 s of a 6.38 s forward, round 18b).
    ``triton_gemm`` (backend "fp8_triton") runs the GEMM as :func:`wanexp.kernels.fp8_gemm.fp8_gemm`,
    bias and low-rank branch in its epilogue, one rounding: closer to the exact value, but measured
    1.17-1.23x the time of cuBLAS + ``lowrank_add_`` on the H200
    (experiments/results/round17/fp8_gemm_probe.json). ``spread_peak`` (int32 [1], on the device):
    instead of the search (and its host sync), the largest activation-row spread is folded into it,
    for a caller that checks it later and reruns with the check where it passed the bound
    (:func:`wanexp.kernels.block_checked`); the weight rows must then fit (the caller knows)."""
    a = act_quant_fp8(x2, clip_table, bin_, smooth_recip, scale_rule=scale_rule)
    w8 = fold_weight(codes, scales, w_exponent)
    w_scale = torch.ldexp(torch.ones_like(w_exponent, dtype=torch.float32), (w_exponent - HEADROOM).float())
    t = None if up is None else lowrank_down(x2, smooth_recip, down)   # the 16-bit branch's input, from x_s
    if triton_gemm and x2.shape[1] % 128 == 0:
        from wanexp.kernels.fp8_gemm import fp8_gemm
        y = fp8_gemm(a["values"], w8, a["scale"], w_scale, bias, t, up)
        pending = None                                                  # the branch is in y already
    elif t is not None and not rowwise:
        one = torch.ones((), dtype=torch.float32, device=x2.device)
        y = torch._scaled_mm(a["values"], w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        lowrank_add_(y, t, up, SCALED_ADD_TILES, row_scale=a["scale"], col_scale=w_scale, bias=bias)
        pending = None                                                  # the branch is in y already
    else:
        y = torch._scaled_mm(a["values"], w8.t(), scale_a=a["scale"][:, None], scale_b=w_scale[None, :],
                             bias=bias, out_dtype=torch.bfloat16)
        pending = t
    del w8
    # activation rows and weight rows beyond the bound, found with one host sync a call
    if spread_peak is not None:
        torch.maximum(spread_peak, a["spread"].amax().reshape(1), out=spread_peak)
        check = False
    wide = torch.empty(0, dtype=torch.int64, device=y.device) if not check else torch.nonzero(torch.cat((a["spread"], w_spread)) > MAX_SPREAD).flatten()
    m = a["spread"].numel()
    wide_rows, wide_cols = wide[wide < m], wide[wide >= m] - m
    if wide_rows.numel() or wide_cols.numel():
        _exact_fallback(x2, codes, scales, clip_table, bin_, smooth_recip, bias, scale_rule, y, wide_rows, wide_cols,
                        None if pending is not None or t is None else (t, up))
        counters[:2] += torch.tensor([wide_rows.numel(), wide_cols.numel()], dtype=counters.dtype)
    if pending is not None:  # the 16-bit branch sees the smoothed, unquantized input
        lowrank_add_(y, pending, up)
    return y


def _exact_fallback(x2, codes, scales, clip_table, bin_, smooth_recip, bias, scale_rule, y, rows, cols,
                    lowrank=None) -> None:
    """Rows / output columns whose fold would round: the bf16 path's exact products, written into y
    (with ``lowrank`` = (T, L1), the branch added to them too: the GEMM had it in its epilogue)."""
    deq = dequant_weight(codes, scales)
    if rows.numel():
        xq = act_quant(x2[rows].contiguous(), clip_table, bin_, smooth_recip, scale_rule=scale_rule)["xq"]
        part = torch.nn.functional.linear(xq, deq, bias)
        y[rows] = part if lowrank is None else lowrank_add_(part, lowrank[0][rows], lowrank[1])
    if cols.numel():
        xq = act_quant(x2, clip_table, bin_, smooth_recip, scale_rule=scale_rule)["xq"]
        part = torch.nn.functional.linear(xq, deq[cols], None if bias is None else bias[cols])
        y[:, cols] = part if lowrank is None else lowrank_add_(part, lowrank[0], lowrank[1][cols])
