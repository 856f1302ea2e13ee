"""``quantize_(model, config)``: swap targeted linears for QuantLinear, torchao style.

A config object knows how to build one quantized layer from one ``nn.Linear``; ``quantize_`` walks
the model, asks it for each selected layer, and swaps the module in place (the 16-bit original is
dropped, so its memory is freed once nothing else holds it). A recipe
(:class:`wanexp.quant.methods.QuantRecipe`) is given each layer's calibration statistics
(``stats=``) and says what it chose; ``quantize_`` returns those choices with the names swapped.

Device placement, the one rule (every swap goes through :func:`replace_module`): a replacement
lives on the device of the module it replaces. The layer may be *computed* elsewhere
(``compute_device``: the GPU while an offloaded model sits on the CPU); the config's ``build``
brings its own inputs (calibration statistics) to the device of the linear it is given.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn

from wanexp.quant.context import TimestepContext
from wanexp.quant.linear import QuantLinear


class LayerQuantizer(Protocol):
    def build(self, name: str, linear: nn.Linear, *stats: Any) -> nn.Module | tuple[nn.Module, dict] | None:
        """Return the replacement for ``linear`` (or None to keep it as it is), on ``linear``'s device,
        or ``(replacement, choices)``; ``stats``: the layer's statistics, when ``quantize_`` has them."""


class Swapped(list):
    """The names of the linears swapped, in order, with per layer what the builder chose (``choices``:
    the ``choices.json`` entries) and the seconds its build took (``seconds``)."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors live: its first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters(recurse=True):
        return t.device
    for t in module.buffers(recurse=True):
        return t.device
    return torch.device("cpu")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap ``model.<name>`` for ``new``, placed on the device of the module it replaces."""
    set_submodule(model, name, new.to(module_device(model.get_submodule(name))))


def linear_on(linear: nn.Linear, device: torch.device | None) -> nn.Linear:
    """``linear`` itself when it is already on ``device`` (or no device is asked for), else a copy there."""
    if device is None or module_device(linear) == torch.device(device):
        return linear
    with torch.device("meta"):
        copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    copy.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
    if linear.bias is not None:
        copy.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return copy


def build_timed(config: LayerQuantizer, name: str, linear: nn.Linear, stats: Mapping | None = None):
    """``(replacement, choices or None, seconds)`` of one ``config.build`` (the GPU's queue drained, so
    the seconds are the build's); ``stats``: layer name → statistics, None for a builder without."""
    start = time.perf_counter()
    built = config.build(name, linear) if stats is None else config.build(name, linear, stats.get(name))
    new, chosen = built if isinstance(built, tuple) else (built, None)
    if linear.weight.is_cuda:
        torch.cuda.synchronize(linear.weight.device)
    return new, chosen, round(time.perf_counter() - start, 4)


def quantize_(model: nn.Module, config: LayerQuantizer, names: Iterable[str],
              context: TimestepContext | None = None, progress: Callable[[str], None] | None = None,
              compute_device: torch.device | str | None = None, stats: Mapping | None = None) -> Swapped:
    """Replace each named linear by what ``config.build(name, linear[, stats[name]])`` returns; returns
    the names swapped, with the choices and seconds of every layer built (:class:`Swapped`).

    ``compute_device``: where each layer is built (None: where the linear is); the result is
    placed where the linear was."""
    swapped = Swapped()
    for name in list(names):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not nn.Linear")
        new, chosen, swapped.seconds[name] = build_timed(config, name, linear_on(linear, compute_device), stats)
        if chosen is not None:
            swapped.choices[name] = chosen
        if new is not None:
            if isinstance(new, QuantLinear):
                new.context = context
            replace_module(model, name, new)
            swapped.append(name)
        if progress:
            progress(name)
    return swapped


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _summed(models, counts: Callable[[QuantLinear], dict[str, int]]) -> dict[str, int]:
    """``counts(layer)`` summed key by key over the models' QuantLinears."""
    total: dict[str, int] = {}
    for model in models:
        for layer in quant_layers(model).values():
            for key, n in counts(layer).items():
                total[key] = total.get(key, 0) + n
    return total


def path_calls(*models: nn.Module) -> dict[str, int]:
    """Forwards of the models' QuantLinears by path (``fused``: the GPU kernels; ``reference``: torch)."""
    return {"fused": 0, "reference": 0, **_summed(models, lambda layer: layer.calls)}


def fallback_counts(*models: nn.Module) -> dict[str, int]:
    """The FP8 fold's exact-fallback rows (activations) and columns (weights), summed over the
    models' QuantLinears."""
    return {"fp8_rows": 0, "fp8_cols": 0, **_summed(models, lambda layer: layer.fallbacks)}


def attach_context(model: nn.Module, context: TimestepContext) -> None:
    for layer in quant_layers(model).values():
        layer.context = context
