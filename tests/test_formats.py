"""wanexp.formats: interface, properties, packing, clip ratios, errors, GPTQ block states.

Bit-exact agreement with independent references and the worked examples of FORMATS.md live in
test_formats_reference.py.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wanexp.formats import (FORMAT_NAMES, BlockState, PackedTensor, decode, get_format, load_packed,
                            save_packed)

CONFIGS = [
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "ceil"}),
    ("nvfp4", {}),
    ("hif4", {}),
    ("int4", {}),
    ("int4", {"group_size": -1}),
    ("int4", {"group_size": 32, "scale_dtype": "float16"}),
    ("int8", {}),
    ("fp8_e4m3", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o in CONFIGS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Deterministic by default so CI cannot flake; WANEXP_FORMATS_EXAMPLES=2000 explores (random seeds).
_STRESS = int(os.environ.get("WANEXP_FORMATS_EXAMPLES", "0"))
PROPS = settings(max_examples=_STRESS or 25, derandomize=not _STRESS, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so that torch.equal distinguishes -0 from +0."""
    return t.float().view(torch.int32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def tensors(elements, max_rows=3, max_cols=80):
    return st.builds(torch.from_numpy, hnp.arrays(
        np.float32, st.tuples(st.integers(1, max_rows), st.integers(1, max_cols)), elements=elements))


# magnitudes within HiF4's clip range, values on or between grid points at many scales, signed zeros
moderate = st.one_of(st.floats(-1e4, 1e4, width=32),
                     st.builds(lambda k, e: k / 8 * 2.0**e, st.integers(-64, 64), st.integers(-12, 12)),
                     st.sampled_from([0.0, -0.0]))
any_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
normal_f32 = st.builds(lambda v, neg: -v if neg else v, st.floats(2.0**-10, 1000, width=32), st.booleans())


# ----------------------------------------------------------------------------- interface


def test_names_and_bits_per_element():
    assert FORMAT_NAMES == ("int4", "mxfp4", "nvfp4", "hif4", "fp8_e4m3", "int8")
    expected = {"mxfp4": 4.25, "nvfp4": 4.5, "hif4": 4.5, "int4": 4 + 16 / 128}
    for name, b in expected.items():
        assert get_format(name).bits_per_element == b
    assert get_format("mxfp4").block_size == 32 and get_format("nvfp4").block_size == 16
    assert get_format("hif4").block_size == 64 and get_format("int4").block_size == 128
    assert get_format("int4", group_size=64).bits_per_element == 4.25
    assert get_format("int4", group_size=128, scale_dtype="float32").bits_per_element == 4.25
    # per-row formats: element width, plus the row's scale once the row length is known
    assert get_format("int8").block_size == -1 and get_format("int8").bits_per_element == 8
    assert get_format("int8").bits_per_element_for(4096) == 8 + 16 / 4096
    assert get_format("fp8_e4m3").bits_per_element_for(1024) == 8 + 32 / 1024
    assert get_format("mxfp4").bits_per_element_for(40) == (64 * 4 + 2 * 8) / 40  # padded block


def test_get_format_rejects_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown number format 'fp4'"):
        get_format("fp4")
    with pytest.raises(ValueError, match="group_size"):
        get_format("mxfp4", group_size=16)
    with pytest.raises(ValueError, match="scale_rule"):
        get_format("mxfp4", scale_rule="round")
    with pytest.raises(ValueError, match="group_size"):
        get_format("int4", group_size=0)
    with pytest.raises(ValueError, match="scale_dtype"):
        get_format("int8", scale_dtype="float8")
    assert repr(get_format("int4", group_size=-1)) == "get_format('int4', group_size=-1, scale_dtype='bfloat16')"


def test_grid_values():
    assert get_format("mxfp4").grid_values().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_format("nvfp4").grid_values().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert get_format("int4").grid_values().tolist() == list(range(8))
    assert get_format("int8").grid_values().tolist() == list(range(128))
    fp8 = get_format("fp8_e4m3").grid_values()
    assert len(fp8) == 127 and fp8[-1] == 448 and fp8[1] == 2.0**-9 and bool((fp8.diff() > 0).all())
    hif = get_format("hif4").grid_values().tolist()
    assert hif == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(300,), (2, 3, 64), (5, 97)], ids=str)
