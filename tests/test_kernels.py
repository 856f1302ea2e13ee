"""The fused MXFP4 kernels (wanexp.kernels) against the torch reference path.

Tolerances asserted:
* activation quantizer: bit-exact with ``get_format("mxfp4").encode`` (codes and E8M0 scales) and
  with ``quantize_dequantize`` (the bf16 values), both scale rules, with smoothing and clip ratios;
* GEMM / QuantLinear: relative Frobenius error vs an fp64 product of the same quantized operands
  below 1e-2 (bf16 output rounding: measured ~2e-3), the fused result at least as close to fp64
  as the reference path, and fused vs reference within 1e-2 relative.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, small shapes), in a
subprocess so the interpreter flag is set before triton is imported; with a GPU the same checks
plus full-size ones run compiled (``gpu`` marker).
"""

from __future__ import annotations

import os

import pytest
import torch

from wanexp.formats import get_format
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.linear import QuantLinear

triton = pytest.importorskip("triton")

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
MX = {"name": "mxfp4", "opts": {}}


def _device() -> str:
    return "cpu" if INTERP else "cuda"


def _act_input(m, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 3, k)[torch.randperm(k, generator=g)]
    x[1, :32] = 0.0                      # an all-zero block
    x[2, 64:96] = -1e-3                  # a constant negative block
    x[3, 5] = 7.0e4                      # a big outlier
    return x.to(torch.bfloat16).to(device)


