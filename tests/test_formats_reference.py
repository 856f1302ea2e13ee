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


def ref_e2m1(a: float) -> float:
    """|value| -> E2M1 magnitude: nearest, ties to the even mantissa (even index), saturate at 6."""
    if a >= 6.0:
        return 6.0
    return nearest(E2M1_GRID, a, lambda i: i % 2)


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


def ref_mxfp4(row: list[float], rule: str = "floor", rho: float = 1.0) -> list[float]:
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
        e = max(-127, min(127, e))
        X = 2.0**e
        out += [f32(math.copysign(ref_e2m1(abs(v) / X), v) * X) for v in blk]
    return out[: len(row)]


def ref_nvfp4(rows: list[list[float]], rho: float = 1.0) -> list[list[float]]:
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
                    math.copysign(ref_e2m1(float(one(abs(v)) / d)), v)
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
        M1 = min(max(f32(max(abs(v) for v in blk) * float(one(rho))), 2.0**-48), 49152.0)
        S0 = ref_bf16(float(one(ref_bf16(M1)) * one(seventh)))
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
    if name == "mxfp4":
        out = [ref_mxfp4(r, opts.get("scale_rule", "floor"), rho) for r in rows]
    elif name == "nvfp4":
        out = ref_nvfp4(rows, rho)
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
    ("nvfp4", {}),
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
    assert get_format("hif4").encode(x).tensors()["scales"].item() == (-1 + 51) << 2 | 1  # S = 0.625


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


def test_hif4_rounds_m1_to_bf16_before_the_product():
    # bf16(1.19921875) = 1.203125 (a tie, to even), so S0 = bf16(1.203125 * bf16(1/7)) = 0.171875,
    # which rounds to S = 0.1875; without the bf16(M1) step S0 = 0.1708984375 and S = 0.15625.
    x = torch.zeros(64)
    x[0] = 1.19921875
    fmt = get_format("hif4")
    assert fmt.encode(x).tensors()["scales"].item() == (-3 + 51) << 2 | 2  # S = 1.5 * 2**-3
    assert fmt.quantize_dequantize(x)[0].item() == 1.125  # (1.0937 with S = 0.15625)