def test_shape_dtype_and_bit_exact_encode_decode(name, opts, dtype, shape):
    fmt = get_format(name, **opts)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    y = fmt.quantize_dequantize(x)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert not torch.equal(y, x)  # it did quantize
    packed = fmt.encode(x)
    assert packed.shape == tuple(shape) and packed.dtype == dtype
    assert same_bits(fmt.decode(packed), y) and same_bits(decode(packed), y)
    # the computation is fp32 inside: a low-precision input gives the rounded fp32 result
    assert same_bits(y, fmt.quantize_dequantize(x.float()).to(dtype))


def expected_storage(name: str, opts: dict, shape: tuple[int, ...]) -> dict[str, tuple[tuple, torch.dtype]]:
    *lead, k = shape
    lead = tuple(lead)
    if name in ("mxfp4", "nvfp4", "hif4"):
        block = {"mxfp4": 32, "nvfp4": 16, "hif4": 64}[name]
        nb = -(-k // block)
        codes = {"codes": (lead + (nb * block // 2,), torch.uint8)}
        if name == "mxfp4":
            return codes | {"scales": (lead + (nb,), torch.uint8)}
        if name == "nvfp4":
            return codes | {"scales": (lead + (nb,), torch.float8_e4m3fn), "tensor_scale": ((), torch.float32)}
        return codes | {"scales": (lead + (nb,), torch.uint8), "l2": (lead + (nb,), torch.uint8),
                        "l3": (lead + (nb, 2), torch.uint8)}
    if name == "fp8_e4m3":
        return {"codes": (shape, torch.float8_e4m3fn), "scales": (lead + (1,), torch.float32)}
    group = opts.get("group_size", 128 if name == "int4" else -1)
    group = k if group == -1 else group
    nb = -(-k // group)
    scale = {"scales": (lead + (nb,), getattr(torch, opts.get("scale_dtype", "bfloat16")))}
    if name == "int8":
        return scale | {"codes": (lead + (nb * group,), torch.int8)}
    return scale | {"codes": (lead + (-(-nb * group // 2),), torch.uint8)}


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("shape", [(4, 256), (3, 2, 97)], ids=str)
def test_storage_layout_and_nbytes(name, opts, shape):
    packed = get_format(name, **opts).encode(torch.randn(shape))
    layout = {k: (tuple(v.shape), v.dtype) for k, v in packed.tensors().items()}
    assert layout == expected_storage(name, opts, shape)
    assert packed.nbytes == sum(v.numel() * v.element_size() for v in packed.tensors().values())
    if shape == (4, 256) and name in ("mxfp4", "nvfp4", "hif4", "int4") and "group_size" not in opts:
        extra = 4 if name == "nvfp4" else 0  # the fp32 per-tensor scale
        assert packed.nbytes == 4 * 256 * get_format(name, **opts).bits_per_element / 8 + extra


def test_nibble_order_and_int4_twos_complement():
    # E2M1: 0.5 is code 1, -6 is code 0b1111; element 0 in the low nibble
    x = torch.zeros(32)
    x[0], x[1], x[2] = 0.5, -6.0, -0.0
    codes = get_format("mxfp4").encode(x).tensors()["codes"]
    assert codes[0].item() == 0xF1 and codes[1].item() == 0x08  # -0 keeps its sign bit
    # INT4: codes -7 and 7 -> nibbles 0b1001 and 0b0111
    p = get_format("int4", group_size=-1).encode(torch.tensor([-7.0, 7.0, 1.0]))
    assert p.tensors()["codes"].tolist() == [0x79, 0x01] and p.tensors()["scales"].item() == 1.0


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_safetensors_round_trip(name, opts, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    fmt = get_format(name, **opts)
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = fmt.quantize_dequantize(x, clip_ratio=0.9)
    packed = fmt.encode(x, clip_ratio=0.9)
    # by hand: tensors to the file, meta as JSON in its header
    save_file(packed.tensors(), tmp_path / "one.safetensors", metadata={"meta": json.dumps(packed.meta())})
    with safe_open(tmp_path / "one.safetensors", framework="pt") as f:
        back = PackedTensor.from_tensors({k: f.get_tensor(k) for k in f.keys()},
                                         json.loads(f.metadata()["meta"]))
    assert same_bits(fmt.decode(back), y) and back.nbytes == packed.nbytes
    # and through the helpers, several tensors in one file
    save_packed(tmp_path / "many.safetensors", {"a.weight": packed, "b": fmt.encode(x[:2])})
    loaded = load_packed(tmp_path / "many.safetensors")
    assert same_bits(decode(loaded["a.weight"]), y)
    assert same_bits(decode(loaded["b"]), fmt.quantize_dequantize(x[:2]))


def test_decode_refuses_other_formats_and_versions():
    packed = get_format("int4").encode(torch.randn(2, 128))
    with pytest.raises(ValueError, match="cannot decode a int4"):
        get_format("int4", group_size=-1).decode(packed)
    with pytest.raises(ValueError, match="version"):
        PackedTensor.from_tensors(packed.tensors(), packed.meta() | {"version": 99})
    with pytest.raises(ValueError, match="cannot decode a mxfp4"):
        get_format("mxfp4", scale_rule="ceil").decode(get_format("mxfp4").encode(torch.randn(32)))


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("k", [1, 17, 45, 130])
def test_partial_blocks_are_zero_padded(name, opts, k):
    fmt = get_format(name, **opts)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * 2
    if fmt.block_size > 0:
        block = fmt.block_size
        padded = F.pad(x, (0, (-k) % block))
        assert same_bits(fmt.quantize_dequantize(x), fmt.quantize_dequantize(padded)[:, :k])
    assert same_bits(fmt.decode(fmt.encode(x)), fmt.quantize_dequantize(x))


def test_bad_inputs():
    fmt = get_format("mxfp4")
    with pytest.raises(TypeError, match="floating-point"):
        fmt.quantize_dequantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty last dim"):
        fmt.quantize_dequantize(torch.tensor(1.0))
    with pytest.raises(ValueError, match="clip_ratio"):
        fmt.quantize_dequantize(torch.ones(4), clip_ratio=0.0)


# ----------------------------------------------------------------------------- properties


def scale_of(name: str, packed: PackedTensor) -> torch.Tensor:
    """Each element's block scale, read back from the storage tensors by hand."""
    t = packed.tensors()
    k = packed.shape[-1]
    if name == "mxfp4":
        s = torch.exp2(t["scales"].double() - 127)
    elif name == "nvfp4":
        s = (t["scales"].float() * t["tensor_scale"]).double()  # the fp32 product is the scale
    elif name == "hif4":
        code = t["scales"].long()
        s = (1 + (code & 3) / 4) * torch.exp2((code >> 2).double() - 48)
    else:
        s = t["scales"].double()
    block = get_format(name, **packed.options).block_size
    return s.repeat_interleave(k if block < 0 else block, -1)[..., :k]


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@PROPS
@given(x=tensors(moderate))
def test_every_output_is_a_grid_value_times_its_block_scale(name, opts, x):
    fmt = get_format(name, **opts)
    y = fmt.quantize_dequantize(x)
    scale = scale_of(name, fmt.encode(x))
    grid = fmt.grid_values().double()
    ratio = y.double().abs() / torch.where(scale > 0, scale, 1)
    g = grid[(ratio.unsqueeze(-1) - grid).abs().argmin(-1)]
    # the nearest grid value times the scale, rounded to fp32 once, is exactly the output
    assert torch.equal((g * scale).float(), y.abs())
    assert bool((g <= grid[-1]).all())


@pytest.mark.parametrize("name,opts", [c for c in CONFIGS if c[0] not in ("nvfp4", "hif4")],
                         ids=[i for i, c in zip(IDS, CONFIGS) if c[0] not in ("nvfp4", "hif4")])
@PROPS
@given(x=tensors(st.one_of(moderate, any_f32)))
def test_idempotent(name, opts, x):
    # MXFP4 (both rules), INT4/INT8 and FP8 reproduce themselves exactly, over the whole fp32 range
    fmt = get_format(name, **opts)
    y = fmt.quantize_dequantize(x)
    assert same_bits(fmt.quantize_dequantize(y), y)


@PROPS
@given(x=tensors(moderate, max_rows=4, max_cols=64))
def test_nvfp4_idempotent_with_a_fixed_tensor_scale_and_normal_block_scales(x):
    # NVFP4 is *not* idempotent with the per-tensor scale recomputed (the output's amax differs
    # from the input's by an ulp or so, and every block scale moves with it), nor when a block's
    # E4M3 scale is subnormal (its relative rounding error is large enough to change the block
    # max's code). With the tensor amax fixed and every block within 2**6 * 448 / 6 of it, it is.
    fmt = get_format("nvfp4")
    amax = x.abs().amax()
    blocks = F.pad(x, (0, (-x.shape[-1]) % 16)).unflatten(-1, (-1, 16))
    floor = amax / 2**12
    blocks[..., 0] = torch.where(blocks.abs().amax(-1) < floor, floor, blocks[..., 0])
    x = blocks.flatten(-2)[:, : x.shape[-1]]
    y = fmt.quantize_dequantize(x, tensor_amax=amax)
    assert same_bits(fmt.quantize_dequantize(y, tensor_amax=amax), y)


@PROPS
@given(x=tensors(moderate, max_cols=200))
def test_hif4_settles_after_two_passes(x):
    # HiF4 is not idempotent: a group whose max rounds to 6 S gets a smaller S on a second pass,
    # and its elements move by at most half a step (0.5 S). A third pass changes nothing.
    fmt = get_format("hif4")
    y1 = fmt.quantize_dequantize(x)
    y2 = fmt.quantize_dequantize(y1)
    assert same_bits(fmt.quantize_dequantize(y2), y2)
    S = scale_of("hif4", fmt.encode(x))
    assert bool(((y2.double() - y1.double()).abs() <= 0.5 * S).all())


def test_hif4_is_not_idempotent():
    # M1 = 7.95: S0 = bf16(7.95 * bf16(1/7)) = 1.1328 -> S = 1.25, so 7.95 / S = 6.37 -> 6 S = 7.5;
    # a second pass sees M1 = 7.5 -> S0 = 1.0703 -> S = 1.0, and 7.5 saturates to 7 S = 7.0
    x = torch.zeros(64)
    x[0], x[1] = 7.95, 1.3
    fmt = get_format("hif4")
    y1 = fmt.quantize_dequantize(x)
    y2 = fmt.quantize_dequantize(y1)
    assert y1[:2].tolist() == [7.5, 1.25] and y2[:2].tolist() == [7.0, 1.0]


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@PROPS
@given(x=tensors(st.one_of(moderate, any_f32)))
def test_sign_symmetry(name, opts, x):
    fmt = get_format(name, **opts)
    y, y_neg = fmt.quantize_dequantize(x), fmt.quantize_dequantize(-x)
    if name.startswith("int"):  # integer codes have no -0: equal as values, zeros are +0
        assert torch.equal(y_neg, -y)
        assert not bool(torch.signbit(y_neg[y_neg == 0]).any())
    else:  # sign-magnitude codes: exact, -0 included
        assert same_bits(y_neg, -y)


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@PROPS
@given(x=tensors(st.one_of(st.just(0.0), normal_f32)), k=st.integers(-20, 5))
def test_power_of_two_scale_invariance(name, opts, x, k):
    # every format here is invariant while its scales stay in range: MXFP4 by construction, the
    # others because their scale arithmetic (amax/7, /448, /6, bf16 roundings) commutes with 2**k.
    # HiF4 only while its scale S0 stays inside the clip range [2**-48, 49152], and no format while the
    # input or a scale is subnormal (2**k x then loses bits): hence the bounds on x and k.
    fmt = get_format(name, **opts)
    if opts.get("scale_dtype") == "float16":  # fp16 scales lose bits below fp16's normal range
        groups = F.pad(x, (0, (-x.shape[-1]) % 32)).unflatten(-1, (-1, 32)).abs().amax(-1)
        assume(bool((groups[groups > 0] * 2.0**k / 7 >= 2.0**-14).all()))
    y = fmt.quantize_dequantize(x)
    assert same_bits(fmt.quantize_dequantize(x * 2.0**k), y * 2.0**k)


# ----------------------------------------------------------------------------- clip ratio


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_clip_ratio_tensor_equals_float_and_one_is_default(name, opts):
    fmt = get_format(name, **opts)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    assert same_bits(fmt.quantize_dequantize(x, clip_ratio=torch.tensor(0.7)), fmt.quantize_dequantize(x, 0.7))
    assert same_bits(fmt.quantize_dequantize(x, 1.0), fmt.quantize_dequantize(x))
    assert not torch.equal(fmt.quantize_dequantize(x, 0.7), fmt.quantize_dequantize(x))


# the level at which a block saturates, given rho * amax of the block (fp32 math as the formats)
SATURATION = {
    "int4": lambda a: 7 * a.div(7).bfloat16().float(),
    "int8": lambda a: 127 * a.div(127).bfloat16().float(),
    "fp8_e4m3": lambda a: 448 * (a / 448),
    "mxfp4": lambda a: 6 * torch.exp2(torch.floor(torch.log2(a.double())) - 2).float(),
}


@pytest.mark.parametrize("name", list(SATURATION))
@pytest.mark.parametrize("rho", [0.9, 0.6, 0.3])
def test_smaller_clip_ratio_saturates_at_its_level(name, rho):
    fmt = get_format(name, group_size=32) if name != "mxfp4" else get_format(name)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(6))
    amax = x.abs().amax(-1, keepdim=True)
    level = SATURATION[name](amax * rho)
    y = fmt.quantize_dequantize(x, clip_ratio=rho)
    # elements beyond the clipped range come out at exactly +-level; none exceeds it
    beyond = x.abs() >= level
    assert bool(beyond.any())
    assert torch.equal(y.abs()[beyond], level.expand_as(x)[beyond])
    assert bool((y.abs() <= level).all())
    # and a smaller ratio clips more
    more = fmt.quantize_dequantize(x, clip_ratio=rho * 0.8).abs() < x.abs() * 0.9
    assert more.sum() > (y.abs() < x.abs() * 0.9).sum()


def test_clip_ratio_for_nvfp4_and_hif4():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    amax = x.abs().amax(-1)
    # HiF4: clip scales M1, so the largest output is 7 S with S ~ rho * M1 / 7
    y = get_format("hif4").quantize_dequantize(x, clip_ratio=0.5)
    assert bool((y.abs().amax(-1) <= 0.5 * amax * 1.15).all())
    assert bool((y.abs().amax(-1) >= 0.5 * amax * 0.85).all())
    # NVFP4: the block max maps to 6 * s_E4M3 * s_tensor ~ rho * amax_block (E4M3 within 1/16)
    y = get_format("nvfp4").quantize_dequantize(x, clip_ratio=0.5)
    blocks = x.unflatten(-1, (4, 16)).abs().amax(-1)
    assert torch.allclose(y.unflatten(-1, (4, 16)).abs().amax(-1), 0.5 * blocks, rtol=1 / 16)


# ----------------------------------------------------------------------------- error vs bits


def test_relative_mse_on_gaussian_data():
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))
    rel = {name: ((get_format(name).quantize_dequantize(x) - x).pow(2).mean() / x.pow(2).mean()).item()
           for name in FORMAT_NAMES}
    # measured (torch 2.13 CPU, this seed): the bands are +-5 %
    bands = {"int4": 1.378e-2, "mxfp4": 1.320e-2, "nvfp4": 9.06e-3, "hif4": 6.88e-3,
             "fp8_e4m3": 7.00e-4, "int8": 7.56e-5}
    for name, expect in bands.items():
        assert 0.95 * expect < rel[name] < 1.05 * expect, (name, rel[name])
    four_bit = [rel[n] for n in ("int4", "mxfp4", "nvfp4", "hif4")]
    assert rel["int8"] * 5 < rel["fp8_e4m3"] < min(four_bit) / 5
    # a uniform quantizer's error for MXFP4 on N(0, 1): step^2 / 12 over the E2M1 bins, X ~ 1/2
    assert 0.010 < rel["mxfp4"] < 0.017


# ----------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_naming_the_tensor(name, bad):
    fmt = get_format(name)
    x = torch.randn(3, 128)
    x[1, 5] = bad
    with pytest.raises(ValueError, match=r"blocks\.3\.ffn\.w1: cannot quantize to .*\(1, 5\)"):
        fmt.quantize_dequantize(x, name="blocks.3.ffn.w1")
    with pytest.raises(ValueError, match="weight"):
        fmt.encode(x.bfloat16(), name="weight")
    with pytest.raises(ValueError, match="non-finite"):
        fmt.block_state(x)
    if math.isnan(bad):  # opting out: NaN stays NaN where it was
        y = fmt.quantize_dequantize(x, check_finite=False)
        assert torch.isnan(y[1, 5])


# ----------------------------------------------------------------------------- GPTQ block state


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_block_state_column_by_column_matches_qdq(name, opts):
    fmt = get_format(name, **opts)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    width = 256 if fmt.block_size < 0 else 2 * fmt.block_size
    kw = {"tensor_amax": w.float().abs().amax()} if name == "nvfp4" else {}
    full = fmt.quantize_dequantize(w, **kw)
    states, cols = [], []
    for g in range(0, 256, width):
        state = fmt.block_state(w[:, g: g + width], **kw)
        states.append(state)
        for j in range(state.ncols):
            col = fmt.quantize_dequantize_with_state(w[:, g + j], state, start=j)  # a 1-D column
            assert col.shape == (8,) and col.dtype == w.dtype
            cols.append(col)
        # several columns at once, from an offset
        assert same_bits(fmt.quantize_dequantize_with_state(w[:, g + 3: g + 9], state, start=3),
                         full[:, g + 3: g + 9])
    assert same_bits(torch.stack(cols, -1), full)
    # encode with the states' scales stores exactly these columns
    assert same_bits(fmt.decode(fmt.encode(torch.stack(cols, -1), state=BlockState.cat(states))), full)


def test_block_state_on_a_partial_last_block_and_errors():
    fmt = get_format("mxfp4")
    w = torch.randn(4, 40)
    state = fmt.block_state(w)
    assert state.ncols == 40
    assert same_bits(fmt.quantize_dequantize_with_state(w, state), fmt.quantize_dequantize(w))
    with pytest.raises(ValueError, match="do not fit"):
        fmt.quantize_dequantize_with_state(w[:, :5], state, start=38)
    with pytest.raises(ValueError, match="do not fit"):
        fmt.quantize_dequantize_with_state(torch.randn(3), state)
    with pytest.raises(ValueError, match="cannot be used by int4"):
        get_format("int4").quantize_dequantize_with_state(w, state)


def test_gptq_state_keeps_scales_fixed_while_columns_change():
    # the point of the state: later columns are quantized with scales from the original block
    fmt = get_format("int4", group_size=32)
    w = torch.randn(4, 32)
    state = fmt.block_state(w)
    scale = w.abs().amax(-1) / 7
    moved = w[:, 5] * 3  # GPTQ's error feedback has changed the column
    y = fmt.quantize_dequantize_with_state(moved, state, start=5)
    assert bool((y.abs() <= 7 * scale.bfloat16().float() * 1.001).all())
    assert not torch.equal(y, fmt.quantize_dequantize(moved.unsqueeze(-1), 1.0).squeeze(-1))


def test_nvfp4_tensor_amax_option():
    fmt = get_format("nvfp4")
    x = torch.randn(4, 64)
    assert same_bits(fmt.quantize_dequantize(x, tensor_amax=x.abs().amax()), fmt.quantize_dequantize(x))
    p = fmt.encode(x, tensor_amax=10.0)
    assert p.tensors()["tensor_scale"].item() == np.float32(10.0) / np.float32(2688.0)
    assert same_bits(fmt.decode(p), fmt.quantize_dequantize(x, tensor_amax=torch.tensor(10.0)))
    # a calibrated amax below the real one saturates block scales at E4M3's 448
    small = fmt.encode(x, tensor_amax=0.1)
    assert small.tensors()["scales"].float().max() == 448


# ----------------------------------------------------------------------------- range edges


def test_output_saturates_at_the_dtype_max_instead_of_inf():
    # the ceil rule rounds 60000 / 2**14 = 3.66 up to 4, i.e. 65536, past fp16's 65504
    x = torch.full((32,), 60000.0, dtype=torch.float16)
    y = get_format("mxfp4", scale_rule="ceil").quantize_dequantize(x)
    assert bool((y == 65504).all())
    # and an fp16 INT4 scale: fp16(65504 / 7) = 9360, and 7 * 9360 = 65520 would round to inf
    y = get_format("int4", scale_dtype="float16").quantize_dequantize(
        torch.full((8,), 65504.0, dtype=torch.float16))
    assert bool((y == 65504).all())


def test_tiny_blocks_and_clamped_mx_exponent():
    # amax 2**-140: floor(log2) - 2 = -142, clamped to E8M0's -127, so the block rounds to 0
    x = torch.zeros(32)
    x[0] = 2.0**-140
    assert get_format("mxfp4").encode(x).tensors()["scales"].item() == 0
    assert get_format("mxfp4").quantize_dequantize(x).abs().max() == 0
    x[0] = 2.0**-124  # e = -126: representable, so it survives
    assert get_format("mxfp4").quantize_dequantize(x)[0] == 2.0**-124


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_bit_for_bit(name, opts, dtype):
    fmt = get_format(name, **opts)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(16, 333, generator=g) * torch.exp(torch.randn(16, 1, generator=g) * 3)).to(dtype)
    x[0, :70] = 0
    x[1, 3] = -0.0
    y_cpu = fmt.quantize_dequantize(x, clip_ratio=0.9)
    y_gpu = fmt.quantize_dequantize(x.cuda(), clip_ratio=torch.tensor(0.9))
    assert same_bits(y_gpu.cpu(), y_cpu)
    packed = fmt.encode(x.cuda(), clip_ratio=0.9)
    assert packed.device.type == "cuda"
    assert same_bits(fmt.decode(packed).cpu(), y_cpu)
    assert same_bits(fmt.decode(packed.to("cpu")), y_cpu)
    state = fmt.block_state(x.cuda()[:, :64])
    assert same_bits(fmt.quantize_dequantize_with_state(x.cuda()[:, 5], state, start=5).cpu(),
                     fmt.quantize_dequantize_with_state(x[:, 5], fmt.block_state(x[:, :64]), start=5))


@pytest.mark.parametrize("name,opts", CONFIGS, ids=IDS)
def test_empty_leading_dims(name, opts):
    # e.g. a batch with no tokens
    fmt = get_format(name, **opts)
    x = torch.randn(0, 3, 100)
    y = fmt.quantize_dequantize(x)
    assert y.shape == x.shape and same_bits(fmt.decode(fmt.encode(x)), y)
