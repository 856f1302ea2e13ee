"""Number formats: one interface for every quantizer in wanexp (spec: shared/spec/FORMATS.md).

    fmt = get_format("mxfp4")                      # or get_format("int4", group_size=-1), ...
    y = fmt.quantize_dequantize(x, clip_ratio=0.9) # same shape/dtype; blocks along the last dim
    packed = fmt.encode(x)                         # PackedTensor: real low-bit storage
    assert torch.equal(fmt.decode(packed), y)      # bit for bit (at the same clip_ratio)

GPTQ: ``state = fmt.block_state(W[:, g:g + B])`` fixes the scales of a column block;
``fmt.quantize_dequantize_with_state(W[:, j], state, start=j - g)`` then quantizes one column with
them, and ``fmt.encode(Wq, state=BlockState.cat(states))`` stores the result with the same scales.

On disk: ``save_packed(path, {"blocks.0.attn.q.weight": packed, ...})`` writes one safetensors file
(tensors ``name/codes``, ``name/scales``, ...; each PackedTensor's meta as JSON in the header);
``load_packed(path)`` gives the dict back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from .base import BlockState, NumberFormat, PackedTensor
from .fp8 import FP8E4M3
from .hifloat import HiF4
from .integer import INT4, INT8
from .mx import MXFP4
from .nv import NVFP4

_FACTORIES: dict[str, Callable[..., NumberFormat]] = {
    "int4": INT4,
    "mxfp4": MXFP4,
    "nvfp4": NVFP4,
    "hif4": HiF4,
    "fp8_e4m3": FP8E4M3,
    "int8": INT8,
}
FORMAT_NAMES: tuple[str, ...] = tuple(_FACTORIES)

_META_KEY = "wanexp.formats"


def get_format(name: str, **options: Any) -> NumberFormat:
    """A format by name with its options (e.g. ``group_size``, ``scale_rule``, ``scale_dtype``, ``ties``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown number format {name!r}; expected one of {list(FORMAT_NAMES)}")
    try:
        return _FACTORIES[name](**options)
    except TypeError as err:  # an option the format does not have
        raise ValueError(f"format {name!r}: bad options {options}: {err}") from None


def max_keep_blocks(name: str) -> int | None:
    """The format's rule on whole blocks kept in high precision (``NumberFormat.max_keep_blocks``)."""
    return getattr(_FACTORIES[name], "max_keep_blocks", None)


def decode(packed: PackedTensor) -> torch.Tensor:
    """Decode with the format and options recorded in the packed tensor."""
    return get_format(packed.format, **packed.options).decode(packed)


def save_packed(path: str | os.PathLike, packed: dict[str, PackedTensor]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}/{k}": v.contiguous() for name, p in packed.items() for k, v in p.tensors().items()}
    meta = {name: p.meta() for name, p in packed.items()}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, PackedTensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
        if meta is None:
            raise ValueError(f"{path}: no '{_META_KEY}' entry in the safetensors header")
        tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta}
        for key in f.keys():
            name, _, part = key.rpartition("/")
            tensors[name][part] = f.get_tensor(key)
    return {name: PackedTensor.from_tensors(tensors[name], m) for name, m in meta.items()}


__all__ = ["FORMAT_NAMES", "BlockState", "NumberFormat", "PackedTensor", "decode", "get_format",
           "load_packed", "max_keep_blocks", "save_packed"]
