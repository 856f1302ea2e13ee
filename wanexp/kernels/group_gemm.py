"""Group-scaled INT8 GEMM for INT4 and HiFloat4 W4A4 on INT8 tensor cores (Triton), with its reference.

Both formats store a value as a small integer times a scale shared along K by a group of G channels:

* INT4 (:mod:`wanexp.formats.integer`): code c in −7..7 times the group's scale (bf16 by default),
  G = ``group_size`` (128 by default; 32..256 here);
* HiFloat4 (:mod:`wanexp.formats.hifloat`): sign · m · L2 · L3 · S with m ∈ {0, 1/4, …, 7/4} and
  L2, L3 ∈ {1, 2}, i.e. the integer q = ±4m·L2·L3 ∈ −28..28 times S/4, one S (E6M2) per 64.

Activations and weights are both grouped along K, so for ``y = A · Bᵀ``

    y[m, n] = Σ_g  sa[m, g] · sb[n, g] · D_g[m, n],      D_g[m, n] = Σ_{k in g} ia[m, k] · ib[n, k]

with int8 operands ia, ib. :func:`group_scaled_mm` computes each D_g on INT8 tensor cores (wgmma
s8·s8 → s32 on Hopper: exact, |D_g| ≤ 128² · 256 = 2^22), then scales it into an fp32 accumulator
on the CUDA cores, one K-group per loop step (BLOCK_K = G).

Measured on an H200 (2026-12-02, experiments/gpu/group_gemm_probe.py, Wan's shapes at 57,600 and
24,960 tokens), the best tile takes 0.96–1.14× the bf16 GEMM's time at G = 128 and 1.42–1.69× at
G = 64, where FP8 ``_scaled_mm`` takes 0.57–0.66×: no gain, so QuantLinear does not use it.

The per-group epilogue is what bounds this kernel on Hopper, not the MMA: per group and output
element it costs 3 instructions (on a 64×128 tile and G = 64, 128 MMA cycles against ~285 issue
cycles of one warp per scheduler), while the MMA's share shrinks with G. Hopper's int→float
conversion is slow (low throughput), so the s32 result is converted with the magic-number trick:
the MMA accumulates onto C = 0x4B400000 (the bits of 1.5·2^23), so that the s32 result, read as
fp32, is f = 1.5·2^23 + D_g exactly (|D_g| ≤ 2^22), and then

    u   = fma(f, sa, −C·sa)   = round(D_g · sa)       (C·sa exact: then f·sa − C·sa is D_g·sa exactly)
    acc = fma(u, sb, acc)                              (the term's rounding is the sum's)

which is what the plain conversion gives (``u = float(D_g) · sa``, then the same fma), bit for bit,
whenever C·sa = 3 · 2^22 · sa is exact, i.e. every scale has at most 22 significant bits: bf16
and fp16 scales (INT4), S/4 (HiF4, 3 bits), whatever :func:`operands_from_packed` returns. For
those, u itself is exact too (|D_g| < 2^14 for INT4 with G <= 256, < 2^16 for HiF4; times 8 or 3
bits). Arbitrary fp32 scales take ``short_scales=False``: the plain conversion (I2F), exact for any
scale, slower. Triton's interpreter evaluates ``tl.fma`` as a product and a sum rounded apart,
which would break the first step; there (``INTERP``) the kernel computes ``u = (f − C) · sa``
(f − C = D_g exactly; one rounding, as the fma) and ``acc + u · sb`` with two roundings: still
within the bound below.

Numerics. The group sums are exact, so the only error is fp32 rounding across the K/G terms: with
n = K/G and t_g = sa·sb·D_g, each term is rounded at most twice (u, then the product with sb) and
each of the n sums and the bias once, so ``|y − (Σ_g t_g + bias)| ≤ (n + 3) · 2^-24 · (Σ_g |t_g| +
|bias|)`` to first order (:func:`rounding_bound`; interpreter included), then one rounding to the
output dtype (RNE, bf16 by default). For the formats' scales u is exact and n + 2 would do.
Tested against :func:`group_scaled_mm_reference` (fp64 of exact integer group sums).

Not wired into QuantLinear (the measurement above): :mod:`wanexp.kernels.upcast` is the path in use;
``experiments/gpu/group_gemm_probe.py`` is the measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanexp.kernels.mxfp4 import _grouped_tile, _to_bf16_rne, pick_tiles

_MAGIC = tl.constexpr(0x4B400000)       # bits of 1.5 · 2^23: its fp32 ulp is 1 over [2^23, 2^24)
_MAGIC_F = tl.constexpr(12582912.0)     # 1.5 · 2^23
GROUPS = (32, 64, 128, 256)             # G: a power of two (tl.arange), >= wgmma's K of 32; |D_g| < 2^22


# ---------------------------------------------------------------------------- the kernel


@triton.jit
def _scale_group(a, b, sa, sb, acc, MAGIC: tl.constexpr, INTERP: tl.constexpr):
    """acc + D · sa[:, None] · sb[None, :] with D = a · bᵀ (int8 tiles, exact s32 MMA)."""
    if MAGIC:
        f = tl.dot(a, tl.trans(b), tl.full((a.shape[0], b.shape[0]), _MAGIC, tl.int32),
                   out_dtype=tl.int32).to(tl.float32, bitcast=True)   # Triton 3.6 wants out_dtype with an int acc
        if INTERP:   # the interpreter's fma rounds twice; (f - C) is exact, then one rounding like the fma
            return acc + ((f - _MAGIC_F) * sa[:, None]) * sb[None, :]
        u = tl.fma(f, sa[:, None], (sa * -_MAGIC_F)[:, None])
        return tl.fma(u, sb[None, :], acc)
    else:
        d = tl.dot(a, tl.trans(b), out_dtype=tl.int32).to(tl.float32)
        return acc + (d * sa[:, None]) * sb[None, :]


@triton.jit
def _group_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                       stride_am, stride_bn, stride_cm, stride_sam, stride_sag, stride_sbn, stride_sbg,
                       G: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FP32: tl.constexpr, MAGIC: tl.constexpr,
                       INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)       # grouped order: L2 reuse of B
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, G)
    # operand rows wrap (in bounds, no masks in the loop); their results are masked at the store
    a_ptrs = a_ptr + (rm % M).to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + (rn % N).to(tl.int64)[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // G):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        # scales from their pointers each step (not carried): contiguous along m / n when group-major
        sa = tl.load(sa_ptr + g * stride_sag + rm * stride_sam, mask=rm < M, other=0.0)
        sb = tl.load(sb_ptr + g * stride_sbg + rn * stride_sbn, mask=rn < N, other=0.0)
        acc = _scale_group(a, b, sa, sb, acc, MAGIC, INTERP)
        a_ptrs += G
        b_ptrs += G
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if OUT_FP32:
        tl.store(c_ptrs, acc, mask=mask)
    else:
        tl.store(c_ptrs, _to_bf16_rne(acc), mask=mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg), timed once per shape by pick_tiles (the first
# one off the GPU and at small M). Chosen from ptxas's report for sm_90a (compiled offline, not yet
# timed): the s32 tile and the fp32 accumulator both live in registers (2 · BM·BN / threads), so a
# warpgroup holds at most 64×128 of each (169-209 registers; 128×128 on 4 warps, or two N halves of
# it, spills). Each warp waits for its own MMA before scaling its result, so MMA and epilogue
# overlap across CTAs: 64×128 on 4 warps runs 2 CTAs an SM, 3 under maxnreg 168 (smem permitting:
# 3 stages at G = 128, 4 at G = 64). 128×128 and 64×256 on 8 warps are one CTA of two warpgroups.
# Loop body per warp and group (G = 64): 128 FFMA + 64 moves (the magic into the s32 tile) + ~95
# loads, addresses, barriers: ~290 issue cycles against 128 tensor-core cycles for a 64×128 tile.
TILES = [(64, 128, 4, 4, None), (64, 128, 4, 3, 168), (64, 128, 4, 4, 168), (64, 128, 4, 2, 168),
         (128, 128, 8, 3, None), (64, 256, 8, 3, None)]


def _launch(tile, a, a_scale, b, b_scale, bias, out, group, magic):
    block_m, block_n, warps, stages, maxnreg = tile
    M, K = a.shape
    N = b.shape[0]
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    extra = {"maxnreg": maxnreg} if maxnreg and a.is_cuda else {}
    _group_gemm_kernel[grid](a, a_scale, b, b_scale, bias if bias is not None else out, out, M, N, K,
                             a.stride(0), b.stride(0), out.stride(0), a_scale.stride(0), a_scale.stride(1),
                             b_scale.stride(0), b_scale.stride(1), G=group, HAS_BIAS=bias is not None,
                             OUT_FP32=out.dtype == torch.float32, MAGIC=magic, INTERP=not a.is_cuda,
                             BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=warps, num_stages=stages,
                             **extra)


def _check(a, a_scale, b, b_scale, group, bias, out_dtype) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"group_scaled_mm: int8 a [M, K] and b [N, K], got {a.dtype} {tuple(a.shape)} "
                         f"and {b.dtype} {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    if group not in GROUPS or K % group:
        raise ValueError(f"group_scaled_mm: group must be one of {GROUPS} and divide K = {K}, got {group}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("group_scaled_mm: a and b must be contiguous along K")
    for name, s, rows in (("a_scale", a_scale, M), ("b_scale", b_scale, N)):
        if s.dtype != torch.float32 or tuple(s.shape) != (rows, K // group):
            raise ValueError(f"group_scaled_mm: {name} must be fp32 [{rows}, {K // group}], "
                             f"got {s.dtype} {tuple(s.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"group_scaled_mm: bias must be [{N}], got {tuple(bias.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"group_scaled_mm: out_dtype bfloat16 or float32, got {out_dtype}")


def group_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, group: int,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                    short_scales: bool = True, tiles: tuple | None = None) -> torch.Tensor:
    """``y[m, n] = Σ_g a_scale[m, g] · b_scale[n, g] · Σ_{k in g} a[m, k] · b[n, k] (+ bias[n])``.

    ``a`` int8 [M, K], ``b`` int8 [N, K] (contiguous along K), ``a_scale`` fp32 [M, K/G] and
    ``b_scale`` fp32 [N, K/G] of any strides (fastest group-major, see :func:`group_major`),
    G = ``group`` in :data:`GROUPS`. fp32 accumulation, one rounding to ``out_dtype`` (bf16 or fp32).
    ``short_scales``: every scale has at most 22 significant bits (bf16, fp16, HiF4's S/4), which the
    fast conversion needs to stay exact (module docstring); False for arbitrary fp32 scales. ``tiles``
    pins one of :data:`TILES`; by default the fastest is timed once per shape on the GPU.
    """
    _check(a, a_scale, b, b_scale, group, bias, out_dtype)
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out

    def launch(tile):
        _launch(tile, a, a_scale, b, b_scale, bias, out, group, short_scales)
    launch(tiles or pick_tiles(("group_mm", M, N, K, group, bias is not None, out_dtype, short_scales), TILES, launch, a))
    return out


def group_major(scale: torch.Tensor) -> torch.Tensor:
    """The same [R, K/G] scales stored group-major (strides (1, R)): a group's scales of consecutive
    rows are adjacent, which the kernel reads with vector loads."""
    return scale.t().contiguous().t()


# ---------------------------------------------------------------------------- the reference


def group_scaled_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                              group: int, bias: torch.Tensor | None = None, *, absolute: bool = False) -> torch.Tensor:
    """fp64 ``Σ_g sa · sb · D_g (+ bias)``, each D_g an exact integer (fp64 holds the int8 products'
    sums exactly, on the CPU and in cuBLAS's DGEMM alike). ``absolute``: ``Σ_g |sa · sb · D_g| + |bias|``
    instead, the scale of the fp32 rounding bound (module docstring)."""
    M, K = a.shape
    y = torch.zeros(M, b.shape[0], dtype=torch.float64, device=a.device)
    a64, b64 = a.double(), b.double()
    sa, sb = a_scale.double(), b_scale.double()
    for g in range(K // group):
        cols = slice(g * group, (g + 1) * group)
        term = (a64[:, cols] @ b64[:, cols].T) * sa[:, g, None] * sb[None, :, g]
        y += term.abs() if absolute else term
    if bias is not None:
        y += (bias.double().abs() if absolute else bias.double())[None, :]
    return y


def rounding_bound(a, a_scale, b, b_scale, group, bias=None) -> torch.Tensor:
    """Elementwise bound on |kernel (fp32 output) − reference|: (K/G + 3) · 2^-24 · (Σ_g |t_g| + |bias|),
    with a 1e-3 margin for the second-order terms."""
    n = a.shape[1] // group
    absum = group_scaled_mm_reference(a, a_scale, b, b_scale, group, bias, absolute=True)
    return (n + 3) * 2.0**-24 * 1.001 * absum


# ---------------------------------------------------------------------------- the operands of the formats


def _unpacked(packed):
    """The format's own decode of a 2-D packed tensor up to its last product: (values q, scale dict s)
    in the format's block view, whole groups only."""
    from wanexp.formats import get_format
    fmt = get_format(packed.format, **packed.options)
    k = packed.shape[-1]
    if k % fmt._block_len(k):
        raise ValueError(f"{packed.format}: K = {k} is not a whole number of groups of {fmt._block_len(k)}")
    return fmt._unpack(packed.data, fmt._view_shape(tuple(packed.shape)))


def _int_operands(packed) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _unpacked(packed)                                            # q: the codes, as floats
    rows = packed.shape[0]
    return q.reshape(rows, -1).to(torch.int8), s["scale"].reshape(rows, -1)


def _hif4_operands(packed) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _unpacked(packed)                                            # q = ±m, m in {0, 1/4, ..., 7/4}
    rows = packed.shape[0]
    ints = q * 4 * s["L2"] * s["L3"]                                   # ±4m · L2 · L3 in -28..28, exact
    return ints.reshape(rows, -1).to(torch.int8), s["S"].reshape(rows, -1) / 4   # S/4 exact: a power of two apart


def operands_from_packed(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [R, K], fp32 group scales [R, K/G], group-major) of a 2-D packed INT4, INT8 or
    HiF4 tensor: value = int8 · scale, exactly the product the format's decode computes in fp32 (INT4:
    code · scale; HiF4: (±4m · L2 · L3) · S/4). The format's decode then casts to the tensor's dtype:
    for HiF4 that is exact (its values fit bf16); an INT4 value (3 + 8 significant bits with a bf16
    scale) is rounded by a bf16 cast, which this path does not do (the kernel multiplies exact values)."""
    if len(packed.shape) != 2:
        raise ValueError(f"operands_from_packed: a 2-D tensor, got shape {tuple(packed.shape)}")
    if packed.format in ("int4", "int8"):
        q, s = _int_operands(packed)
    elif packed.format == "hif4":
        q, s = _hif4_operands(packed)
    else:
        raise ValueError(f"operands_from_packed: int4, int8 or hif4, got {packed.format!r}")
    return q, group_major(s)


def quantize_operands(x: torch.Tensor, fmt, clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values and fp32 group scales of ``fmt.encode(x, clip_ratio)`` (2-D x, K along the last dim)."""
    return operands_from_packed(fmt.encode(x, clip_ratio))


def operands_from_values(xq: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 group scales, group-major) of an already fake-quantized 2-D tensor (what
    ``fmt.quantize_dequantize`` returned): per group of ``group`` along the last dim, the largest scale
    σ of which every value is an integer multiple, found exactly (σ = gcd of the values' integer
    significands on the group's finest binary grid); raises ValueError unless all |v / σ| <= 127.

    Passes: HiF4 values (σ a multiple of S/4, |q| <= 28) in fp32 or bf16, and INT4 values in fp32
    (σ = the scale times the gcd of the codes, |q| <= 7), with ``q · σ`` equal to the values (−0
    becomes +0); the σ are then short (<= 22 bits), as ``short_scales`` needs. INT4 values in bf16
    are bf16(code · scale), rounded: generally no int8 multiples of one scale, they raise; their
    exact operands come from the codes (:func:`operands_from_packed`, :func:`quantize_operands`).
    Re-encoding with the format would not do for HiF4: its scale recomputed from its own values
    differs in about a fifth of random groups."""
    if xq.dim() != 2 or xq.shape[1] % group:
        raise ValueError(f"operands_from_values: a 2-D tensor of whole groups of {group}, got {tuple(xq.shape)}")
    rows, k = xq.shape
    v = xq.float().double().reshape(rows, k // group, group)         # at most 24 significant bits each
    if not bool(torch.isfinite(v).all()):
        raise ValueError("operands_from_values: the tensor holds NaN or Inf")
    mant, exp = torch.frexp(v)                                        # v = mant · 2^exp, 0.5 <= |mant| < 1
    live = v != 0
    top = torch.where(live, exp, torch.iinfo(torch.int32).min).amax(-1, keepdim=True)
    bottom = torch.where(live, exp, torch.iinfo(torch.int32).max).amin(-1, keepdim=True)
    bottom = torch.where(live.any(-1, keepdim=True), bottom, 0)      # an all-zero group: σ = 1
    if bool((top - bottom > 7).any()):                                # |q| in 1..127 spans 7 octaves at most
        raise ValueError("operands_from_values: a group spans more octaves than int8 multiples of one scale can")
    shift = torch.where(live, exp - bottom, 0)
    n = torch.ldexp(mant, torch.full_like(exp, 24)).long() << shift   # v / 2^(bottom - 24): exact, < 2^31
    g = n[..., 0].abs()
    for j in range(1, group):
        g = torch.gcd(g, n[..., j])
    g = torch.where(g > 0, g, 1)[..., None]
    q = n // g                                                        # exact: g divides every n
    if int(q.abs().max()) > 127:
        raise ValueError("operands_from_values: the tensor is not int8 values times a group scale "
                         "(quantize_operands(x, fmt) quantizes an unquantized tensor)")
    scale = torch.ldexp(g.double(), bottom - 24).float()
    if not torch.equal(q.float() * scale, v.float()):                 # σ out of fp32's range
        raise ValueError("operands_from_values: the group scales do not fit fp32")
    scale = scale.squeeze(-1)
    return q.reshape(rows, k).to(torch.int8), group_major(scale)
