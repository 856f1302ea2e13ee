"""Bit-exact agreement of wanexp.formats with independent, slow references written differently:
plain Python floats element by element (math.frexp, explicit nearest-value search with explicit
tie handling, value tables built from the format definitions, bf16 rounding by bit manipulation),
and numpy float32 only where the spec itself prescribes fp32 arithmetic. Plus the worked examples
of shared/spec/FORMATS.md.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wanexp.formats import get_format

F32_MAX = float(np.finfo(np.float32).max)

# ----------------------------------------------------------------------------- scalar helpers


def f32(v: float) -> float:
    """Round a Python float to float32, saturating at the largest finite value (as the library
    does when a result overflows its output dtype)."""
    with np.errstate(over="ignore"):
        r = float(np.float32(v))
    return math.copysign(F32_MAX, v) if math.isinf(r) else r


def nearest(grid: list[float], a: float, tie_key) -> float:
    """The grid value nearest to a; among equally near ones, the one tie_key(index) ranks first."""
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), tie_key(i)))
    return grid[best]


E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ref_e2m1(a: float, ties: str = "even") -> float:
    """|value| -> E2M1 magnitude: nearest, ties to the even mantissa (even index) or, ``toward_zero``,
    to the smaller one (lower index); saturate at 6."""
    if a >= 6.0:
        return 6.0
    return nearest(E2M1_GRID, a, (lambda i: i % 2) if ties == "even" else (lambda i: i))


def _e4m3_table() -> list[float]:
    """All finite non-negative E4M3 (OCP 'fn': bias 7, no inf, S.1111.111 is NaN) by code."""
    vals = []
    for exp in range(16):
        for man in range(8):
            if exp == 15 and man == 7:
                continue
            vals.append(man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return vals


E4M3 = _e4m3_table()


def ref_e4m3(a: float) -> float:
    """|value| -> E4M3 magnitude: nearest, ties to even code (= even mantissa), saturate at 448."""
    if a >= 448.0:
        return 448.0
    return nearest(E4M3, a, lambda i: i % 2)


def ref_bf16(v: float) -> float:
    """float32 value -> bfloat16 (round to nearest even on the 16 dropped bits)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def blocks_of(row: list[float], size: int) -> list[list[float]]:
    row = row + [0.0] * (-len(row) % size)
    return [row[i: i + size] for i in range(0, len(row), size)]


# ----------------------------------------------------------------------------- references


def ref_mxfp4(row: list[float], rule: str = "floor", rho: float = 1.0, ties: str = "even",
              shift: int = 0) -> list[float]:
    """``shift``: the seed paper code's exponent offset, added to the shared exponent after the rule."""
    out = []
    for blk in blocks_of(row, 32):
        amax = f32(max(abs(v) for v in blk) * float(np.float32(rho)))
        if amax == 0:
            e = 0
        else:
            m, E = math.frexp(amax)  # amax = m * 2**E, 0.5 <= m < 1, so floor(log2 amax) = E - 1
            e = E - 1 - 2
            if rule == "ceil":  # smallest e with 6 * 2**e >= amax, by search
                e = E - 4
                while 6.0 * 2.0**e < amax:
                    e += 1
            e += shift
        e = max(-127, min(127, e))
        X = 2.0**e
        out += [f32(math.copysign(ref_e2m1(abs(v) / X, ties), v) * X) for v in blk]
    return out[: len(row)]


def ref_nvfp4(rows: list[list[float]], rho: float = 1.0, ties: str = "even") -> list[list[float]]:
    one = np.float32
    amax_t = one(max(abs(v) for r in rows for v in r))
    s_t = amax_t / one(6 * 448)
    s_t = s_t if s_t > 0 else one(1.0)
    out = []
    for row in rows:
        y = []
        for blk in blocks_of(row, 16):
            s_block = one(one(max(abs(v) for v in blk)) * one(rho)) / one(6)
            s8 = ref_e4m3(min(float(s_block / s_t), 448.0))
            d = one(s8) * s_t
            for v in blk:
                q = math.copysign(0.0, v) if d == 0 else \
                    math.copysign(ref_e2m1(float(one(abs(v)) / d), ties), v)
                y.append(f32(q * float(d)))
        out.append(y[: len(row)])
    return out