def _check_act_quant(m, k, device):
    from wanexp.kernels.mxfp4 import act_quant
    x = _act_input(m, k, device)
    recip = (torch.rand(k, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).to(device)
    for rule in ("floor", "ceil"):
        fmt = get_format("mxfp4", scale_rule=rule)
        for rho, sm in ((1.0, None), (0.8, recip), (0.6, None)):
            table = torch.tensor([0.5, rho], device=device)
            out = act_quant(x, table, 1, sm, scale_rule=rule, write_xs=True, write_codes=True)
            xs = x if sm is None else (x.float() * sm).to(torch.bfloat16)
            if sm is not None:
                assert torch.equal(out["xs"].view(torch.int16), xs.view(torch.int16))
            packed = fmt.encode(xs, clip_ratio=rho)
            assert torch.equal(out["codes"], packed.data["codes"]), (rule, rho)
            assert torch.equal(out["scales"], packed.data["scales"]), (rule, rho)
            ref = fmt.quantize_dequantize(xs, clip_ratio=rho)
            assert torch.equal(out["xq"].view(torch.int16), ref.view(torch.int16)), (rule, rho)


def _quant_layer(k, n, rank, device, smooth=True, bias=True, seed=0, rule="floor"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    ws = w if s is None else w * s
    lowrank = None
    if rank:
        l1 = (torch.randn(n, rank, generator=g) * 0.05).to(torch.bfloat16)
        l2 = (torch.randn(rank, k, generator=g) * 0.05).to(torch.bfloat16)
        lowrank = (l1, l2)
        ws = ws - l1.float() @ l2.float()
    packed = get_format("mxfp4").encode(ws)
    b = torch.randn(n, generator=g) if bias else None
    act = {"name": "mxfp4", "opts": {"scale_rule": rule}}
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    layer = QuantLinear(k, n, weight=packed, bias=b, act_format=act, clip_table=torch.tensor([0.7, 0.9]),
                        smooth=s, lowrank=lowrank, context=ctx)
    return layer.to(device)


def _exact(layer, x):
    """fp64 evaluation of the layer on the same quantized operands (the ideal the kernels approach)."""
    xs = x.to(torch.bfloat16)
    if layer.smooth is not None:
        xs = (xs.float() * torch.reciprocal(layer.smooth)).to(torch.bfloat16)
    fmt = layer.act_format
    xq = fmt.quantize_dequantize(xs, clip_ratio=float(layer.clip_ratio()))
    y = xq.double() @ layer.dequantized_weight().double().T
    if layer.lowrank_up is not None:
        t = torch.nn.functional.linear(xs, layer.lowrank_down)   # bf16, as both paths compute it
        y = y + t.double() @ layer.lowrank_up.double().T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check_layer(m, k, n, rank, device, backends=("triton", "cublas"), **kw):
    from wanexp.kernels import fused_forward, gemm_backend
    layer = _quant_layer(k, n, rank, device, **kw)
    x = (torch.randn(2, m // 2, k, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16).to(device)
    for t, backend in ((t, b) for t in (800.0, 100.0) for b in backends):
        layer.context.set_timestep(t)
        with gemm_backend(backend):
            y = fused_forward(layer, x)
        ref = layer.reference_forward(x)
        exact = _exact(layer, x.reshape(-1, k)).reshape(y.shape)
        assert y.shape == ref.shape and y.dtype == ref.dtype and torch.isfinite(y).all()
        e_fused, e_ref = _rel(y, exact), _rel(ref, exact)
        assert e_fused < 1e-2 and _rel(y, ref) < 1e-2, (e_fused, _rel(y, ref))
        assert e_fused <= e_ref * 1.05 + 1e-6, (e_fused, e_ref)


def _check_gemm_variants(m, k, n, device, variants=(0, 1, 2, 3)):
    from wanexp.kernels.mxfp4 import mxfp4_linear
    fmt = get_format("mxfp4")
    g = torch.Generator().manual_seed(5)
    packed = fmt.encode(torch.randn(n, k, generator=g)).to(device)
    wd = fmt.decode(packed)
    xq = fmt.quantize_dequantize(torch.randn(m, k, generator=g)).to(torch.bfloat16).to(device)
    exact = xq.double() @ wd.double().T
    for v in variants:
        y = mxfp4_linear(xq, packed.data["codes"], packed.data["scales"], variant=v)
        assert _rel(y, exact) < 5e-3, (v, _rel(y, exact))
        # one bf16 rounding of the exact fp32-accumulated sum: |err| <= 1 ulp-ish per element
        assert float(((y.double() - exact).abs() / exact.abs().clamp_min(1e-3)).median()) < 4e-3


# ----------------------------------------------------------------------------- the FP8 fold (wanexp.kernels.mxfp4_fp8)


def _packed_row(exponents, code):
    """One MXFP4 row of len(exponents) blocks: every element ``code`` (0..15) under its block's exponent."""
    nb = len(exponents)
    codes = torch.full((1, nb * 16), code | (code << 4), dtype=torch.uint8)
    scales = torch.tensor([[e + 127 for e in exponents]], dtype=torch.uint8)
    return codes, scales


def _decode(codes, scales):
    """The MXFP4 values by the format's own decoder (wanexp.formats, the spec implementation)."""
    fmt = get_format("mxfp4")
    packed = fmt.encode(torch.zeros(codes.shape[0], codes.shape[1] * 2))
    packed.data["codes"], packed.data["scales"] = codes, scales
    return fmt.decode(packed).double()


def _unfold(f):
    return f["values"].double() * f["scale"].double()[:, None]


@pytest.mark.parametrize("code", range(1, 8))
def test_fp8_fold_is_exact_up_to_a_spread_of_14_and_the_bound_is_tight(code):
    from wanexp.kernels.mxfp4_fp8 import MAX_SPREAD, fold_reference
    for top in (0, 40, -100):                         # the row's own exponent does not matter
        for spread in range(0, MAX_SPREAD + 1):
            codes, scales = _packed_row([top, top - spread, top - spread // 2], code)
            f = fold_reference(codes, scales)
            assert int(f["spread"]) == spread and torch.equal(_unfold(f), _decode(codes, scales)), (code, spread)
        codes, scales = _packed_row([top, top - MAX_SPREAD - 1], code)
        f = fold_reference(codes, scales)
        assert int(f["spread"]) == MAX_SPREAD + 1
        # one octave further: 0.5 and 1.5 (codes 1, 3) fall below E4M3's 2^-9 grid and round, the others still fit
        assert torch.equal(_unfold(f), _decode(codes, scales)) == (code not in (1, 3)), code
    codes, scales = _packed_row([5, 5], 7)            # 6 at the top: 6·2^6 = 384 <= 448
    assert float(fold_reference(codes, scales)["values"].float().max()) == 384.0


def test_fp8_fold_ignores_zero_blocks_and_keeps_signs():
    from wanexp.kernels.mxfp4_fp8 import fold_reference
    codes, scales = _packed_row([-20, 0, -22], 1 | 8)  # -0.5 everywhere ...
    codes[0, 16:32] = 0                                 # ... but the e = 0 block is all zero codes
    f = fold_reference(codes, scales)
    assert int(f["exponent"]) == -20 and int(f["spread"]) == 2
    assert torch.equal(_unfold(f), _decode(codes, scales)) and float(f["values"].float().min()) == -32.0
    zero = fold_reference(torch.zeros(1, 32, dtype=torch.uint8), torch.full((1, 2), 127, dtype=torch.uint8))
    assert int(zero["spread"]) == 0 and not zero["values"].float().any()


def test_fp8_gemm_of_folded_operands_is_the_mxfp4_product():
    """On realistic rows (smoothly varying magnitudes) every row fits, and the row-wise-scaled FP8
    GEMM equals the product of the MXFP4 values (fp64 sums of the same exact products)."""
    from wanexp.kernels.mxfp4_fp8 import MAX_SPREAD, fold_reference, linear_reference
    fmt = get_format("mxfp4")
    g = torch.Generator().manual_seed(7)
    w = fmt.encode(torch.randn(64, 512, generator=g) * 0.05)
    x = fmt.encode(torch.randn(40, 512, generator=g) * torch.linspace(0.01, 30, 512))
    fw, fx = fold_reference(w.data["codes"], w.data["scales"]), fold_reference(x.data["codes"], x.data["scales"])
    assert int(fw["spread"].max()) <= MAX_SPREAD and int(fx["spread"].max()) <= MAX_SPREAD
    exact = fmt.decode(x).double() @ fmt.decode(w).double().T
    assert torch.allclose(linear_reference(fx, fw), exact, rtol=1e-12, atol=0)
    y = torch._scaled_mm(fx["values"], fw["values"].t(), scale_a=fx["scale"][:, None], scale_b=fw["scale"][None, :],
                         out_dtype=torch.float32)
    assert _rel(y, exact) < 1e-6


def _check_fp8_fold(m, k, n, device):
    """Activation quantizer (FP8 mode) and weight fold bit-exact against the reference, both rules,
    with smoothing and clip ratios, on rows that fit and rows that do not."""
    from wanexp.kernels.mxfp4_fp8 import act_quant_fp8, fold_reference, fold_weight, row_exponents
    fmt = get_format("mxfp4")
    g = torch.Generator().manual_seed(11)
    for w in (torch.randn(n, k, generator=g) * 0.05, torch.randn(n, k, generator=g) * torch.logspace(-3, 3, k)):
        packed = fmt.encode(w).to(device)
        ref = fold_reference(packed.data["codes"], packed.data["scales"])
        S, spread = row_exponents(packed.data["codes"], packed.data["scales"])
        assert torch.equal(S, ref["exponent"]) and torch.equal(spread, ref["spread"])
        w8 = fold_weight(packed.data["codes"], packed.data["scales"], S.contiguous())
        assert torch.equal(w8.view(torch.uint8), ref["values"].view(torch.uint8))
    x = _act_input(m, k, device)
    x[4:8] = (torch.randn(4, k, generator=g) * 3).to(torch.bfloat16).to(device)   # rows that fit
    recip = (torch.rand(k, generator=g) * 4 + 0.25).to(device)
    for rule in ("floor", "ceil"):
        for rho, sm in ((1.0, None), (0.8, recip)):
            out = act_quant_fp8(x, torch.tensor([0.5, rho], device=device), 1, sm, scale_rule=rule, write_xs=True)
            xs = x if sm is None else (x.float() * sm).to(torch.bfloat16)
            pk = get_format("mxfp4", scale_rule=rule).encode(xs, clip_ratio=rho)
            ref = fold_reference(pk.data["codes"], pk.data["scales"])
            assert torch.equal(out["values"].view(torch.uint8), ref["values"].view(torch.uint8)), (rule, rho)
            assert torch.equal(out["spread"], ref["spread"]) and torch.equal(out["scale"], ref["scale"]), (rule, rho)
            assert torch.equal(out["exponent"], ref["exponent"]), (rule, rho)
            if sm is not None:
                assert torch.equal(out["xs"].view(torch.int16), xs.view(torch.int16)), (rule, rho)
                bare = act_quant_fp8(x, torch.tensor([0.5, rho], device=device), 1, sm, scale_rule=rule)
                assert "xs" not in bare and torch.equal(bare["values"].view(torch.uint8), ref["values"].view(torch.uint8))
            assert int((ref["spread"] <= 14).sum()) >= 4 and int((ref["spread"] > 14).sum()) >= 1  # both kinds


def _check_lowrank_add(m, n, device):
    """y += T·L1ᵀ in one rounding: on operands whose fp32 sum is exact, exactly bf16(y + T·L1ᵀ);
    ragged tiles; a rank the kernel does not take (24) goes to addmm_."""
    from wanexp.kernels.mxfp4_fp8 import lowrank_add_
    g = torch.Generator().manual_seed(5)
    for r in (16, 32, 24):
        t = (torch.randint(-8, 9, (m, r), generator=g) / 8).to(torch.bfloat16).to(device)     # multiples of 1/8
        up = (torch.randint(-8, 9, (n, r), generator=g) / 8).to(torch.bfloat16).to(device)
        y0 = torch.randn(m, n, generator=g).clamp(-4, 4)
        y0 = torch.where(y0.abs() < 2 ** -8, 0.0, y0).to(torch.bfloat16).to(device)         # spans fit fp32
        y0[0, 0] = -0.0
        exact = (y0.double() + t.double() @ up.double().T).to(torch.bfloat16)                # exact, rounded once
        y = lowrank_add_(y0.clone(), t, up)
        if r == 24:
            assert (y.float() - exact.float()).abs().max() <= 2 ** -6 * exact.float().abs().max()
        else:
            assert torch.equal(y.view(torch.int16), exact.view(torch.int16)), r
        # with the FP8 path's power-of-two row and column scales and a bias: y·s_row·s_col + b + T·L1ᵀ, one rounding
        s_row = (2.0 ** torch.randint(-2, 3, (m,), generator=g).float()).to(device)
        s_col = (2.0 ** torch.randint(-2, 3, (n,), generator=g).float()).to(device)
        b = (torch.randint(-8, 9, (n,), generator=g) / 8).to(torch.bfloat16).to(device)
        exact = (y0.double() * s_row.double()[:, None] * s_col.double()[None, :] + b.double()
                 + t.double() @ up.double().T).to(torch.bfloat16)
        y = lowrank_add_(y0.clone(), t, up, row_scale=s_row, col_scale=s_col, bias=b)
        if r == 24:
            assert (y.float() - exact.float()).abs().max() <= 2 ** -6 * exact.float().abs().max()
        else:
            assert torch.equal(y.view(torch.int16), exact.view(torch.int16)), r
            unscaled = (y0.double() + b.double() + t.double() @ up.double().T).to(torch.bfloat16)
            assert not torch.equal(y.view(torch.int16), unscaled.view(torch.int16))   # the scales are applied
    with pytest.raises(ValueError, match="come together"):
        lowrank_add_(y0.clone(), t, up, row_scale=s_row)


def _check_lowrank_down(m, k, device):
    """T = bf16(x · r) · L2ᵀ with x smoothed inside the kernel: the smoothing rounds as the reference's
    bf16(x.float() * r) (one-hot L2 rows copy x_s out bit for bit), and on operands whose fp32 sums are
    exact T is exactly their rounding; ragged M and K; ranks the kernel does not take go to torch."""
    from wanexp.kernels.mxfp4 import DOWN_TILES, lowrank_down
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).to(device)
    recip = (torch.rand(k, generator=g) * 4 + 0.25).to(device)
    xs = (x.float() * recip).to(torch.bfloat16)
    cols = torch.randperm(k, generator=g)[:16]
    onehot = torch.zeros(16, k)
    onehot[torch.arange(16), cols] = 1.0
    onehot = onehot.to(torch.bfloat16).to(device)
    for tiles in (None, DOWN_TILES[1], DOWN_TILES[4]):
        t = lowrank_down(x, recip, onehot, tiles=tiles)
        assert t.shape == (m, 16) and t.dtype == torch.bfloat16
        assert torch.equal(t.view(torch.int16), xs[:, cols.to(device)].view(torch.int16)), tiles
    xe = (torch.randint(-8, 9, (m, k), generator=g) / 8).to(torch.bfloat16).to(device)          # multiples of 1/8
    pow2 = (2.0 ** torch.randint(-2, 3, (k,), generator=g).float()).to(device)
    down = (torch.randint(-8, 9, (32, k), generator=g) / 8).to(torch.bfloat16).to(device)
    exact = ((xe.double() * pow2.double()) @ down.double().T).to(torch.bfloat16)
    assert torch.equal(lowrank_down(xe, pow2, down).view(torch.int16), exact.view(torch.int16))
    assert torch.equal(lowrank_down(xe, None, down).view(torch.int16),
                       (xe.double() @ down.double().T).to(torch.bfloat16).view(torch.int16))
    odd = down[:24]                                                                              # rank 24: torch
    assert torch.equal(lowrank_down(xe, pow2, odd), torch.nn.functional.linear((xe.float() * pow2).to(torch.bfloat16), odd))


def _check_fp8_gemm(m, k, n, device, configs=None):
    """The Triton FP8 GEMM with the low-rank branch in its epilogue: on operands whose fp32 sums are exact,
    exactly the one rounding of bf16(s_a s_w A Wᵀ + b + T Uᵀ); on random ones within the bf16 rounding of
    the fp64 value; ragged M and N, without bias or branch too."""
    from wanexp.kernels.fp8_gemm import FP8_GEMM_CONFIGS, fp8_gemm, fp8_gemm_reference
    g = torch.Generator().manual_seed(7)
    a8 = (torch.randint(-8, 9, (m, k), generator=g) / 4).to(torch.float8_e4m3fn).to(device)    # multiples of 1/4
    w8 = (torch.randint(-8, 9, (n, k), generator=g) / 4).to(torch.float8_e4m3fn).to(device)
    sa = (2.0 ** torch.randint(-2, 2, (m,), generator=g).float()).to(device)   # every fp32 sum exact
    sw = (2.0 ** torch.randint(-2, 2, (n,), generator=g).float()).to(device)
    b = (torch.randint(-8, 9, (n,), generator=g) / 8).to(torch.bfloat16).to(device)
    t = (torch.randint(-8, 9, (m, 32), generator=g) / 8).to(torch.bfloat16).to(device)
    u = (torch.randint(-8, 9, (n, 32), generator=g) / 8).to(torch.bfloat16).to(device)
    for cfg in configs or FP8_GEMM_CONFIGS[:1]:
        for kw in ({"bias": b, "t": t, "up": u}, {}):
            y = fp8_gemm(a8, w8, sa, sw, config=cfg, **kw)
            exact = fp8_gemm_reference(a8, w8, sa, sw, **kw).to(torch.bfloat16)
            assert torch.equal(y.view(torch.int16), exact.view(torch.int16)), (cfg, list(kw))
    ra = (torch.randn(m, k, generator=g) * 30).to(torch.float8_e4m3fn).to(device)
    rw = (torch.randn(n, k, generator=g) * 30).to(torch.float8_e4m3fn).to(device)
    y = fp8_gemm(ra, rw, sa, sw, b, t, u, config=(configs or FP8_GEMM_CONFIGS)[0])
    ref = fp8_gemm_reference(ra, rw, sa, sw, b, t, u)
    assert _rel(y, ref) < 4e-3 and float(((y.double() - ref).abs() / ref.abs().clamp_min(1e-6)).median()) < 4e-3


def _check_fp8_layer(m, k, n, device):
    """QuantLinear through gemm_backend("fp8") against the reference and fp64, fallbacks counted."""
    from wanexp.kernels import fused_forward, gemm_backend
    _check_layer(m, k, n, 8, device, backends=("fp8",))
    _check_layer(m, k, n, 16, device, backends=("fp8",))   # rank 16: the low-rank branch in lowrank_add_
    _check_layer(m, k, n, 0, device, backends=("fp8",), smooth=False, bias=False, rule="ceil")
    _check_layer(m, k, n, 16, device, backends=("fp8_triton",))  # the branch in the Triton GEMM's epilogue
    _check_layer(m, k, n, 16, device, backends=("fp8_rowwise",))  # the row-wise GEMM, the branch after it
    layer = _quant_layer(k, n, 16, device)
    wide = _act_input(m, k, device)                       # rows spanning > 14 octaves: the exact fallback
    ys = {}
    for backend in ("fp8", "fp8_triton", "fp8_rowwise"):
        before = layer.fallbacks["fp8_rows"]
        with gemm_backend(backend):
            ys[backend] = y = fused_forward(layer, wide)
        assert layer.fallbacks["fp8_rows"] > before and layer.fallbacks["fp8_cols"] == 0, backend
        assert _rel(y, _exact(layer, wide)) < 1e-2 and _rel(y, layer.reference_forward(wide)) < 1e-2, backend
    # the Triton GEMM has the branch in its epilogue: its fallback rows must get it added, as cuBLAS's all do
    from wanexp.kernels.mxfp4_fp8 import MAX_SPREAD, act_quant_fp8
    rows = act_quant_fp8(wide, layer.clip_table, layer.current_bin(), layer.smooth_recip)["spread"] > MAX_SPREAD
    xs = layer.smoothed(wide)[rows]
    branch = torch.nn.functional.linear(torch.nn.functional.linear(xs, layer.lowrank_down), layer.lowrank_up).double()
    assert 0 < rows.sum() < rows.numel()
    for backend in ("fp8_triton", "fp8_rowwise"):
        gap = (ys[backend][rows].double() - ys["fp8"][rows].double()).norm()
        assert gap < 0.1 * branch.norm(), (backend, float(gap), float(branch.norm()))
    # weight rows spanning > 14 octaves: those output columns take the fallback, for every token
    fmt = get_format("mxfp4")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(9)) * 0.05
    w[: n // 4] *= torch.logspace(-4, 2, k)
    spread_layer = QuantLinear(k, n, weight=fmt.encode(w), bias=torch.randn(n), act_format=MX,
                               clip_table=torch.tensor([0.9]), context=layer.context).to(device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(8)) * 2).to(torch.bfloat16).to(device)
    with gemm_backend("fp8"):
        y = fused_forward(spread_layer, x)
    assert spread_layer.fallbacks == {"fp8_rows": 0, "fp8_cols": n // 4}
    assert _rel(y, _exact(spread_layer, x)) < 1e-2 and _rel(y, spread_layer.reference_forward(x)) < 1e-2


# ----------------------------------------------------------------------------- interpreter (CPU) checks
# These run in-process only under TRITON_INTERPRET=1 (see test_interpreter_suite).

interp_only = pytest.mark.skipif(not INTERP, reason="runs under TRITON_INTERPRET=1 (test_interpreter_suite)")


@interp_only
def test_interp_act_quant_bit_exact():
    _check_act_quant(24, 256, "cpu")


@interp_only
def test_interp_gemm_exact_products():
    _check_gemm_variants(40, 256, 48, "cpu", variants=(0, 2))   # the interpreter mis-evaluates bf16 tl.dot (1, 3)


@interp_only
def test_interp_dequant_weight_exact():
    from wanexp.kernels.mxfp4 import dequant_weight
    fmt = get_format("mxfp4")
    packed = fmt.encode(torch.randn(40, 256) * torch.logspace(-3, 3, 256))
    out = torch.full((40, 260), float("nan"), dtype=torch.bfloat16)
    dequant_weight(packed.data["codes"], packed.data["scales"], out=out)
    assert torch.equal(out[:, :256], fmt.decode(packed).to(torch.bfloat16)) and out[:, 256:].isnan().all()


@interp_only
def test_interp_quantlinear_fused_matches_reference():
    _check_layer(36, 256, 40, 8, "cpu")
    _check_layer(16, 128, 32, 0, "cpu", smooth=False, bias=False, rule="ceil")


@interp_only
def test_interp_fp8_fold_bit_exact():
    _check_fp8_fold(24, 256, 40, "cpu")


@interp_only
def test_interp_fp8_quantizer_tiles_and_readback_give_the_same_bits():
    """x_s read back (one smoothing an element) or recomputed, and rows split across programs or a
    partial last K step (NB * 32 not dividing K): the same bits as the default tile."""
    from wanexp.kernels.mxfp4_fp8 import FP8_ACT_TILES, act_quant_fp8
    x = _act_input(21, 1536, "cpu")
    recip = torch.rand(1536, generator=torch.Generator().manual_seed(2)) * 4 + 0.25
    table = torch.tensor([0.5, 0.8])
    ref = act_quant_fp8(x, table, 1, recip, write_xs=True, tiles=FP8_ACT_TILES[0])
    assert FP8_ACT_TILES[0][3] and int(ref["spread"].max()) > 14 >= int(ref["spread"].min())
    for tiles in ((4, 8, 4, False), (2, 32, 4, True), (8, 16, 8, False), (16, 8, 8, True)):
        out = act_quant_fp8(x, table, 1, recip, write_xs=True, tiles=tiles)
        for key in ("values", "scale", "spread", "exponent", "xs"):
            assert torch.equal(out[key].view(torch.uint8), ref[key].view(torch.uint8)), (tiles, key)


@interp_only
def test_interp_lowrank_down_smooths_in_its_load():
    _check_lowrank_down(70, 200, "cpu")


@interp_only
def test_interp_fp8_gemm_epilogue_one_rounding():
    _check_fp8_gemm(70, 256, 200, "cpu", configs=[(32, 64, 64, 2, 4, 2), (64, 32, 128, 4, 4, 2)])


@interp_only
def test_interp_lowrank_add_one_rounding():
    _check_lowrank_add(70, 200, "cpu")


@interp_only
def test_interp_quantlinear_fp8_matches_reference():
    _check_fp8_layer(36, 256, 48, "cpu")


def _check_block_checked(m, k, device):
    """kernels.block_checked: the FP8 fold's bound checked once a block call. Rows that fit: the output
    of per-layer checks, bit for bit, in one run of the block, no fallback; rows beyond the bound: the
    block runs again with the per-layer check, the same output and fallback counts as per-layer checks,
    and the peaks are reset. A layer whose weight rows are beyond the bound keeps its own check."""
    from wanexp.kernels import block_checked, fused_forward, gemm_backend, prepare
    w = torch.randn(128, k, generator=torch.Generator().manual_seed(9)) * 0.05
    w[:32] *= torch.logspace(-4, 2, k)                   # 32 weight rows spanning > 14 octaves

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _quant_layer(k, k, 16, device, seed=1)
            self.b = QuantLinear(k, 128, weight=get_format("mxfp4").encode(w), bias=None, act_format=MX,
                                 clip_table=torch.tensor([0.9]), context=self.a.context).to(device)
            self.runs = 0

        def forward(self, x):
            self.runs += 1
            return fused_forward(self.b, torch.nn.functional.gelu(fused_forward(self.a, x)))

    block = Block()
    prepare(block)
    assert block.b.kernel_cache["fp8_rows"]["wide"] and not block.a.kernel_cache["fp8_rows"]["wide"]
    fits = (torch.randn(m, k, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16).to(device)
    wide = _act_input(m, k, device)
    with gemm_backend("fp8"):
        want, per_layer = {}, {}
        for name, x in (("fits", fits), ("wide", wide)):   # per-layer checks: the outputs and fallbacks to match
            before = (block.a.fallbacks, block.b.fallbacks)
            want[name] = block(x)
            per_layer[name] = [{key: after[key] - was[key] for key in after}
                               for after, was in zip((block.a.fallbacks, block.b.fallbacks), before)]
        assert per_layer["fits"] == [{"fp8_rows": 0, "fp8_cols": 0}, {"fp8_rows": 0, "fp8_cols": 32}]
        assert per_layer["wide"][0]["fp8_rows"] > 0
        assert block_checked(block) is block and block_checked(block) is block   # idempotent
        peak = block.a.kernel_cache["fp8_rows"]["peak"]
        for name, x, runs in (("fits", fits, 1), ("wide", wide, 2), ("fits", fits, 1)):
            before, runs0 = (block.a.fallbacks, block.b.fallbacks), block.runs
            y = block(x)
            assert torch.equal(y, want[name]), name
            assert block.runs - runs0 == runs, name
            got = [{key: after[key] - was[key] for key in after}
                   for after, was in zip((block.a.fallbacks, block.b.fallbacks), before)]
            assert got == [per_layer[name][0], {"fp8_rows": per_layer[name][1]["fp8_rows"],
                                                "fp8_cols": 32 * runs}], name   # b checks at every call
            assert (0 < int(peak) <= 14) if name == "fits" else int(peak) == 0, name


@interp_only
def test_interp_fp8_bound_checked_once_a_block():
    _check_block_checked(24, 256, "cpu")


@interp_only
def test_interp_compiled_fused_layer_matches_eager_in_one_graph():
    """The fused path under torch.compile(fullgraph=True): one graph (the custom op kept whole, no
    graph break), the same output as eager, and no recompile when the timestep bin changes."""
    import torch._dynamo
    from wanexp.kernels import fused_forward, gemm_backend, prepare
    x = (torch.randn(20, 256, generator=torch.Generator().manual_seed(2)) * 2).to(torch.bfloat16)
    for backend in ("triton", "fp8", "cublas"):
        layer = _quant_layer(256, 48, 8, "cpu")
        assert prepare(layer) == 1
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        with gemm_backend(backend):
            f = torch.compile(lambda v: fused_forward(layer, v), fullgraph=True, backend=counting)
            outs = {}
            for t in (800.0, 100.0, 800.0):
                layer.context.set_timestep(t)
                y = f(x)
                assert torch.equal(y, fused_forward(layer, x)), (backend, t)
                outs.setdefault(t, y)
        assert len(graphs) == 1, backend
        assert not torch.equal(outs[800.0], outs[100.0])  # the two bins' clip ratios really differ


def _upcast_layer(fmt_name, k, n, rank, device, smooth=True, bias=True, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    lowrank = None
    if rank:
        lowrank = ((torch.randn(n, rank, generator=g) * 0.05).to(torch.bfloat16),
                   (torch.randn(rank, k, generator=g) * 0.05).to(torch.bfloat16))
    opts = {"group_size": group} if fmt_name == "int4" else {}
    fmt = get_format(fmt_name, **opts)
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    layer = QuantLinear(k, n, weight=fmt.encode(w if s is None else w * s),
                        bias=torch.randn(n, generator=g) if bias else None,
                        act_format={"name": fmt_name, "opts": opts},
                        clip_table=torch.tensor([0.7, 0.9]), smooth=s, lowrank=lowrank, context=ctx)
    return layer.to(device)


def _check_upcast(m, k, n, device):
    """INT4, NVFP4 and HiF4 W4A4: the activation kernels bit-exact with the formats, the layer equal to the reference."""
    from wanexp import kernels
    from wanexp.kernels.upcast import hif4_act_quant, int_act_quant, nvfp4_act_quant
    x = _act_input(m, k, device)
    x[5, :64] = 3.0                                     # ties at .5 after scaling, both signs
    x[6, :64] = -torch.arange(64, dtype=torch.float32).to(device) / 9
    x[7, :16] = -0.0                                    # negative zeros keep their sign in NVFP4
    x[8, :64] = 1e6                                     # HiF4's group scale clipped at 49152 ...
    x[9, 64:128] = 1e-18                                # ... and at 2^-48
    recip = (torch.rand(k, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).to(device)
    for rho in (1.0, 0.8, 0.55):
        table = torch.tensor([0.5, rho], device=device)
        for group in (32, 128):
            ref = get_format("int4", group_size=group).quantize_dequantize(x, clip_ratio=rho)
            assert torch.equal(int_act_quant(x, table, 1, None, group).view(torch.int16), ref.view(torch.int16))
        for sm in (None, recip):
            xs = x if sm is None else (x.float() * sm).to(torch.bfloat16)
            ref = get_format("nvfp4").quantize_dequantize(xs, clip_ratio=rho)
            assert torch.equal(nvfp4_act_quant(x, table, 1, sm).view(torch.int16), ref.view(torch.int16)), rho
        for sm in (None, recip):
            xs = x if sm is None else (x.float() * sm).to(torch.bfloat16)
            ref = get_format("hif4").quantize_dequantize(xs, clip_ratio=rho)
            assert torch.equal(hif4_act_quant(x, table, 1, sm).view(torch.int16), ref.view(torch.int16)), rho
    for fmt in ("int4", "nvfp4", "hif4"):
        for kw in ({}, {"smooth": False, "bias": False, "rank": 0, "group": 64}):
            layer = _upcast_layer(fmt, k, n, kw.pop("rank", 8), device, **kw)
            assert kernels.supports_upcast(layer)
            xs = (torch.randn(2, m // 2, k, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16).to(device)
            for t in (800.0, 100.0):
                layer.context.set_timestep(t)
                assert torch.equal(kernels.fused_forward(layer, xs), layer.reference_forward(xs)), (fmt, kw, t)


def _check_int4_fp8(m, k, n, device):
    """INT4 on FP8 tensor cores: the activation codes and scales and the widened weight codes bit-exact with
    the format; the layer closer than the reference path to the fp64 product of the format's own values
    (q · s unrounded; the reference rounds each to bf16) and within 1e-2 of the reference; rows the GEMM's
    alignment refuses (M % 4) take the upcast path, equal to the reference."""
    from wanexp import kernels
    from wanexp.formats import decode
    from wanexp.kernels.int4_fp8 import int4_weight_e4m3
    from wanexp.kernels.upcast import int_act_codes
    x = _act_input(m, k, device)
    x[5, :128] = 3.0                                    # ties at .5 after scaling
    recip = (torch.rand(k, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).to(device)
    fmt = get_format("int4", group_size=128)
    for rho, sm in ((1.0, None), (0.8, recip)):
        xs = x if sm is None else (x.float() * sm).to(torch.bfloat16)
        packed = fmt.encode(xs, clip_ratio=rho)
        q, scale = fmt._unpack(packed.data, fmt._view_shape(tuple(packed.shape)))
        codes, scales = int_act_codes(x, torch.tensor([0.5, rho], device=device), 1, sm, 128)
        assert codes.dtype == torch.float8_e4m3fn and scales.shape == (m, k // 128) and scales.stride() == (1, m)
        assert torch.equal(codes.float(), q.reshape(m, k)) and torch.equal(scales, scale["scale"].reshape(m, k // 128))
        assert (codes.view(torch.uint8) != 128).all()                       # no -0 code
    layer = _upcast_layer("int4", k, n, 16, device)
    w_codes, _ = fmt._unpack(layer.packed_weight().data, fmt._view_shape((n, k)))
    assert torch.equal(int4_weight_e4m3(layer.wq_codes).float(), w_codes.reshape(n, k))
    xin = (torch.randn(m, k, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16).to(device)
    for t in (800.0, 100.0):
        layer.context.set_timestep(t)
        xs = (xin.float() * layer.smooth_recip).to(torch.bfloat16)
        xq = fmt.quantize_dequantize(xs.float(), clip_ratio=float(layer.clip_ratio()))        # q · s in fp32, exact
        exact = xq.double() @ decode(layer.packed_weight()).double().T + layer.bias.double()
        exact += torch.nn.functional.linear(xs, layer.lowrank_down).double() @ layer.lowrank_up.double().T
        with kernels.gemm_backend("fp8"):
            y = kernels.fused_forward(layer, xin)
        ref = layer.reference_forward(xin)
        assert y.dtype == torch.bfloat16 and _rel(y, ref) < 1e-2
        assert _rel(y, exact) < 0.9 * _rel(ref, exact), (_rel(y, exact), _rel(ref, exact))
    with kernels.gemm_backend("fp8"):                                        # M % 4 != 0: the upcast path
        assert torch.equal(kernels.fused_forward(layer, xin[:m - 1]), layer.reference_forward(xin[:m - 1]))


@interp_only
def test_interp_int4_on_fp8_codes_exact_and_layer_closer_than_reference():
    _check_int4_fp8(24, 256, 48, "cpu")


@interp_only
def test_interp_int4_nvfp4_act_quant_and_layer_exact():
    _check_upcast(24, 256, 40, "cpu")


@pytest.mark.skipif(INTERP, reason="already inside the interpreter run")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernels are tested instead")
@pytest.mark.skipif(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="the interpreter of older Tritons evaluates these kernels differently (seen: 3.6)")
def test_interpreter_suite(interpreter_run):
    """The interpreter checks above, in a subprocess with TRITON_INTERPRET=1 (CPU, ~20 s)."""
    stdout = interpreter_run(__file__)
    assert "14 passed" in stdout, stdout[-2000:]


# ----------------------------------------------------------------------------- dispatch (CPU, no triton run)


def test_dispatch_rules_and_cpu_path_unchanged():
    from wanexp import kernels
    layer = _quant_layer(128, 32, 4, "cpu")
    assert kernels.supports_layer(layer)
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert not kernels.can_fuse(layer, x)                 # CPU input: reference path
    assert torch.equal(layer(x), layer.reference_forward(x))
    odd = _quant_layer(96, 32, 0, "cpu")                  # K not a multiple of 128
    assert not kernels.supports_layer(odd)
    nv = QuantLinear(128, 32, weight=get_format("nvfp4").encode(torch.randn(32, 128)), bias=None,
                     act_format={"name": "nvfp4", "opts": {}})
    assert not kernels.supports_layer(nv)
    w4a16 = QuantLinear(128, 32, weight=get_format("mxfp4").encode(torch.randn(32, 128)), bias=None, act_format=None)
    assert not kernels.supports_layer(w4a16)
    with kernels.fused(False):
        assert not kernels.fused_enabled()
    assert kernels.fused_enabled() == (os.environ.get("WANEXP_FUSED", "1") != "0")


# ----------------------------------------------------------------------------- GPU checks


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_act_quant_bit_exact():
    _check_act_quant(300, 1024, "cuda")
    _check_act_quant(57, 5120, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_gemm_variants_exact_products():
    _check_gemm_variants(300, 1024, 384, "cuda")
    _check_gemm_variants(4099, 5120, 640, "cuda")          # the large-M configs, ragged M
    from wanexp.kernels.mxfp4 import CONFIGS, _launch
    fmt = get_format("mxfp4")
    packed = fmt.encode(torch.randn(384, 1024, device="cuda"))
    xq = fmt.quantize_dequantize(torch.randn(4099, 1024, device="cuda")).to(torch.bfloat16)
    exact = xq.double() @ fmt.decode(packed).double().T
    for cfg in CONFIGS:                                    # every config the search may pick
        out = torch.full((4099, 384), float("nan"), device="cuda", dtype=torch.bfloat16)
        _launch(cfg, xq, packed.data["codes"], packed.data["scales"], None, None, None, out, 4099, 384, 1024, 0)
        assert _rel(out, exact) < 5e-3, cfg


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_quantlinear_fused_matches_reference():
    _check_layer(512, 1024, 768, 32, "cuda")
    _check_layer(4100, 5120, 1280, 32, "cuda")
    _check_layer(64, 640, 96, 0, "cuda", smooth=False, bias=False, rule="ceil")


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_dequant_weight_exact():
    from wanexp.kernels.mxfp4 import dequant_weight
    fmt = get_format("mxfp4")
    packed = fmt.encode(torch.randn(300, 1024, device="cuda") * torch.logspace(-3, 3, 1024, device="cuda"))
    assert torch.equal(dequant_weight(packed.data["codes"], packed.data["scales"]), fmt.decode(packed).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_dispatch_switches():
    from wanexp import kernels
    layer = _quant_layer(256, 64, 8, "cuda")
    x = torch.randn(5, 256, device="cuda").to(torch.bfloat16)
    assert kernels.can_fuse(layer, x)
    y = layer(x)
    with kernels.fused(False):
        ref = layer(x)
    assert torch.equal(ref, layer.reference_forward(x)) and _rel(y, ref) < 1e-2
    layer.fused = False
    assert torch.equal(layer(x), ref)


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_auto_backend_takes_fp8_above_the_upcast_threshold_on_hopper(monkeypatch):
    from wanexp import kernels
    from wanexp.kernels import mxfp4_fp8
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("auto takes FP8 on Hopper and newer")
    calls, real = [], mxfp4_fp8.fp8_linear
    monkeypatch.setattr(mxfp4_fp8, "fp8_linear", lambda x2, *a, **k: calls.append(x2.shape[0]) or real(x2, *a, **k))
    layer = _quant_layer(256, 64, 8, "cuda")
    with kernels.gemm_backend("auto"):
        for m in (kernels.UPCAST_MIN_TOKENS, kernels.UPCAST_MIN_TOKENS + 1):
            x = torch.randn(m, 256, device="cuda").to(torch.bfloat16)
            assert _rel(layer(x), layer.reference_forward(x)) < 1e-2
    assert calls == [kernels.UPCAST_MIN_TOKENS + 1]


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_fp8_fold_bit_exact_and_layer_at_wan_shapes():
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("no FP8 tensor cores")
    _check_fp8_fold(300, 5120, 640, "cuda")
    _check_block_checked(300, 5120, "cuda")
    _check_fp8_layer(4100, 5120, 1280, "cuda")
    _check_layer(57, 13824, 5120, 32, "cuda", backends=("fp8",))   # ffn.net.2's K, a ragged M
    _check_lowrank_add(3000, 13824, "cuda")                          # ffn.net.0's outputs, a ragged M
    _check_lowrank_down(4100, 13824, "cuda")                         # ffn.net.2's K, above SMALL_M_TOKENS: every tile timed
    from wanexp.kernels.fp8_gemm import FP8_GEMM_CONFIGS
    _check_fp8_gemm(3000, 5120, 1000, "cuda", configs=FP8_GEMM_CONFIGS)   # every config, ragged M and N


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_int4_nvfp4_hif4_act_quant_and_layer_exact():
    _check_upcast(300, 5120, 640, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_int4_on_fp8_block_scaled_gemm():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuBLAS's block-scaled FP8 GEMM needs Hopper")
    _check_int4_fp8(300, 5120, 640, "cuda")
    _check_int4_fp8(4100, 13824, 5120, "cuda")                       # ffn.net.2's shape, a ragged M


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_quantizer_tiles_are_bit_identical_and_the_picked_one_is_a_candidate():
    """Every tile of the memory-bound quantizers gives the same bits (the default tile's, which the
    tests above check against the formats), above SMALL_M_TOKENS where the picker times them."""
    from wanexp.kernels import mxfp4
    from wanexp.kernels.mxfp4_fp8 import FP8_ACT_TILES, act_quant_fp8
    m, k = mxfp4.SMALL_M_TOKENS + 1000, 5120
    x = _act_input(m, k, "cuda")
    recip = (torch.rand(k, generator=torch.Generator().manual_seed(1)) * 4 + 0.25).cuda()
    table = torch.tensor([0.5, 0.8], device="cuda")
    ref8 = act_quant_fp8(x, table, 1, recip, write_xs=True, tiles=FP8_ACT_TILES[0])
    ref = mxfp4.act_quant(x, table, 1, recip, write_xs=True, write_codes=True, tiles=mxfp4.ACT_TILES[0])
    for tiles in FP8_ACT_TILES:
        out8 = act_quant_fp8(x, table, 1, recip, write_xs=True, tiles=tiles)
        for key in ("values", "scale", "spread", "exponent", "xs"):
            assert torch.equal(out8[key].view(torch.uint8), ref8[key].view(torch.uint8)), (tiles, key)
    for tiles in mxfp4.ACT_TILES:
        out = mxfp4.act_quant(x, table, 1, recip, write_xs=True, write_codes=True, tiles=tiles)
        for key in ("xq", "xs", "codes", "scales"):
            assert torch.equal(out[key].view(torch.uint8), ref[key].view(torch.uint8)), (tiles, key)
    picked = act_quant_fp8(x, table, 1, recip, write_xs=True)
    assert all(torch.equal(picked[key].view(torch.uint8), ref8[key].view(torch.uint8)) for key in ("values", "spread"))
    chosen = [v for kk, v in mxfp4._tiles_tuned.items() if kk[1] == m]
    assert chosen and all(v in mxfp4.ACT_TILES or v in FP8_ACT_TILES for v in chosen)
