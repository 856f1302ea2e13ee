"""Stop at the first NaN/Inf, naming the layer, the expert and the timestep.

Cost, by design: one ``isfinite`` check of each expert's output per forward (a host sync per
denoising step and CFG pass, nothing per layer in the hot path). Only when an expert's output is
not finite (or its forward fails, e.g. a quantizer refusing NaN inputs) is that forward run once
more with every module's output checked, to name the first module (in execution order) whose
output is not finite. Calibration, the BF16 references and the
quantized videos all go through it. ``WANEXP_CHECK_FINITE=0`` turns the check off.

Fault injection (to test this, or to see the message): ``WANEXP_INJECT_NAN=<expert>:<layer>[:inf]``
(e.g. ``low_noise:blocks.1.ffn.net.2``) turns that layer's output to NaN (or +Inf) whenever it runs
quantized, as a format overflow would; BF16 passes (calibration, references) are left alone.
"""

from __future__ import annotations

import functools
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


def first_nonfinite(model: nn.Module, forward, args, kwargs) -> tuple[str, str] | None:
    """Run ``forward`` (the expert's own) again on the same inputs; (name, NaN|Inf) of the first module
    whose output is not finite, in the order modules finish (a layer finishes before the block that
    holds it). An error the non-finite values cause further on (a quantizer refusing them) ends the
    re-run; the culprit is already known by then."""
    found: list[tuple[str, str]] = []

    def hook(name):
        def check(_mod, _args, out):
            if not found and not _finite(out):
                found.append((name, _kind(out)))
        return check
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            forward(*args, **kwargs)
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class _Unguard:
    """Undoes one expert's guard (the handle ``install_guard`` returns for it)."""

    def __init__(self, model: nn.Module, forward):
        self.model, self.forward = model, forward

    def remove(self) -> None:
        if self.forward is None:  # the class's forward again
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.forward


def install_guard(experts: Mapping[str, nn.Module], step_of: Callable[[float], str] | None = None,
                  quantized: Callable[[nn.Module], bool] = lambda m: False) -> list:
    """Check every forward of each expert (see the module docstring); returns handles (``.remove()``).
    ``step_of(t)`` describes the denoising step of timestep ``t``; ``quantized(module)`` tells the
    fault injection which layers run quantized. The expert's ``forward`` is wrapped (not hooked):
    an error raised inside it because of non-finite values (a quantizer refusing NaN inputs) is
    traced back to the layer that produced them too."""
    if os.environ.get(CHECK_ENV, "1") == "0":
        return []
    inject = _injection()
    handles = []
    for name, model in experts.items():
        handles.append(_Unguard(model, model.__dict__.get("forward")))
        model.forward = _guarded(name, model, model.forward, step_of)
        if inject and inject[0] == name:
            handles.append(model.register_forward_pre_hook(_injector(model, inject[1], inject[2], quantized)))
    return handles


def _guarded(name: str, model: nn.Module, forward, step_of):
    @functools.wraps(forward)
    def guarded(*args, **kwargs):
        try:
            out = forward(*args, **kwargs)
        except NonFiniteError:
            raise
        except Exception as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            culprit = first_nonfinite(model, forward, args, kwargs)
            if culprit is None:
                raise
            raise NonFiniteError(_message(name, culprit, args, kwargs, step_of)) from err
        if not _finite(out):  # the one host sync per expert forward
            culprit = first_nonfinite(model, forward, args, kwargs) or ("", _kind(out))
            raise NonFiniteError(_message(name, culprit, args, kwargs, step_of))
        return out
    return guarded


def _message(expert: str, culprit: tuple[str, str], args, kwargs, step_of) -> str:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    t = float(torch.as_tensor(t).flatten()[0]) if t is not None else float("nan")
    layer, kind = culprit
    where = (f"layer {layer} of the {expert} expert produced {kind}" if layer else
             f"the {expert} expert's output is {kind} (no single layer's output was)")
    step = f" ({step_of(t)})" if step_of else ""
    return (f"{where} at timestep {t:g}{step}; stopped there, finished work is kept "
            "(a format overflow or a degenerate scale: try another format or method)")


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