def ref_int(row: list[float], bits: int, group: int, rho: float = 1.0) -> list[float]:
    qmax = 2 ** (bits - 1) - 1
    group = len(row) if group == -1 else group
    out = []
    for blk in blocks_of(row, group):
        s = ref_bf16(float(np.float32(f32(max(abs(v) for v in blk) * float(np.float32(rho)))) / np.float32(qmax)))
        for v in blk:
            q = 0.0 if s == 0 else float(max(-qmax, min(qmax, round(float(np.float32(v) / np.float32(s))))))
            out.append(f32(q * s))
    return out[: len(row)]


def ref_fp8(row: list[float], rho: float = 1.0) -> list[float]:
    s = float(np.float32(f32(max(abs(v) for v in row) * float(np.float32(rho)))) / np.float32(448))
    if s == 0:
        return [math.copysign(0.0, v) for v in row]
    return [f32(math.copysign(ref_e4m3(abs(float(np.float32(v) / np.float32(s)))), v) * s) for v in row]


def ref_hif4(row: list[float], rho: float = 1.0) -> list[float]:
    """The FORMATS.md recipe, with its bf16 roundings and its fp32 element arithmetic."""
    one = np.float32

    def round_sig(v: float, frac_bits: int) -> float:
        m, E = math.frexp(v)
        e = E - 1
        return round(v / 2.0**e * 2.0**frac_bits) / 2.0**frac_bits * 2.0**e  # round(): ties to even

    seventh = ref_bf16(float(one(1) / one(7)))
    out = []
    for blk in blocks_of(row, 64):
        M1 = f32(max(abs(v) for v in blk) * float(one(rho)))  # wanexp's clip ratio scales M1 (fp32)
        # the product in fp32, M1 itself not rounded to bf16, and the scale S0 clipped (FORMATS.md 2026-12-01)
        S0 = min(max(ref_bf16(float(one(M1) * one(seventh))), 2.0**-48), 49152.0)
        S = round_sig(round_sig(S0, 7), 2)
        r = one(ref_bf16(float(one(1) / one(S))))
        for j in range(8):
            sub = blk[8 * j: 8 * j + 8]
            L2 = 2.0 if one(max(abs(v) for v in sub)) * r >= 4 else 1.0
            for k in range(2):
                micro = sub[4 * k: 4 * k + 4]
                L3 = 2.0 if (one(max(abs(v) for v in micro)) * r) / one(L2) >= 2 else 1.0
                for v in micro:
                    m = (one(abs(v)) * r) / one(L2 * L3)
                    m = min(math.floor(float(m * one(4) + one(0.5))) / 4, 1.75)
                    out.append(f32(math.copysign(m * L2 * L3 * S, v)))  # the sign bit, -0 too
    return out[: len(row)]


