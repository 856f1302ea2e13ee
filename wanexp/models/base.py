"""What every pipeline builder shares (the checkpoint loader, the tiny builder, the random full-size
builder, LoRA merging): the libraries' chatter silenced, and the pipeline placed on a device."""

from __future__ import annotations

import torch

from wanexp.errors import WanexpError


def quiet_libraries() -> None:
    """Our own progress bars and summary are the output; silence the libraries' loading chatter."""
    import diffusers
    import transformers
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def place_pipeline(pipe, offload: str, device: torch.device, vae_tiling: bool = False) -> None:
    """Put the pipeline on ``device``. ``offload``: ``none`` (everything on the device) | ``model``
    (diffusers' per-component CPU offload: only the running component is on the GPU — the text
    encoder while it encodes, then the active expert, swapped once per video at the boundary, then
    the VAE). ``vae_tiling`` decodes the video in spatial tiles (bounded decoder activations)."""
    if offload not in ("none", "model"):
        raise WanexpError(f"model.offload={offload!r} is not one of none, model")
    if offload == "none" or device.type == "cpu":
        pipe.to(device)
    else:
        pipe.enable_model_cpu_offload(device=device)
    if vae_tiling:
        pipe.vae.enable_tiling()
