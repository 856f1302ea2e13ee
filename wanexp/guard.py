"""Stop at the first NaN/Inf, naming the layer, the expert and the timestep.

Cost, by design: one ``isfinite`` check of each expert's output per forward (a host sync per
denoising step and CFG pass, nothing per layer in the hot path). Only when an expert's output is
not finite is that forward run once more with every module's output checked, to name the first
module (in execution order) whose output is not finite. Calibration, the BF16 references and the
quantized videos all go through it. ``WANEXP_CHECK_FINITE=0`` turns the check off.

Fault injection (to test this, or to see the message): ``WANEXP_INJECT_NAN=<expert>:<layer>[:inf]``
(e.g. ``low_noise:blocks.1.ffn.net.2``) turns that layer's output to NaN (or +Inf) whenever it runs
quantized, as a format overflow would; BF16 passes (calibration, references) are left alone.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from torch import nn

from wanexp.errors import WanexpError

INJECT_ENV, CHECK_ENV = "WANEXP_INJECT_NAN", "WANEXP_CHECK_FINITE"


class NonFiniteError(WanexpError):
    """A layer produced NaN or Inf."""


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(out.to_tuple())
    return []


def _finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(out) if t.is_floating_point())


def _kind(out) -> str:
    ts = [t for t in _tensors(out) if t.is_floating_point()]
    return "NaN" if any(bool(torch.isnan(t).any()) for t in ts) else "Inf"


def first_nonfinite(model: nn.Module, args, kwargs) -> tuple[str, str] | None:
    """Run ``model`` again on the same inputs; (name, NaN|Inf) of the first module whose output is
    not finite, in the order modules finish (a layer finishes before the block that holds it)."""
    found: list[tuple[str, str]] = []

    def hook(name):
        def check(_mod, _args, out):
            if not found and not _finite(out):
                found.append((name, _kind(out)))
        return check
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def install_guard(experts: Mapping[str, nn.Module], step_of: Callable[[float], str] | None = None,
                  quantized: Callable[[nn.Module], bool] = lambda m: False) -> list:
    """Check every forward of each expert (see the module docstring); returns the hook handles.
    ``step_of(t)`` describes the denoising step of timestep ``t``; ``quantized(module)`` tells the
    fault injection which layers run quantized."""
    if os.environ.get(CHECK_ENV, "1") == "0":
        return []
    inject = _injection()
    handles = []
    for name, model in experts.items():
        state = {"rerun": False}

        def after(mod, args, kwargs, out, _name=name, _state=state):
            if _state["rerun"] or _finite(out):
                return
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            t = float(torch.as_tensor(t).flatten()[0]) if t is not None else float("nan")
            _state["rerun"] = True
            try:
                culprit = first_nonfinite(mod, args, kwargs)
            finally:
                _state["rerun"] = False
            where = f"layer {culprit[0]} of the {_name} expert produced {culprit[1]}" if culprit else \
                f"the {_name} expert's output is {_kind(out)} (no single layer's output was)"
            step = f" ({step_of(t)})" if step_of else ""
            raise NonFiniteError(f"{where} at timestep {t:g}{step}; stopped there, finished work is kept "
                                 "(a format overflow or a degenerate scale: try another format or method)")
        handles.append(model.register_forward_hook(after, with_kwargs=True))
        if inject and inject[0] == name:
            handles.append(model.register_forward_pre_hook(_injector(model, inject[1], inject[2], quantized)))
    return handles


def _injection() -> tuple[str, str, float] | None:
    spec = os.environ.get(INJECT_ENV, "").strip()
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("high_noise", "low_noise") or (len(parts) == 3 and parts[2] not in ("nan", "inf")):
        raise WanexpError(f"{INJECT_ENV}={spec} is not <expert>:<layer>[:nan|inf] with expert high_noise or low_noise")
    return parts[0], parts[1], float("inf") if len(parts) == 3 and parts[2] == "inf" else float("nan")


def _injector(model: nn.Module, layer: str, value: float, quantized: Callable[[nn.Module], bool]):
    def pre(_mod, _args):
        try:
            target = model.get_submodule(layer)
        except AttributeError as err:
            raise WanexpError(f"{INJECT_ENV}: the expert has no layer {layer}") from err
        if quantized(target) and not getattr(target, "_wanexp_fault", False):
            target.register_forward_hook(lambda _m, _a, out: torch.full_like(out, value))
            target._wanexp_fault = True
    return pre