def reference(name: str, opts: dict, x: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    ties = opts.get("ties", "even")
    if name == "mxfp4":
        out = [ref_mxfp4(r, opts.get("scale_rule", "floor"), rho, ties) for r in rows]
    elif name == "nvfp4":
        out = ref_nvfp4(rows, rho, ties)
    elif name in ("int4", "int8"):
        bits = int(name[3:])
        group = opts.get("group_size", 128 if bits == 4 else -1)
        out = [ref_int(r, bits, group, rho) for r in rows]
    elif name == "fp8_e4m3":
        out = [ref_fp8(r, rho) for r in rows]
    elif name == "hif4":
        out = [ref_hif4(r, rho) for r in rows]
    else:
        raise AssertionError(name)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


def assert_bits_equal(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    """Equal as bit patterns (so -0 vs +0 counts), with a readable first mismatch."""
    same = y.float().view(torch.int32) == ref.view(torch.int32)
    if not bool(same.all()):
        i = tuple(int(v) for v in (~same).nonzero()[0])
        raise AssertionError(f"{int((~same).sum())} mismatches; first at {i}: x={x[i].item()!r} "
                             f"got {y[i].item()!r} expected {ref[i].item()!r}")


CONFIGS = [
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "ceil"}),
    ("mxfp4", {"ties": "toward_zero"}),  # the seed paper code's rounding (weights: floor rule) ...
    ("mxfp4", {"scale_rule": "ceil", "ties": "toward_zero"}),  # ... and its activations
    ("nvfp4", {}),
    ("nvfp4", {"ties": "toward_zero"}),
    ("int4", {}),
    ("int4", {"group_size": 16}),
    ("int4", {"group_size": -1}),
    ("int8", {}),
    ("int8", {"group_size": 32}),
    ("fp8_e4m3", {}),
    ("hif4", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in CONFIGS]

# ----------------------------------------------------------------------------- the reference's own sanity


def test_reference_helpers_against_known_values():
    assert [ref_e2m1(a) for a in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0)] == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]
    assert len(E4M3) == 127 and E4M3[-1] == 448.0 and E4M3[1] == 2.0**-9 and E4M3[8] == 2.0**-6
    assert ref_e4m3(17.0) == 16.0 and ref_e4m3(19.0) == 20.0 and ref_e4m3(460.0) == 448.0
    assert [ref_e2m1(a, "toward_zero") for a in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.8, 1.8, 3.6)] == \
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 1.0, 2.0, 4.0]
    assert ref_bf16(1 / 7) == 0.142578125 and ref_bf16(1.00390625) == 1.0 and ref_bf16(1.01171875) == 1.015625


# ----------------------------------------------------------------------------- edge-case tensors


def edge_tensor(block: int) -> torch.Tensor:
    """Rows of hand-picked trouble, two blocks wide plus a partial third (padding)."""
    n = 2 * block + 5
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.zeros(n),
        -torch.zeros(n),  # negative zero
        torch.full((n,), 2.0**-149) * torch.randint(1, 2**10, (n,), generator=g),  # subnormals
        torch.randn(n, generator=g) * 2.0**-130,  # subnormals, both signs
        torch.full((n,), 3.3e38) * torch.sign(torch.randn(n, generator=g)),  # near fp32 max
        torch.randn(n, generator=g) * 1e37,  # huge
        torch.full((n,), -1.7),  # all-equal blocks
        torch.full((n,), 6.0 * 2**5),
        # E2M1/INT ties at several scales: multiples of a quarter, the block max 4 or 6
        torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 3.0, -5.0] * n)[:n],
        torch.tensor([6.0, 0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5, 3.5, -4.5, 5.5, 6.5] * n)[:n],
        # powers of two and their float32 neighbours (where log2 would misround)
        torch.tensor([2.0**k for k in range(-8, 8)] * n)[:n].nextafter(torch.tensor(0.0)),
        torch.tensor([2.0**k for k in range(-8, 8)] * n)[:n],
        torch.tensor([1.5 * 2.0**k for k in range(-8, 8)] * n)[:n].nextafter(torch.tensor(10.0)),
        torch.where(torch.arange(n) % 7 == 0, 1e30, 1e-30) * torch.sign(torch.randn(n, generator=g)),
        torch.randn(n, generator=g) * 3,
        torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4),
        torch.cat([torch.zeros(block), torch.randn(n - block, generator=g)]),  # a zero block
    ]
    x = torch.stack(rows)
    x[3, 0] = -0.0
    x[14, 3] = -0.0
    return x


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_matches_reference_on_edge_cases(name, opts):
    fmt = get_format(name, **opts)
    x = edge_tensor(max(fmt.block_size, 16))
    if name == "nvfp4":  # one per-tensor scale: check each row as its own tensor too
        for row in x:
            assert_bits_equal(fmt.quantize_dequantize(row[None]), reference(name, opts, row[None]), row[None])
    assert_bits_equal(fmt.quantize_dequantize(x), reference(name, opts, x), x)


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("rho", [0.5, 0.8125, 1.3])
def test_matches_reference_with_clip_ratio(name, opts, rho):
    fmt = get_format(name, **opts)
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(1)) * 5
    assert_bits_equal(fmt.quantize_dequantize(x, clip_ratio=rho), reference(name, opts, x, rho), x)


