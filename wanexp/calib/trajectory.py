"""Calibration trajectories run expert by expert: every sample's high-noise steps, then every
sample's low-noise steps, from the state the first pass left at the expert boundary.

Only one expert is active per denoising step and the switch happens once per trajectory, so a
calibration pass needs the statistics (the Hessians above all: tens of GB per expert at A14B size)
of one expert at a time. :class:`ExpertSplit` runs the diffusers pipeline unchanged:

- the high-noise pass stops the loop after the last high-noise step (the pipeline's own
  ``interrupt``) and keeps the latents and the scheduler's state there, per sample, on disk;
- the low-noise pass runs the pipeline again; the high-noise steps call a stand-in that returns
  zeros instead of the expert (no weights moved, no FLOPs), and after the last of them the kept
  latents and scheduler state are put back, so the low-noise steps see exactly the latents of an
  uninterrupted trajectory (tested bit for bit on the CPU).

The repeated prompt encoding and image-condition encoding cost a few seconds a sample at 720p.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from wanexp.io import atomic_path
from wanexp.models.experts import boundary_timestep, experts
from wanexp.quant.context import TimestepBins, TimestepContext, expert_bins, schedule_bins


def schedule(pipe, num_inference_steps: int) -> list[float]:
    """The timesteps the pipeline's scheduler visits in ``num_inference_steps`` steps (on a copy)."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(int(num_inference_steps), device="cpu")
    return [float(t) for t in sched.timesteps]


def expert_steps(pipe, num_inference_steps: int, device=None) -> dict[str, list[float]]:
    """The denoising timesteps each expert runs (the pipeline's own schedule and comparison)."""
    boundary = boundary_timestep(pipe)
    ts = schedule(pipe, num_inference_steps)
    return {"high_noise": [t for t in ts if t >= boundary], "low_noise": [t for t in ts if t < boundary]}


def timestep_contexts(pipe, num_bins: int, edges=None, policy: str = "per_expert",
                      num_inference_steps: int | None = None) -> dict[str, TimestepContext]:
    """Each expert's TimestepContext with the bins of the method: per expert inside its own timestep
    range, or (``policy="shared"``) one set over the whole trajectory for both. Explicit ``edges``
    (a list for the shared policy, ``{expert: [...]}`` otherwise) are taken as given; else the bins
    follow the schedule of ``num_inference_steps`` steps (:func:`wanexp.quant.context.schedule_bins`:
    equal width unless a bin would hold no step)."""
    total = float(pipe.scheduler.config.num_train_timesteps)
    steps = expert_steps(pipe, num_inference_steps) if num_inference_steps else {}
    if policy == "shared":
        bins = (TimestepBins(tuple(sorted(float(e) for e in edges))) if edges else
                schedule_bins([t for ts in steps.values() for t in ts], 0.0, total, int(num_bins)))
        return {name: TimestepContext(bins=bins) for name in ("high_noise", "low_noise")}
    bins = expert_bins(boundary_timestep(pipe), total, int(num_bins), edges, steps)
    return {name: TimestepContext(bins=b) for name, b in bins.items()}


class ExpertSplit:
    """Runs one calibration sample's steps of one expert (see the module docstring)."""

    def __init__(self, pipe, boundary_dir: Path, call: Callable[..., None]):
        """``call(pipe, sample, callback)`` runs the pipeline on one sample (latents out) with
        ``callback_on_step_end=callback``; ``boundary_dir`` keeps the per-sample boundary states."""
        self.pipe, self.dir, self.call = pipe, Path(boundary_dir), call

    def state_path(self, sample_id: str) -> Path:
        return self.dir / f"{sample_id}.pt"

    def run(self, expert: str, sample, on_step: Callable[[], None] | None = None, steps: int | None = None) -> None:
        split = expert_steps(self.pipe, steps)
        n_high = len(split["high_noise"])
        if expert == "high_noise":
            if n_high:
                self._high(sample, n_high, on_step)
        elif split["low_noise"]:
            if n_high and not self.state_path(sample.id).is_file():
                self._high(sample, n_high, None)  # the kept state is gone (a moved cache): make it again
            self._low(sample, n_high, on_step)

    def _high(self, sample, n_high: int, on_step) -> None:
        path = self.state_path(sample.id)

        def callback(pipe, i, t, tensors):
            if on_step:
                on_step()
            if i == n_high - 1:  # the last high-noise step is done: keep the state, stop the loop
                if not path.is_file():
                    state = {"latents": tensors["latents"].detach().cpu(),
                             "scheduler": _to_cpu(_scheduler_state(pipe.scheduler))}
                    with atomic_path(path) as tmp:
                        torch.save(state, tmp)
                pipe._interrupt = True
            return tensors

        self.call(self.pipe, sample, callback)

    def _low(self, sample, n_high: int, on_step) -> None:
        state = torch.load(self.state_path(sample.id), weights_only=False) if n_high else None
        high = experts(self.pipe)["high_noise"]

        def callback(pipe, i, t, tensors):
            if i == n_high - 1:  # hand over to the low-noise expert from the kept state
                device = tensors["latents"].device
                pipe.scheduler.__dict__.update(_to_device(copy.deepcopy(state["scheduler"]), device))
                return {**tensors, "latents": state["latents"].to(device)}
            if i >= n_high and on_step:
                on_step()
            return tensors

        with _skipped(high) if n_high else _nothing():
            self.call(self.pipe, sample, callback)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _skipped:
    """The expert's forward replaced by zeros of the right shape (its weights are not touched).

    Under ``offload=model`` the skipped expert's accelerate hook would have moved the component
    before it (the text encoder, 11.4 GB at A14B size) off the GPU; the stand-in does that part of
    its job, or the text encoder stays on the GPU through every low-noise step."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        out_channels = int(self.module.config.out_channels)
        self.saved = self.module.__dict__.get("forward")  # accelerate's offload wrapper, if any
        previous = getattr(getattr(self.module, "_hf_hook", None), "prev_module_hook", None)

        def zeros(hidden_states, *args, return_dict=True, **kwargs):
            if previous is not None:
                previous.offload()  # accelerate's UserCpuOffloadHook: the component to the CPU (no-op there)
            out = torch.zeros_like(hidden_states[:, :out_channels])
            return (out,) if not return_dict else type("Out", (), {"sample": out})()

        self.module.forward = zeros
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved
        return False


def _scheduler_state(scheduler) -> dict:
    """What a multistep scheduler carries between steps (its history, step index, sigmas…): every
    attribute but its config."""
    return copy.deepcopy({k: v for k, v in scheduler.__dict__.items() if k != "_internal_dict"})


def _to_cpu(obj):
    return _map(obj, lambda t: t.detach().cpu())


def _to_device(obj, device):
    return _map(obj, lambda t: t.to(device))


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) is dict:
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map(v, fn) for v in obj)
    return obj
