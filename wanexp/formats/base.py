"""What every number format shares: blocking along the last dim, the finiteness check, output
casting, the packed container (:class:`PackedTensor`) and the GPTQ block state (:class:`BlockState`).

A format is described by four small hooks that work on fp32 tensors shaped by :meth:`_view_shape`
(``(*lead, n_blocks, block)`` unless the format splits blocks into sub-blocks):

* ``_scales(v, rho, **kw)``  -> dict of scale tensors that broadcast against ``v`` (the only
  reductions happen here; every scale is already rounded to its storage precision, which is what
  makes ``decode(encode(x)) == quantize_dequantize(x)`` bit for bit), plus ``"amax"``: the block
  maxima of |v| before the clip ratio, which the finiteness check reads instead of all of v
  (a NaN or Inf anywhere makes its block's max non-finite);
* ``_quantize(v, s)``        -> the signed element values on the format grid (fp32), elementwise
  (never modifying v, which can be the caller's tensor);
* ``_dequantize(q, s)``      -> q times the scales (fp32), elementwise;
* ``_pack(q, s)`` / ``_unpack(t, view_shape)`` -> storage tensors and back.

Because ``_quantize``/``_dequantize`` are elementwise given broadcastable scales, the GPTQ path
(:meth:`NumberFormat.quantize_dequantize_with_state`) reuses them on single columns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

# Bumped if the layout of PackedTensor.tensors() ever changes; decode refuses other versions.
PACK_VERSION = 1
# Formats whose own layout changed since: hif4 2 = the E6M2 group scale's exponent bias became 48 when
# FORMATS.md (2026-12-01) moved the clip from M1 to S0 (S in [2**-48, 49152]).
PACK_VERSIONS = {"hif4": 2}


def pack_version(fmt: str) -> int:
    return PACK_VERSIONS.get(fmt, PACK_VERSION)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}   # the short names configs use


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``bfloat16`` (as ``dtype_name`` writes it) or a short name (``bf16``) → the torch dtype."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------- exact helpers


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e as float32 for integer e in [-149, 127], built from the bits so it is exact on every
    device (exp2/ldexp go through pow and are not guaranteed exact)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23  # biased exponent field, mantissa 0
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)  # 2**-127 .. 2**-149 live in the mantissa
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def floor_log2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(log2 a), a / 2**floor(log2 a)) for a > 0, exactly (frexp handles subnormals; log2
    would round 2**k - ulp up to k). The second value lies in [1, 2)."""
    m, E = torch.frexp(a)  # a = m * 2**E, m in [0.5, 1)
    return E - 1, m * 2