# any float32, including subnormals, huge values and -0 ...
any_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# ... and values that sit on or between grid points at a common scale (ties, saturation)
gridish = st.builds(lambda k, e: k / 8 * 2.0**e, st.integers(-64, 64), st.integers(-3, 3))
elements = st.one_of(any_f32, gridish, st.floats(-8, 8, width=32))


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@settings(max_examples=int(os.environ.get("WANEXP_FORMATS_EXAMPLES", "0")) or 60,
          derandomize="WANEXP_FORMATS_EXAMPLES" not in os.environ, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_reference_on_random_tensors(name, opts, data):
    fmt = get_format(name, **opts)
    block = fmt.block_size if fmt.block_size > 0 else 24
    cols = data.draw(st.integers(1, 2 * block + 3), label="cols")
    arr = data.draw(hnp.arrays(np.float32, (data.draw(st.integers(1, 3)), cols), elements=elements))
    x = torch.from_numpy(arr)
    assert_bits_equal(fmt.quantize_dequantize(x), reference(name, opts, x), x)


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_matches_reference_on_gaussian_bf16_input(name, opts):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = get_format(name, **opts).quantize_dequantize(x)
    assert y.dtype == torch.bfloat16
    # the library computes in fp32 and rounds the result to bf16 once
    assert_bits_equal(y.float(), reference(name, opts, x).bfloat16().float(), x)


# ----------------------------------------------------------------------------- worked examples


def test_e2m1_ties_from_the_spec():
    # x / X with X = 1: a block whose max is 4..8 has scale 2**0 under the floor rule
    fmt = get_format("mxfp4")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0] + [0.0] * 22)
    y = fmt.quantize_dequantize(x)
    assert y[:10].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -4.0]
    assert torch.signbit(y[8])  # -0.25 rounds to -0


def test_e2m1_ties_toward_zero_of_the_paper_code():
    # X = 1 again; only the midpoints whose even neighbour is the larger one move: 0.75, 1.75, 3.5
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -1.75, -3.5, 0.76] + [0.0] * 20)
    y = get_format("mxfp4", ties="toward_zero").quantize_dequantize(x)
    assert y[:12].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.5, -3.0, 1.0]
    assert get_format("mxfp4", ties="toward_zero").options == {"scale_rule": "floor", "ties": "toward_zero"}
    assert get_format("mxfp4").options == {"scale_rule": "floor"}  # the default stays out: old packs decode


def test_exponent_shift_is_a_power_of_two_clip_ratio():
    # ceil rule, amax 7: e = 1 (6 * 2 >= 7). Shift -1 (clip ratio 0.5): X = 1, 7 saturates to 6 and 3.5 ties
    # down to 3. Shift +1 (ratio 2): X = 4, 7 / 4 = 1.75 ties down to 1.5 -> 6, 3.5 / 4 = 0.875 -> 1 -> 4.
    # 0.6 with shift +1 (ratio 1.2): the paper code takes ceil(log2(0.6 * 7 / 6)) + 1 = 0 + 1: X = 2, and
    # both 7 / 2 and 3.5 / 2 = 1.75 are ties, down to 3 (-> 6) and 1.5 (-> 3).
    fmt = get_format("mxfp4", scale_rule="ceil", ties="toward_zero")
    x = torch.zeros(32)
    x[:3] = torch.tensor([7.0, 3.5, -1.0])
    cases = {0.5: ([6.0, 3.0, -1.0], 127), 2.0: ([6.0, 4.0, -0.0], 129), 1.2: ([6.0, 3.0, -1.0], 128)}
    for ratio, (values, code) in cases.items():
        assert fmt.quantize_dequantize(x, clip_ratio=ratio)[:3].tolist() == values
        assert fmt.encode(x, clip_ratio=ratio).tensors()["scales"].item() == code


