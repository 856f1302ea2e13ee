"""Where the weights live while calibration runs (``model.calib.offload``).

``pipeline`` (the default): as ``model.offload`` placed the pipeline. Under ``offload=model`` the
whole active expert (28.6 GB of bf16 at A14B size) sits on the GPU beside that expert's Hessians.

``group``: for the calibrate stage only, diffusers' own block-level group offloading
(:func:`diffusers.hooks.apply_group_offloading`): each expert's blocks live on the CPU and are
brought to the GPU one block at a time, the next one prefetched on a side CUDA stream while the
current one runs; the text encoder is onloaded whole for its forward and offloaded after it, the
VAE (0.5 GB) stays on the GPU. The GPU then holds the Hessians, the activations and a couple of
blocks (0.7 GB each) instead of a whole expert. ``low_cpu_mem_usage`` pins each block as it is
onloaded instead of keeping a pinned copy of every weight: PyTorch's pinned-memory allocator rounds
each allocation up to a power of two (~1.46x a Wan block), which for both experts would be ~82 GB
of pinned host memory. Afterwards the pipeline is placed again as ``model.offload`` says, so the
later stages (quantize, generate) see it as before. Calibration's forward pre-hooks on the linears
run inside the block's forward, after the group hook has onloaded the block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from wanexp.errors import WanexpError
from wanexp.models.experts import experts

CALIB_OFFLOADS = ("pipeline", "group")
# the hooks diffusers' group offloading registers (diffusers.hooks.group_offloading)
_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def calib_offload_of(cfg) -> str:
    """``model.calib.offload`` (``pipeline`` when unset)."""
    mode = str((cfg.model.get("calib") or {}).get("offload") or "pipeline")
    if mode not in CALIB_OFFLOADS:
        raise WanexpError(f"model.calib.offload={mode!r} is not one of {', '.join(CALIB_OFFLOADS)}")
    return mode


def group_offloaded(module: torch.nn.Module) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled
    return _is_group_offload_enabled(module)


@contextmanager
def calibration_placement(pipe, mode: str, device: torch.device, offload: str):
    """Inside the block the pipeline is placed for calibration as ``mode`` says (module docstring);
    on leaving, placed again as ``offload`` (``model.offload``) says."""
    if mode == "pipeline":
        yield pipe
        return
    _group_offload(pipe, torch.device(device))
    try:
        yield pipe
    finally:
        _undo_group_offload(pipe)
        from wanexp.models.base import place_pipeline
        place_pipeline(pipe, offload, torch.device(device))


def _group_offload(pipe, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading
    pipe.remove_all_hooks()  # accelerate's model-offload hooks (offload=model); group offloading refuses them
    cuda = device.type == "cuda"
    for expert in experts(pipe).values():
        # onto the device first, so the host never holds an expert's weights twice while they are copied
        # out to the CPU by the offloading (the GPU holds one expert for a moment, before any Hessian exists)
        expert.to(device)
        apply_group_offloading(expert, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=cuda,
                               low_cpu_mem_usage=cuda)
        if cuda:
            torch.cuda.empty_cache()
    if pipe.text_encoder is not None:  # not a diffusers model: one group, onloaded for its forward
        pipe.text_encoder.to("cpu")
        apply_group_offloading(pipe.text_encoder, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
    pipe.vae.to(device)


def _undo_group_offload(pipe) -> None:
    from diffusers.hooks import HookRegistry
    for module in [*experts(pipe).values(), pipe.text_encoder]:
        if module is None:
            continue
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in _GROUP_HOOKS:
            registry.remove_hook(name, recurse=True)
        module.to("cpu")  # a block prefetched but never run may still be on the device
