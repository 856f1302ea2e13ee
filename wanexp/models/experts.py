"""The two experts by name, the boundary timestep, and the hook that publishes the current timestep.

Wan2.2-I2V-A14B's ``transformer`` is the high-noise expert (timesteps >= boundary) and
``transformer_2`` the low-noise expert (below it); the boundary is ``boundary_ratio`` times the
scheduler's number of training timesteps, exactly as the diffusers pipeline computes it.
"""

from __future__ import annotations

from typing import Callable

import torch

from wanexp.schema import EXPERTS  # noqa: F401 (the names, defined once; re-exported for wanexp.models)

_ATTR = {"high_noise": "transformer", "low_noise": "transformer_2"}


def experts(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, attr) for name, attr in _ATTR.items()}


def boundary_timestep(pipe) -> float:
    return float(pipe.config.boundary_ratio) * float(pipe.scheduler.config.num_train_timesteps)


def expert_for_timestep(t: float, boundary: float) -> str:
    # Same comparison as diffusers' WanImageToVideoPipeline: t >= boundary runs `transformer`.
    return "high_noise" if t >= boundary else "low_noise"


def install_timestep_hooks(pipe, on_step: Callable[[str, float], None]) -> list:
    """Call ``on_step(expert_name, timestep)`` before every forward of either expert.

    This is the one place the denoising timestep is read from the model's inputs; everything that
    depends on it (calibration bins, the clip tables of the activation quantizers) subscribes here.
    Returns the hook handles (call ``.remove()`` on each to detach).
    """
    handles = []
    for name, module in experts(pipe).items():
        def pre_hook(mod, args, kwargs, _name=name):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is None:
                raise RuntimeError(f"expert {_name} was called without a timestep")
            on_step(_name, float(torch.as_tensor(t).flatten()[0]))
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return handles


def install_scope_hooks(pipe, scope) -> list:
    """Run every forward of either expert inside the context manager ``scope`` (entered before,
    exited after, also when the forward raises). Returns the hook handles (``.remove()`` each)."""
    def enter(mod, args) -> None:  # a pre-hook's return value would replace the inputs
        scope.__enter__()

    def leave(mod, args, out) -> None:
        scope.__exit__(None, None, None)
    handles = []
    for module in experts(pipe).values():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles
