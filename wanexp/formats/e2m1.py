"""E2M1, the 4-bit element of MXFP4 and NVFP4: sign, 2-bit exponent, 1-bit mantissa.

Magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; code = sign << 3 | index into that list (OCP MX v1.0 and
NVIDIA use this encoding, so code 0b1000 is -0).

Rounding (``ties`` option of the E2M1 formats): ``"even"`` (default, OCP) sends a value halfway
between two grid points to the one whose mantissa bit is 0; ``"toward_zero"`` sends it to the
smaller magnitude (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3), as the seed paper's public code does (its
encoder buckets |x| against the midpoints with the midpoint itself in the lower bucket). The two
differ only on the three midpoints whose even neighbour is the larger one: 0.75, 1.75 and 3.5.
"""

from __future__ import annotations

import math

import torch

from .base import NumberFormat, pack_nibbles, unpack_nibbles

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
TIES = ("even", "toward_zero")
LOOKUP_NUMEL = 1 << 16  # up to this size a CPU tensor is rounded by the lookup too


def round_e2m1(x: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """Round to the signed E2M1 grid: nearest, ties to even mantissa (or ``ties="toward_zero"``:
    to the smaller magnitude), saturating at +-6.

    The grid spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4 on, so rounding x/spacing to an
    integer with torch.round (ties to even) is exactly E2M1's ties-to-even rule: an even multiple
    of the spacing is a grid value whose mantissa bit is 0 (0.25->0, 0.75->1, 2.5->2, 3.5->4, 5->4).
    Dividing and multiplying by a power of two is exact. copysign keeps the sign of x on zero
    results, so -0.1 stores -0 like the hardware encoding. NaN stays NaN.
    """
    a = x.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    # in place on our own temporary: each full-size allocation costs as much as the arithmetic
    a = a.div_(step)
    if ties == "even":
        a = a.round_()
    else:  # ceil(v - 1/2) rounds halves down. v - 1/2 is exact for 1/2 <= v < 2**23 (both are multiples
        # of v's ulp); below 1/2 it lies in [-1/2, 0) and ceils to -0; above 2**23 saturation decides
        a = a.sub_(0.5).ceil_()
    return a.mul_(step).clamp_(max=E2M1_MAX).copysign_(x)


def _boundaries(ties: str) -> list[float]:
    """Upper bucket edges of the E2M1 magnitudes for ``bucketize(|x|, edges, right=False)`` (bucket i
    holds the |x| with edge[i-1] < |x| <= edge[i]): the midpoints between grid values, a midpoint
    that rounds up (ties to even: 0.75, 1.75, 3.5) moved one fp32 ulp down so it lands above, and
    +inf last so that only NaN falls past every edge."""
    mids = [(a + b) / 2 for a, b in zip(E2M1_GRID, E2M1_GRID[1:])]
    up = {0.75, 1.75, 3.5} if ties == "even" else set()
    below = lambda m: float(torch.nextafter(torch.tensor(m, device="cpu"), torch.tensor(0.0, device="cpu")))
    return [below(m) if m in up else m for m in mids] + [math.inf]


_LOOKUP: dict = {}


def round_e2m1_lookup(x: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """:func:`round_e2m1` in four kernels instead of ten (abs, bucketize, take, copysign), bit for bit
    the same values, NaN and ±inf included: what a launch-bound caller (GPTQ's column loop on a GPU)
    wants. ``x`` is float32."""
    key = (ties, x.device)
    if key not in _LOOKUP:
        edges = torch.tensor(_boundaries(ties), dtype=torch.float32, device=x.device)
        values = torch.tensor(E2M1_GRID + (math.nan,), dtype=torch.float32, device=x.device)
        _LOOKUP[key] = edges, values
    edges, values = _LOOKUP[key]
    return values.take(torch.bucketize(x.abs(), edges)).copysign_(x)


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """Signed grid values (as returned by :func:`round_e2m1`) -> uint8 codes 0..15."""
    a = q.abs()
    index = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a / 2 + 4))  # 0,.5,..,6 -> 0..7
    return index.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> fp32 values (a 16-entry table lookup; -0 for code 8)."""
    table = torch.tensor(E2M1_GRID, device=codes.device)
    table = torch.cat((table, -table))
    return table[codes.long()]


class E2M1Format(NumberFormat):
    """Shared rounding and packing for the formats whose elements are E2M1 codes, two a byte."""

    element_bits = 4

    def __init__(self, ties: str = "even", **options) -> None:
        if ties not in TIES:
            raise ValueError(f"{self.name}: ties must be one of {TIES}, got {ties!r}")
        # the default is left out of the options so packed tensors written before the option existed
        # still decode with the same options
        super().__init__(**options, **({} if ties == "even" else {"ties": ties}))
        self.ties = ties

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        # the same values either way: the lookup's four kernels where launches cost (a GPU, or a
        # small tensor such as one GPTQ column), the vectorised arithmetic for large CPU tensors and
        # inside torch.compile (whose graphs fuse the arithmetic anyway)
        if (v.is_cuda or v.numel() <= LOOKUP_NUMEL) and not torch.compiler.is_compiling():
            return round_e2m1_lookup(v, self.ties)
        return round_e2m1(v, self.ties)

    def grid_values(self) -> torch.Tensor:
        return torch.tensor(E2M1_GRID)

    def _pack_codes(self, q: torch.Tensor) -> torch.Tensor:
        return pack_nibbles(e2m1_codes(q).flatten(-2))  # (*lead, n_blocks * block / 2)

    def _unpack_codes(self, packed: torch.Tensor, view_shape: tuple[int, ...]) -> torch.Tensor:
        n = view_shape[-2] * view_shape[-1]
        return e2m1_values(unpack_nibbles(packed, n)).reshape(view_shape)
