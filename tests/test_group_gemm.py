"""The group-scaled INT8 GEMM (wanexp.kernels.group_gemm) against its fp64 reference and the formats.

Tolerances asserted:
* the operand producers: int8 · scale equals the format's decoded values exactly (INT4 from fp32: bit
  for bit; INT4 from bf16: after the bf16 rounding the format's decode does, which the exact product
  skips; HiF4: equal values, −0 becoming +0, which an integer cannot hold);
* the kernel (fp32 output) within ``rounding_bound`` of the reference, (K/G + 3) · 2^-24 · Σ_g |t_g|
  elementwise (the group sums are exact; fp32 rounds the K/G scaled terms and their sum), and
  bit-exact where every partial sum is exact in fp32 (power-of-two scales, small integers);
* bf16 output = RNE of the fp32 output, bit for bit; every tile the same bits.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, small shapes) in a subprocess
(``test_interpreter_suite``); with a GPU the same checks plus real shapes run compiled (``gpu``).
int8 ``tl.dot`` is exact in Triton 3.8's interpreter (checked here); its ``tl.fma`` rounds twice,
so the kernel takes an equivalent exact formulation of its conversion there (module docstring).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from wanexp.formats import get_format

triton = pytest.importorskip("triton")

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]


def _gg():
    from wanexp.kernels import group_gemm
    return group_gemm


def _operands(m, n, k, group, device, seed=0, qa=28, qb=7, short=True):
    """Random int8 operands (|a| <= qa, |b| <= qb: HiF4- and INT4-like) and group scales spread over
    several octaves (bf16 values unless ``short`` is False), with group-major weight scales."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-qa, qa + 1, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-qb, qb + 1, (n, k), dtype=torch.int8, generator=g)
    sa = torch.exp2(torch.rand(m, k // group, generator=g) * 12 - 8)
    sb = torch.exp2(torch.rand(n, k // group, generator=g) * 12 - 10)
    if short:
        sa, sb = sa.bfloat16().float(), sb.bfloat16().float()
    return a.to(device), sa.to(device), b.to(device), _gg().group_major(sb.to(device))


def _check_against_reference(m, n, k, group, device, bias=True, short=True, tile=None):
    gg = _gg()
    a, sa, b, sb = _operands(m, n, k, group, device, seed=m + n + group, short=short)
    bias_t = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(device) if bias else None
    y = gg.group_scaled_mm(a, sa, b, sb, group, bias_t, torch.float32, short_scales=short, tiles=tile)
    ref = gg.group_scaled_mm_reference(a, sa, b, sb, group, bias_t)
    bound = gg.rounding_bound(a, sa, b, sb, group, bias_t)
    err = (y.double() - ref).abs()
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert bool((err <= bound).all()), float((err / bound).max())
    # the bound is not vacuous: a term the size of one group's contribution breaks it
    assert float(bound.max()) < 1e-3 * float(ref.abs().max())
    y16 = gg.group_scaled_mm(a, sa, b, sb, group, bias_t, short_scales=short, tiles=tile)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16.view(torch.int16), y.bfloat16().view(torch.int16))
    return y


def _check_exact_sums(device):
    """Power-of-two scales within 4 octaves and small integers: every partial sum is exact in fp32,
    so the kernel equals the reference bit for bit (a wrong group, scale or conversion shows)."""
    gg = _gg()
    group, k = 64, 512
    a, _, b, _ = _operands(48, 80, k, group, device, seed=7)
    g = torch.Generator().manual_seed(8)
    sa = torch.exp2(torch.randint(-2, 2, (48, k // group), generator=g).float()).to(device)
    sb = torch.exp2(torch.randint(-2, 1, (80, k // group), generator=g).float()).to(device)
    y = gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32)
    assert torch.equal(y.double(), gg.group_scaled_mm_reference(a, sa, b, sb, group))
    assert torch.equal(gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32, short_scales=False), y)
    sb[:, 3] *= 2                                                      # one group's scale off: no longer equal
    assert not torch.equal(gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32), y)
    # the conversion's edges: group sums of 2^22 (int8 -128 · -128 over G = 256) and -2^22 + 2^15 (-128 · 127)
    a = torch.full((16, 512), -128, dtype=torch.int8, device=device)
    b = torch.full((32, 512), -128, dtype=torch.int8, device=device)
    b[1] = 127
    ones_a, ones_b = torch.ones(16, 2, device=device), torch.ones(32, 2, device=device)
    y = gg.group_scaled_mm(a, ones_a, b, ones_b, 256, out_dtype=torch.float32)
    assert torch.equal(y.double(), gg.group_scaled_mm_reference(a, ones_a, b, ones_b, 256))
    assert float(y[0, 0]) == 2 * 2**22 and float(y[0, 1]) == 2 * (-(2**22) + 2**15)


def _check_tiles_agree(m, n, k, group, device):
    """Each output element's arithmetic does not depend on the tile: every tile gives the same bits."""
    gg = _gg()
    a, sa, b, sb = _operands(m, n, k, group, device, seed=3)
    outs = []
    for tile in gg.TILES:
        try:
            outs.append((tile, gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32, tiles=tile)))
        except Exception as exc:  # noqa: BLE001  (a tile beyond the GPU's shared memory at this G)
            if device == "cpu" or "resource" not in str(exc).lower():
                raise
    assert len(outs) >= 3
    for tile, y in outs[1:]:
        assert torch.equal(y, outs[0][1]), tile


def _check_formats_end_to_end(m, n, k, device):
    """W4A4 through the kernel equals fp64 of the formats' own dequantized operands, within the bound."""
    gg = _gg()
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    for name, opts, group in (("hif4", {}, 64), ("int4", {"group_size": 128}, 128), ("int4", {"group_size": 64}, 64)):
        fmt = get_format(name, **opts)
        qa, sa = gg.quantize_operands(x, fmt, clip_ratio=0.9)
        qb, sb = gg.quantize_operands(w, fmt)
        y = gg.group_scaled_mm(qa.to(device), sa.to(device), qb.to(device), sb.to(device), group,
                               out_dtype=torch.float32).cpu()
        xa = (qa.double().reshape(m, -1, group) * sa.double()[:, :, None]).reshape(m, k)
        wb = (qb.double().reshape(n, -1, group) * sb.double()[:, :, None]).reshape(n, k)
        exact = xa @ wb.T
        if name == "hif4":   # its values are the format's bf16 values themselves
            assert torch.equal(xa.float(), fmt.quantize_dequantize(x, clip_ratio=0.9).float())
        bound = gg.rounding_bound(qa, sa, qb, sb, group)
        assert bool(((y.double() - exact).abs() <= bound).all()), name


# ----------------------------------------------------------------------------- CPU: producers, reference, errors


def test_reference_is_the_dequantized_product():
    gg = _gg()
    a, sa, b, sb = _operands(5, 7, 256, 64, "cpu", seed=1)
    bias = torch.randn(7)
    a_deq = (a.double().reshape(5, 4, 64) * sa.double()[:, :, None]).reshape(5, 256)
    b_deq = (b.double().reshape(7, 4, 64) * sb.double()[:, :, None]).reshape(7, 256)
    ref = gg.group_scaled_mm_reference(a, sa, b, sb, 64, bias)
    assert torch.allclose(ref, a_deq @ b_deq.T + bias.double(), rtol=1e-12, atol=0)
    absum = gg.group_scaled_mm_reference(a, sa, b, sb, 64, bias, absolute=True)
    assert bool((absum >= ref.abs() - 1e-9).all()) and bool((absum > 0).all())


def _expand(scale, group):
    return scale.repeat_interleave(group, dim=1)


def test_int4_operands_reproduce_the_format_values():
    gg = _gg()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 512, generator=g) * torch.logspace(-3, 3, 512)
    x[1, :128] = 0.0
    x[2, 130] = -1e5
    for group in (32, 128, 256):
        fmt = get_format("int4", group_size=group)
        for rho in (1.0, 0.7):
            q, s = gg.quantize_operands(x, fmt, clip_ratio=rho)
            assert q.dtype == torch.int8 and int(q.abs().max()) == 7 and s.shape == (12, 512 // group)
            assert s.stride() == (1, 12)                              # group-major
            value = q.float() * _expand(s, group)                     # the exact products (3 + 8 bits)
            assert torch.equal(value.view(torch.int32), fmt.quantize_dequantize(x, clip_ratio=rho).view(torch.int32))
        xb = x.to(torch.bfloat16)
        q, s = gg.quantize_operands(xb, fmt)
        value = q.float() * _expand(s, group)
        ref = fmt.quantize_dequantize(xb)
        assert torch.equal(value.to(torch.bfloat16).view(torch.int16), ref.view(torch.int16))
        # the format's bf16 values round the product; the kernel's operands do not
        assert int((value != ref.float()).sum()) > 0
    q8, s8 = gg.quantize_operands(x, get_format("int8", group_size=64))
    assert int(q8.abs().max()) == 127
    assert torch.equal(q8.float() * _expand(s8, 64), get_format("int8", group_size=64).quantize_dequantize(x))


def test_hif4_operands_reproduce_the_format_values():
    gg = _gg()
    fmt = get_format("hif4")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(10, 256, generator=g) * torch.logspace(-3, 3, 256)).to(torch.bfloat16)
    x[1, :64] = 1e6                                   # S clipped at 49152
    x[2, 64:128] = 1e-18                              # S clipped at 2^-48
    x[3, 128:192] = -torch.arange(64).float() / 9     # small negatives round to -0
    for rho in (1.0, 0.8):
        q, s = gg.quantize_operands(x, fmt, clip_ratio=rho)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 28 and s.shape == (10, 4)
        value = q.float() * _expand(s, 64)
        ref = fmt.quantize_dequantize(x, clip_ratio=rho)
        assert torch.equal(value, ref.float())                       # exact, and exactly a bf16 value
        assert torch.equal(value.to(torch.bfloat16).float(), value)
        bits_differ = value.view(torch.int32) != ref.float().view(torch.int32)
        assert bool((ref.float()[bits_differ] == 0).all()) and bool(torch.signbit(ref[bits_differ]).all())


def test_operands_from_fake_quantized_values():
    """From the values alone (no codes): the int8 · σ decomposition reproduces HiF4 (fp32, bf16) and
    INT4 (fp32) fake-quantized tensors exactly, and refuses tensors that are not int8 multiples of a
    group scale, bf16-rounded INT4 values among them."""
    gg = _gg()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 512, generator=g) * torch.logspace(-3, 3, 512)
    x[0, :128] = 0.0
    for name, opts, group, qmax in (("int4", {"group_size": 64}, 64, 7), ("int4", {"group_size": 128}, 128, 7),
                                    ("hif4", {}, 64, 28)):
        fmt = get_format(name, **opts)
        for dtype in (torch.float32, torch.bfloat16) if name == "hif4" else (torch.float32,):
            xq = fmt.quantize_dequantize(x.to(dtype), clip_ratio=0.9)
            q, s = gg.operands_from_values(xq, group)
            assert int(q.abs().max()) <= qmax and s.stride() == (1, 16), (name, dtype)
            assert torch.equal(q.float() * _expand(s, group), xq.float()), (name, dtype)
            mant = torch.frexp(s)[0] * 2**22
            assert torch.equal(mant, mant.round()), "the scales are short (<= 22 significant bits)"
    with pytest.raises(ValueError, match="not int8 values times a group scale"):
        gg.operands_from_values(torch.randn(4, 128, generator=g).clamp(0.5, 1.5), 64)
    with pytest.raises(ValueError, match="not int8 values times a group scale"):   # bf16(code · scale)
        gg.operands_from_values(get_format("int4", group_size=64).quantize_dequantize(x.to(torch.bfloat16)), 64)
    with pytest.raises(ValueError, match="more octaves"):
        gg.operands_from_values(torch.logspace(-3, 3, 128).reshape(1, 128), 64)
    with pytest.raises(ValueError, match="int4, int8 or hif4"):
        gg.operands_from_packed(get_format("mxfp4").encode(x))


def test_bad_inputs_raise_one_clear_error():
    gg = _gg()
    a, sa, b, sb = _operands(4, 8, 128, 64, "cpu")
    with pytest.raises(ValueError, match="group must be one of"):
        gg.group_scaled_mm(a, sa, b, sb, 48)
    with pytest.raises(ValueError, match="int8 a"):
        gg.group_scaled_mm(a.float(), sa, b, sb, 64)
    with pytest.raises(ValueError, match=r"a_scale must be fp32 \[4, 2\]"):
        gg.group_scaled_mm(a, sa[:, :1], b, sb, 64)
    with pytest.raises(ValueError, match="out_dtype"):
        gg.group_scaled_mm(a, sa, b, sb, 64, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="contiguous along K"):
        gg.group_scaled_mm(a.t().contiguous().t(), sa, b, sb, 64)


# ----------------------------------------------------------------------------- interpreter (CPU) checks
# These run in-process only under TRITON_INTERPRET=1 (see test_interpreter_suite).

interp_only = pytest.mark.skipif(not INTERP, reason="runs under TRITON_INTERPRET=1 (test_interpreter_suite)")


@interp_only
def test_interp_int8_dot_is_exact():
    """The premise of the interpreter checks: Triton's interpreter computes int8 tl.dot exactly."""
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rn[:, None] * K + rk[None, :])
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, tl.trans(b), tl.full((M, N), 7, tl.int32), out_dtype=tl.int32))

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
    a[0], b[0] = -128, -128                                            # the extreme sum, 2^22
    c = torch.empty(32, 32, dtype=torch.int32)
    dot_kernel[(1,)](a, b, c, 32, 32, 256)
    assert torch.equal(c.long(), a.long() @ b.long().T + 7) and int(c[0, 0]) == 2**22 + 7