def div(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c, correctly rounded on every device. CUDA kernels turn a division by a Python scalar
    into a multiplication by its reciprocal (two roundings: 1/6, 1/7, 1/448 are inexact), which
    would break CPU/GPU bit-equality; dividing by a 0-dim tensor on t's device does not."""
    return t / t.new_full((), c)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (all-zero block, or a scale that underflowed its storage format) means every
    element of the block is stored as zero: dividing by +inf gives that (keeping the sign of x)."""
    return torch.where(scale > 0, scale, torch.full_like(scale, math.inf))


def ensure_finite(x: torch.Tensor, name: str, fmt_name: str) -> None:
    """Raise ValueError naming the tensor if x holds NaN or Inf (one reduction if it does not)."""
    if bool(torch.isfinite(x).all()):
        return
    bad = ~torch.isfinite(x)
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    n_nan = int(torch.isnan(x).sum())
    raise ValueError(
        f"{name}: cannot quantize to {fmt_name}: {int(bad.sum())} non-finite value(s) "
        f"({n_nan} NaN, {int(bad.sum()) - n_nan} Inf) in a tensor of shape {tuple(x.shape)}, "
        f"first at index {first} = {x[first].item()} (check_finite=False skips this check)"
    )


def as_clip_ratio(clip_ratio: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A python float stays a scalar (torch multiplies fp32 by it in fp32); a tensor is moved to the
    data's device as fp32. Tensors are not validated, to avoid a device sync per call."""
    if isinstance(clip_ratio, torch.Tensor):
        return clip_ratio.to(device=like.device, dtype=torch.float32)
    clip_ratio = float(clip_ratio)
    if not clip_ratio > 0 or not math.isfinite(clip_ratio):
        raise ValueError(f"clip_ratio must be a positive finite number, got {clip_ratio}")
    return clip_ratio


def scaled(amax: torch.Tensor, rho: float | torch.Tensor) -> torch.Tensor:
    # Skipping the multiply for the default keeps rho == 1 free and obviously exact.
    return amax if isinstance(rho, float) and rho == 1.0 else amax * rho


def block_amax(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """max |v| along dim (keepdim). max(max v, -min v) reads v twice but allocates no |v| copy,
    which on CPU is several times faster; NaN propagates, and +0.0 turns the -0 an all-zero block
    can give into +0."""
    return torch.maximum(v.amax(dim, keepdim=True), v.amin(dim, keepdim=True).neg_()).add_(0.0)


def cast_out(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> the caller's dtype, in place on y (a temporary of ours). Values past the dtype's range
    saturate to its largest finite value instead of becoming inf (possible for fp16 inputs near
    65504, whose scale can round up)."""
    big = torch.finfo(dtype).max
    return y.clamp_(-big, big).to(dtype)


# ----------------------------------------------------------------------------- bit packing


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) -> uint8, two per byte: element 2i in the low nibble, 2i+1 in the high
    nibble (the order of most FP4/INT4 kernels). An odd-length last dim gets one zero code."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    return codes[..., :n]


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """bool (..., 8k) -> uint8 (..., k); bit j of byte i is flag 8i + j."""
    weights = (1 << torch.arange(8, device=flags.device, dtype=torch.int32))
    grouped = flags.unflatten(-1, (-1, 8)).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., k) -> bool (..., 8k), inverse of :func:`pack_bits`."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


# ----------------------------------------------------------------------------- containers


@dataclasses.dataclass
class PackedTensor:
    """Real low-bit storage of one tensor: the format's code and scale tensors plus the metadata
    needed to decode them (format name and options, original shape and dtype).

    ``tensors()`` and ``meta()`` are what goes to disk (safetensors tensors + a JSON string in the
    header); ``from_tensors`` reverses it. ``nbytes`` counts the bytes these tensors actually hold,
    padding of a partial last block included, so memory accounting can come from it.
    """

    format: str
    options: dict[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.data)

    def meta(self) -> dict[str, Any]:
        return {"format": self.format, "options": dict(self.options), "shape": list(self.shape),
                "dtype": dtype_name(self.dtype), "version": pack_version(self.format)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PackedTensor":
        if meta.get("version") != pack_version(meta.get("format")):
            raise ValueError(f"packed {meta.get('format')} tensor layout version {meta.get('version')!r} is not "
                             f"{pack_version(meta.get('format'))}; it was written by another wanexp")
        return cls(format=meta["format"], options=dict(meta["options"]), shape=tuple(meta["shape"]),
                   dtype=dtype_from_name(meta["dtype"]), data=dict(tensors))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def to(self, device: torch.device | str) -> "PackedTensor":
        return dataclasses.replace(self, data={k: v.to(device) for k, v in self.data.items()})


@dataclasses.dataclass
class BlockState:
    """Scales computed once for a column block, for GPTQ (which must fix a group's scales when it
    reaches the group, then quantize the group's columns one at a time as it updates them).

    ``scales`` are in the format's compact layout (one entry per block / sub-block, shapes
    broadcasting against ``view_shape``); 0-dim entries (NVFP4's per-tensor scale) apply to all.
    ``columns()`` expands them to one value per row and column of the block, ``(*lead, ncols)``,
    so any column slice can be quantized elementwise.
    """

    format: str
    scales: dict[str, torch.Tensor]
    view_shape: tuple[int, ...]  # (*lead, n_blocks, ...) of the (padded) block the scales came from
    lead_ndim: int
    ncols: int  # unpadded number of columns the state covers
    _columns: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.view_shape[: self.lead_ndim])

    def columns(self) -> dict[str, torch.Tensor]:
        if self._columns is None:
            padded = math.prod(self.view_shape[self.lead_ndim:])
            self._columns = {
                k: v if v.dim() == 0 else v.expand(self.view_shape).reshape(*self.lead_shape, padded)
                for k, v in self.scales.items()
            }
        return self._columns

    @staticmethod
    def cat(states: list["BlockState"]) -> "BlockState":
        """Join the states of consecutive column blocks (in order) into one covering all columns, for
        ``encode(W_q, state=BlockState.cat(states))`` after GPTQ. Every block but the last must span
        whole format blocks."""
        first = states[0]
        nb_dim = first.lead_ndim
        for s in states[:-1]:
            if s.ncols != math.prod(s.view_shape[nb_dim:]):
                raise ValueError("BlockState.cat: only the last state may cover a partial block")
        scales = {}
        for k, v in first.scales.items():
            if v.dim() == 0:
                if not all(torch.equal(s.scales[k], v) for s in states):
                    raise ValueError(f"BlockState.cat: the per-tensor '{k}' differs between states; "
                                     "pass the same tensor_amax to every block_state call")
                scales[k] = v
            else:
                scales[k] = torch.cat([s.scales[k] for s in states], dim=nb_dim)
        view = list(first.view_shape)
        view[nb_dim] = sum(s.view_shape[nb_dim] for s in states)
        return BlockState(first.format, scales, tuple(view), nb_dim, sum(s.ncols for s in states))


# ----------------------------------------------------------------------------- the interface


class NumberFormat:
    """Base class; see the module docstring for the hooks a format implements."""

    name: str = ""
    element_bits: int = 4
    scale_bits: int = 8  # storage bits of the scales of one block (all levels together)
    block_size: int = 32  # -1: one block per row (per output channel / per token)
    # The challenge rule of the papers that use this format: at most this many whole blocks kept in
    # high precision (None: no rule; ``expert.max_keep_blocks`` overrides it).
    max_keep_blocks: int | None = None

    def __init__(self, **options: Any) -> None:
        self._options = options

    # -- description

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element including the block scales. For per-row formats
        (block_size -1) the row length is unknown here: this is the element width only; see
        :meth:`bits_per_element_for`. Per-tensor scalars (NVFP4's fp32) are not counted."""
        if self.block_size < 0:
            return float(self.element_bits)
        return self.element_bits + self.scale_bits / self.block_size

    def bits_per_element_for(self, k: int) -> float:
        """Exact storage bits per element for rows of length k (partial last block padded)."""
        block = k if self.block_size < 0 else self.block_size
        n_blocks = -(-k // block)
        return (n_blocks * block * self.element_bits + n_blocks * self.scale_bits) / k

    def grid_values(self) -> torch.Tensor:
        """The representable element magnitudes before scaling (fp32, ascending)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"get_format({self.name!r}{', ' if opts else ''}{opts})"

    # -- hooks (fp32 in, fp32 out)

    def _view_dims(self, block: int) -> tuple[int, ...]:
        """How one block is laid out for the hooks; sub-blocked formats split it further."""
        return (block,)

    def _view_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        k = shape[-1]
        block = self._block_len(k)
        return (*shape[:-1], -(-k // block), *self._view_dims(block))

    def _scales(self, v: torch.Tensor, rho: float | torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _quantize(self, v: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize(self, q: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _pack(self, q: torch.Tensor, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _unpack(self, t: dict[str, torch.Tensor], view_shape: tuple[int, ...]):
        raise NotImplementedError

    # -- plumbing

    def _block_len(self, k: int) -> int:
        return k if self.block_size < 0 else self.block_size

    def _view_of(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Validate, go to fp32, pad the last dim with zeros to whole blocks (zeros never change a
        block's amax) and reshape to the format's view (for fp32 input without padding, a view of
        x itself: the hooks must not write to it)."""
        if not x.is_floating_point():
            raise TypeError(f"{name}: {self.name} quantizes floating-point tensors, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"{name}: {self.name} needs a non-empty last dim, got shape {tuple(x.shape)}")
        k = x.shape[-1]
        pad = (-k) % self._block_len(k)
        xf = F.pad(x.float(), (0, pad)) if pad else x.float()
        return xf.reshape(self._view_shape(tuple(x.shape)))

    def _scales_of(self, v: torch.Tensor, x: torch.Tensor, clip_ratio, name: str, check: bool,
                   state: BlockState | None, kw: dict) -> dict[str, torch.Tensor]:
        """The scales for v (from ``state`` if given), after the NaN/Inf check."""
        if state is not None:
            if check:
                ensure_finite(x, name, self.name)
            return self._state_scales(state, v)
        s = self._scales(v, as_clip_ratio(clip_ratio, v), **kw)
        amax = s.pop("amax")
        if check and not bool(torch.isfinite(amax).all()):
            ensure_finite(x, name, self.name)  # raises, naming the first bad element
        return s

    def _finish(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        y = y.flatten(len(shape) - 1)[..., : shape[-1]]  # (*lead, n_blocks * block), unpadded
        return cast_out(y, dtype).contiguous()

    def _state_scales(self, state: BlockState, v: torch.Tensor) -> dict[str, torch.Tensor]:
        if state.format != self.name:
            raise ValueError(f"a {state.format} BlockState cannot be used by {self.name}")
        if tuple(state.view_shape) != tuple(v.shape):
            raise ValueError(f"BlockState covers blocks of shape {state.view_shape}, "
                             f"the tensor gives {tuple(v.shape)}")
        return state.scales

    # -- public API

    def quantize_dequantize(self, x: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0, *,
                            name: str = "tensor", check_finite: bool = True,
                            state: BlockState | None = None, **kw: Any) -> torch.Tensor:
        """The value the low-bit storage of ``x`` represents, same shape and dtype as ``x``.

        Blocks run along the last dim. ``clip_ratio`` (float or 0-dim tensor) multiplies each
        block's amax before its scale is computed. ``check_finite`` raises ValueError naming
        ``name`` on NaN/Inf (one reduction, one device sync); with False, NaN inputs come out NaN
        and Inf inputs give unspecified values. ``state`` reuses the scales of
        :meth:`block_state` (GPTQ) instead of computing them from ``x`` (``clip_ratio`` and the
        format's keyword options are then ignored). Extra keywords go to the format
        (NVFP4: ``tensor_amax``).
        """
        v = self._view_of(x, name)
        s = self._scales_of(v, x, clip_ratio, name, check_finite, state, kw)
        return self._finish(self._dequantize(self._quantize(v, s), s), x.shape, x.dtype)

    def encode(self, x: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0, *,
               name: str = "tensor", state: BlockState | None = None, **kw: Any) -> PackedTensor:
        """Codes + scales in their storage formats; ``decode`` of it equals ``quantize_dequantize``
        with the same arguments, bit for bit. Always checks for NaN/Inf (no code can hold them)."""
        v = self._view_of(x, name)
        s = self._scales_of(v, x, clip_ratio, name, True, state, kw)
        data = self._pack(self._quantize(v, s), s)
        return PackedTensor(self.name, self.options, tuple(x.shape), x.dtype, data)

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        if packed.format != self.name or packed.options != self.options:
            raise ValueError(f"cannot decode a {packed.format} {packed.options} tensor with "
                             f"{self!r}; use wanexp.formats.decode(packed)")
        q, s = self._unpack(packed.data, self._view_shape(tuple(packed.shape)))
        return self._finish(self._dequantize(q, s), torch.Size(packed.shape), packed.dtype)

    def shared_state_options(self, w: torch.Tensor) -> dict[str, Any]:
        """The options every :meth:`block_state` of one weight ``w`` must share, from ``w`` before any
        column is quantized (GPTQ passes them to each block's call); none by default. A format with a
        scale above the block (NVFP4's per-tensor scale) fixes it here for the whole weight."""
        return {}

    def block_state(self, x_block: torch.Tensor, clip_ratio: float | torch.Tensor = 1.0, *,
                    name: str = "tensor", check_finite: bool = True, **kw: Any) -> BlockState:
        """Scales for the columns of ``x_block`` (its last dim; a partial last block is padded),
        computed from ``x_block`` itself. For per-row formats (block_size -1) pass the whole row."""
        v = self._view_of(x_block, name)
        s = self._scales_of(v, x_block, clip_ratio, name, check_finite, None, kw)
        return BlockState(self.name, s, tuple(v.shape), x_block.dim() - 1, x_block.shape[-1])

    def quantize_dequantize_with_state(self, x: torch.Tensor, state: BlockState, start: int = 0, *,
                                       name: str = "tensor", check_finite: bool = True) -> torch.Tensor:
        """Quantize columns ``start, start+1, ...`` of the block ``state`` was computed from, using
        its scales. ``x`` is either ``(*lead, n)`` (n columns) or ``(*lead,)`` (a single column,
        e.g. ``W[:, j]``); ``start`` is the column's index inside that block."""
        if state.format != self.name:
            raise ValueError(f"a {state.format} BlockState cannot be used by {self.name}")
        single = x.dim() == state.lead_ndim
        cols = x.unsqueeze(-1) if single else x
        if tuple(cols.shape[:-1]) != state.lead_shape or start < 0 or start + cols.shape[-1] > state.ncols:
            raise ValueError(f"{name}: columns {start}..{start + cols.shape[-1] - 1} of shape "
                             f"{tuple(x.shape)} do not fit a state over {state.ncols} columns of "
                             f"rows {state.lead_shape}")
        if check_finite:
            ensure_finite(cols, name, self.name)
        s = {k: v if v.dim() == 0 else v[..., start: start + cols.shape[-1]]
             for k, v in state.columns().items()}
        y = cast_out(self._dequantize(self._quantize(cols.float(), s), s), x.dtype)
        return y.squeeze(-1) if single else y

