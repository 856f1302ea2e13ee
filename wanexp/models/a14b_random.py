"""``model=a14b_random``: the whole Wan2.2-I2V-A14B pipeline at full size, seeded random weights.

No checkpoint exists on disk: both experts (40 blocks, dim 5120, ffn 13824), the UMT5-XXL text
encoder and the Wan VAE are built from diffusers'/transformers' own classes on the meta device and
materialised one component at a time, directly on the device that initialises them fastest (the
GPU when there is one), with seeded normal weights (norm gains 1); under ``offload=model`` each is
moved to the CPU before the next is made, so the GPU never holds more than one. The tokenizer is
the tiny model's (built offline; its ids are valid UMT5 ids), the scheduler and boundary are the
A14B's (UniPC on flow-matching sigmas shifted by 5.0, experts switching at 0.9 of the training
timesteps). Cost does not depend on the values, which is what this model is for: the real code
path (every runner stage) at the real size, on a GPU, without a checkpoint.

``model.num_layers`` cuts both experts to N blocks of full width; ``model.text_encoder_layers``
cuts UMT5-XXL likewise (CPU tests).
"""

from __future__ import annotations

import gc
from typing import Any, Mapping

import torch
from torch import nn

A14B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                        rope_max_seq_len=1024)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
A14B_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                      flow_shift=5.0)
A14B_BOUNDARY_RATIO = 0.9


def random_init(module: nn.Module, device: torch.device, seed: int, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Materialise a meta-built module on ``device`` with seeded random weights (N(0, 0.02); norm
    gains 1) and, for a Wan transformer, its RoPE tables (non-persistent buffers that to_empty()
    leaves empty)."""
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim < 2 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    if hasattr(module, "rope"):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
        c = module.config
        module.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len).to(device)
    return module.eval()


def build_expert(device: torch.device, num_layers: int = 40, seed: int = 0, spec: Mapping | None = None) -> nn.Module:
    """One Wan2.2-I2V-A14B expert (``WanTransformer3DModel``) with random bf16 weights on ``device``."""
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        model = WanTransformer3DModel(**dict(spec or A14B_TRANSFORMER, num_layers=int(num_layers)))
    return random_init(model, device, seed)


def build_text_encoder(device: torch.device, num_layers: int = 24, seed: int = 2, spec: Mapping | None = None):
    from transformers import UMT5Config, UMT5EncoderModel
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**dict(spec or UMT5_XXL, num_layers=int(num_layers))))
    return random_init(model, device, seed)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_random_pipeline(init_device: torch.device, home: torch.device | str = "cpu", *, num_layers: int = 40,
                          text_encoder_layers: int = 24, seed: int = 0, arch: str = "a14b"):
    """The A14B pipeline with random weights. Each component is initialised on ``init_device`` and
    then moved to ``home`` before the next is built (``home=cpu``: the GPU holds one component at a
    time while building). ``arch='tiny'`` builds the tiny model's sizes instead (a CPU dry run)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline

    from wanexp.models.tiny import TINY_SPEC, _build_tokenizer

    big = arch == "a14b"
    experts = []
    for k in (0, 1):  # transformer (high noise), transformer_2 (low noise)
        spec = A14B_TRANSFORMER if big else TINY_SPEC["transformer"]
        experts.append(build_expert(init_device, num_layers if big else spec["num_layers"], seed + k, spec).to(home))
        free_memory()
    text_spec = UMT5_XXL if big else TINY_SPEC["text_encoder"]
    text_encoder = build_text_encoder(init_device, text_encoder_layers if big else text_spec["num_layers"],
                                      seed + 2, text_spec).to(home)
    free_memory()
    torch.manual_seed(seed + 3)  # the VAE keeps diffusers' own initialisation, seeded
    vae = AutoencoderKLWan(**({} if big else TINY_SPEC["vae"])).to(torch.float32).eval().to(home)
    scheduler = UniPCMultistepScheduler(**A14B_SCHEDULER)
    pipe = WanImageToVideoPipeline(tokenizer=_build_tokenizer(), text_encoder=text_encoder, vae=vae,
                                   scheduler=scheduler, transformer=experts[0], transformer_2=experts[1],
                                   image_encoder=None, image_processor=None, boundary_ratio=A14B_BOUNDARY_RATIO)
    pipe.set_progress_bar_config(disable=True)
    free_memory()
    return pipe


def load_random_pipeline(cfg: Mapping[str, Any], device: torch.device):
    """``model=a14b_random``: built in memory, then placed as ``cfg.offload`` says."""
    from wanexp.models.base import place_pipeline
    offload = str(cfg.get("offload", "model"))
    init = device if device.type == "cuda" else torch.device("cpu")
    home = device if offload == "none" else torch.device("cpu")
    pipe = build_random_pipeline(init, home, num_layers=int(cfg.get("num_layers", 40)),
                                 text_encoder_layers=int(cfg.get("text_encoder_layers", 24)), seed=int(cfg.get("seed", 0)))
    place_pipeline(pipe, offload, device, bool(cfg.get("vae_tiling", False)))
    return pipe