@interp_only
def test_interp_kernel_within_bound_ragged_bias_groups():
    for m, n, k, group, bias in ((40, 72, 256, 64, True), (33, 130, 384, 128, False), (70, 24, 512, 128, True),
                                 (16, 64, 256, 32, False), (20, 40, 512, 256, True)):
        _check_against_reference(m, n, k, group, "cpu", bias=bias)
    _check_against_reference(24, 48, 256, 64, "cpu", short=False)    # arbitrary fp32 scales: the I2F path


@interp_only
def test_interp_exact_partial_sums_are_bit_exact():
    _check_exact_sums("cpu")


@interp_only
def test_interp_tiles_agree_and_formats_end_to_end():
    _check_tiles_agree(70, 136, 256, 64, "cpu")
    _check_formats_end_to_end(24, 40, 256, "cpu")


@interp_only
def test_interp_probe_dry_run_completes(tmp_path):
    """experiments/gpu/group_gemm_probe.py --dry: every yardstick, tile and check runs and is recorded."""
    import json
    sys.path.insert(0, str(REPO / "experiments" / "gpu"))
    import group_gemm_probe
    group_gemm_probe.main(["--dry", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "group_gemm_probe.json").read_text())
    assert record["skipped"] == [] and len(record["shapes"]) == 2 and set(record["act_quant_proxy"]) == {"256", "512"}
    for entry in record["shapes"].values():
        assert "bf16_ms" in entry and set(entry["groups"]) == {"64", "128"}
        for ge in entry["groups"].values():
            assert ge["all_tiles_same_bits"] and ge["check"]["within_bound"] and ge["check"]["rel_err_bf16"] < 4e-3
            assert len(ge["tiles"]) == 2 and ge["i2f_ms"] > 0 and ge["row_major_scales_ms"] > 0