@pytest.mark.parametrize("rule", ["floor", "ceil"])
def test_shifted_exponents_match_the_reference_for_all_fifteen_candidates(rule):
    fmt = get_format("mxfp4", scale_rule=rule, ties="toward_zero")
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3)) * torch.tensor([1e-3, 1.0, 40.0])[:, None]
    for clip in (0.6, 0.7, 0.8, 0.9, 1.0):
        for shift in (-1, 0, 1):
            ref = torch.tensor([ref_mxfp4(r, rule, clip, "toward_zero", shift) for r in x.tolist()])
            assert_bits_equal(fmt.quantize_dequantize(x, clip_ratio=clip * 2.0**shift), ref, x)


def test_mxfp4_worked_scale():
    # floor rule: amax 7 -> e = floor(log2 7) - 2 = 0, and 7 saturates to 6;
    # amax 0.3 -> e = -2 - 2 = -4 (X = 1/16): 0.3 * 16 = 4.8 -> 4, 0.04 * 16 = 0.64 -> 0.5
    fmt = get_format("mxfp4")
    x = torch.zeros(2, 32)
    x[0, :3] = torch.tensor([7.0, 1.1, -0.2])
    x[1, :2] = torch.tensor([0.3, 0.04])
    y = fmt.quantize_dequantize(x)
    assert y[0, :3].tolist() == [6.0, 1.0, -0.0] and torch.signbit(y[0, 2])
    assert y[1, :2].tolist() == [0.25, 0.03125]
    assert fmt.encode(x).tensors()["scales"].tolist() == [[127], [123]]
    # ceil rule: smallest e with 6 * 2**e >= amax: 7 -> e = 1, and 7 / 2 = 3.5 ties up to 4 -> 8
    ceil = get_format("mxfp4", scale_rule="ceil")
    yc = ceil.quantize_dequantize(x)
    assert yc[0, :3].tolist() == [8.0, 1.0, -0.0] and yc[1, :2].tolist() == [0.25, 0.03125]
    assert ceil.encode(x).tensors()["scales"].tolist() == [[128], [123]]


def test_hif4_worked_example_ramp():
    x = torch.arange(64, dtype=torch.float32) / 8 - 4
    y = get_format("hif4").quantize_dequantize(x)
    assert y[:12].tolist() == [-3.75] * 5 + [-3.125] * 5 + [-2.5] * 2
    assert get_format("hif4").encode(x).tensors()["scales"].item() == (-1 + 48) << 2 | 1  # S = 0.625


def test_hif4_worked_example_sparse():
    x = torch.zeros(64)
    x[0], x[1], x[8], x[9], x[63] = 7.0, 1.0, 0.3, -0.05, 2.6
    y = get_format("hif4").quantize_dequantize(x)
    assert (y[0], y[1], y[8], y[9], y[63]) == (7.0, 1.0, 0.25, 0.0, 2.5)
    assert torch.signbit(y[9]) and not torch.signbit(y[2])  # y9 is -0, the zeros are +0
    others = torch.ones(64, dtype=torch.bool)
    others[[0, 1, 8, 9, 63]] = False
    assert (y[others] == 0).all()


def test_hif4_worked_example_seed0():
    torch.manual_seed(0)
    x = torch.randn(64)
    y = get_format("hif4").quantize_dequantize(x)
    assert y[:12].tolist() == [-1.25, -1.25, -0.25, -0.5, 1.0, 0.5, -0.5, -2.0, 0.25, -1.25, 0.25, 0.25]
    assert_bits_equal(y, reference("hif4", {}, x), x)


