"""``quantize_(model, config)``: swap targeted linears for QuantLinear, torchao style.

A config object knows how to build one quantized layer from one ``nn.Linear``; ``quantize_`` walks
the model, asks it for each selected layer, and swaps the module in place (the 16-bit original is
dropped, so its memory is freed once nothing else holds it).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from torch import nn

from wanexp.quant.context import TimestepContext
from wanexp.quant.linear import QuantLinear


class LayerQuantizer(Protocol):
    def build(self, name: str, linear: nn.Linear) -> nn.Module | None:
        """Return the replacement for ``linear`` (or None to keep it as it is)."""


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_(model: nn.Module, config: LayerQuantizer, names: Iterable[str],
              context: TimestepContext | None = None, progress: Callable[[str], None] | None = None) -> list[str]:
    """Replace each named linear by ``config.build(name, linear)``; returns the names swapped."""
    swapped = []
    for name in list(names):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not nn.Linear")
        new = config.build(name, linear)
        if new is not None:
            if isinstance(new, QuantLinear):
                new.context = context
            set_submodule(model, name, new)
            swapped.append(name)
        if progress:
            progress(name)
    return swapped


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def attach_context(model: nn.Module, context: TimestepContext) -> None:
    for layer in quant_layers(model).values():
        layer.context = context