@pytest.mark.skipif(INTERP, reason="already inside the interpreter run")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernels are tested instead")
def test_interpreter_suite(interpreter_run):
    """The interpreter checks above, in a subprocess with TRITON_INTERPRET=1 (CPU, a few seconds)."""
    stdout = interpreter_run(__file__)
    assert "5 passed" in stdout, stdout[-2000:]


# ----------------------------------------------------------------------------- GPU checks


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_kernel_within_bound_at_wan_shapes():
    for group in (64, 128):
        _check_against_reference(4099, 5120, 5120, group, "cuda")      # ragged M, the picked tile
        _check_against_reference(300, 13824, 5120, group, "cuda", bias=False, tile=(64, 128, 4, 4, None))
    _check_against_reference(257, 1000, 1024, 64, "cuda", short=False)


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_exact_sums_magic_equals_i2f_and_tiles_agree():
    _check_exact_sums("cuda")
    gg = _gg()
    for group in (64, 128):
        a, sa, b, sb = _operands(3000, 1536, 2048, group, "cuda", seed=group)
        fast = gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32)
        plain = gg.group_scaled_mm(a, sa, b, sb, group, out_dtype=torch.float32, short_scales=False)
        assert torch.equal(fast, plain), group                     # the magic conversion is the I2F one, bit for bit
        _check_tiles_agree(3000, 1536, 2048, group, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="compiled kernels")
def test_gpu_formats_end_to_end():
    _check_formats_end_to_end(640, 384, 1024, "cuda")