def test_nvfp4_worked_example():
    # tensor amax 2688 -> s_tensor = 1; block amax 61 -> s_block = 10.17 -> E4M3 10; 61 / 10 -> 6
    x = torch.zeros(2, 16)
    x[0, 0] = 2688.0
    x[1, :3] = torch.tensor([61.0, 25.0, -14.0])  # 25/10 = 2.5 -> 2 (tie to even), -1.4 -> -1.5
    p = get_format("nvfp4").encode(x)
    assert p.tensors()["tensor_scale"].item() == 1.0
    assert p.tensors()["scales"].float().flatten().tolist() == [448.0, 10.0]
    assert get_format("nvfp4").decode(p)[1, :3].tolist() == [60.0, 20.0, -15.0]


def test_hif4_does_not_round_m1_to_bf16_before_the_product():
    # S0 = bf16(1.19921875 * 0.142578125 = 0.17098236...) = 0.1708984375 -> E6M2 1.25 * 2**-3 = 0.15625;
    # r = bf16(6.4) = 6.40625, x r = 7.68 -> L2 = L3 = 2, m = 1.92 -> 2 saturates to 1.75: y = 7 S.
    # (Rounding M1 to bf16 first, 1.203125, would give S0 = 0.171875 and S = 0.1875, y = 1.125.)
    x = torch.zeros(64)
    x[0] = 1.19921875
    fmt = get_format("hif4")
    assert fmt.encode(x).tensors()["scales"].item() == (-3 + 48) << 2 | 1  # S = 1.25 * 2**-3
    assert fmt.quantize_dequantize(x)[0].item() == 1.09375


def test_hif4_clips_the_scale_at_the_top():
    # M1 = 4e5: S0 = bf16(57031.25) = 57088 is clipped to 49152 = 1.5 * 2**15 (the block max is not
    # clipped: clipping M1 to 49152 first gave S = 7168 and y0 = 7 S = 50176). r = bf16(1/49152) =
    # 171/128 * 2**-16; x0 r = 8.15: L2 = L3 = 2, m saturates at 1.75, y0 = 7 * 49152 = 344064.
    # x9 = 3e5 (sub-group 1): x r = 6.12, L2 = L3 = 2, m = floor(6.12 + .5) / 4 = 1.5: y = 6 S.
    # x16 = 5e4 (sub-group 2): x r = 1.02, L2 = L3 = 1, m = floor(4.08 + .5) / 4 = 1: y = S.
    x = torch.zeros(64)
    x[0], x[9], x[16] = 4e5, -3e5, 5e4
    fmt = get_format("hif4")
    assert fmt.encode(x).tensors()["scales"].item() == (15 + 48) << 2 | 2  # the largest code: 1.5 * 2**15
    y = fmt.quantize_dequantize(x)
    assert (y[0].item(), y[9].item(), y[16].item()) == (344064.0, -294912.0, 49152.0)
    assert_bits_equal(y, reference("hif4", {}, x), x)


def test_hif4_clips_the_scale_at_the_bottom():
    # M1 = 2**-47: S0 = bf16(2**-47 / 7.01...) = 1.140625 * 2**-50 is raised to 2**-48 (inside the old M1
    # range, this block used to get S = 1.25 * 2**-50 and y0 = 0.9375 * 2**-47). r = 2**48: x0 r = 2 gives
    # L2 = 1, L3 = 2, m = 1, y0 = 2 S = 2**-47 exactly; x8 r = 0.5 (sub-group 1): m = 0.5, y8 = 2**-49.
    x = torch.zeros(64)
    x[0], x[8] = 2.0**-47, -(2.0**-49)
    fmt = get_format("hif4")
    assert fmt.encode(x).tensors()["scales"].item() == 0  # exponent -48, the smallest code
    y = fmt.quantize_dequantize(x)
    assert (y[0].item(), y[8].item()) == (2.0**-47, -(2.0**-49))
    # a block far below the range keeps S = 2**-48, so its elements flush to zero (with their sign)
    z = fmt.quantize_dequantize(x * 2.0**-40)
    assert (z == 0).all() and torch.signbit(z[8])
