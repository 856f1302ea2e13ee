"""Whole-pipeline peak GPU memory under each ``model.offload`` policy, BF16 vs W4A4.

The full Wan2.2-I2V-A14B pipeline is built at its real size with random weights (both experts, the
UMT5-XXL text encoder, the Wan VAE; the tokenizer is the tiny model's, whose ids are valid UMT5
ids), then one video is generated per (precision, policy) — text encoding, both experts (a short
schedule that crosses the expert boundary, with CFG), VAE decode — and the peak memory allocated on
the GPU over the whole video is recorded. Peak memory does not depend on the number of steps, so
two steps stand for forty. W4A4 swaps the 800 block linears of both experts for packed MXFP4
QuantLinears (the bench's synthetic TS-clip layers); the BF16 originals are freed.

Policies (``wanexp.models.loading.place_pipeline``): ``none`` keeps everything on the GPU;
``model`` keeps only the running component there (text encoder, then the active expert — swapped
once, at the boundary — then the VAE) and decodes the VAE in tiles.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch
from PIL import Image

from wanexp.bench.synthetic import SyntheticTSClip
from wanexp.generate import decode_latents
from wanexp.models import experts, pipeline_bytes
from wanexp.models.a14b_random import build_random_pipeline
from wanexp.models.loading import place_pipeline
from wanexp.quant.api import quantize_
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.targets import select_targets

GB = 1e9


def build_a14b_pipeline(init_device: torch.device, arch: str = "a14b"):
    """The A14B pipeline with random weights, every component left on the CPU (each initialised on
    ``init_device``, fast on a GPU, then moved). ``arch='tiny'`` builds the tiny model's sizes."""
    return build_random_pipeline(init_device, "cpu", arch=arch)


def quantize_experts(pipe, device: torch.device, rank: int = 32) -> int:
    """Swap both experts' block linears for packed W4A4 MXFP4 (on the GPU, then back to the CPU)."""
    builder = SyntheticTSClip(rank=rank)
    swapped = 0
    for model in experts(pipe).values():
        model.to(device)
        ctx = TimestepContext(bins=TimestepBins.equal_width(0.0, 1000.0, len(builder.clip_table)))
        with torch.no_grad():
            swapped += len(quantize_(model, builder, select_targets(model), context=ctx))
        model.to("cpu")
        _free()
    return swapped


@torch.no_grad()
def one_video(pipe, policy: str, device: torch.device, gen: dict) -> dict[str, Any]:
    """Generate and decode one video under ``policy``; peak GPU memory over all of it."""
    place_pipeline(pipe, policy, device, vae_tiling=policy != "none")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        latents = pipe(image=Image.new("RGB", (gen["width"], gen["height"]), (128, 128, 128)),
                       prompt="a cat jumps onto a wooden table next to a glass of water", negative_prompt="",
                       height=gen["height"], width=gen["width"], num_frames=gen["frames"],
                       num_inference_steps=gen["steps"], guidance_scale=3.5, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).frames
        video = decode_latents(pipe, latents.to(pipe._execution_device))
        out = {"seconds": time.perf_counter() - start, "frames": int(video.shape[0])}
    except torch.OutOfMemoryError as err:
        out = {"oom": str(err).splitlines()[0][:200]}
    if cuda:
        torch.cuda.synchronize()
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    _unplace(pipe)
    return out


def _unplace(pipe) -> None:
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    pipe.to("cpu")
    pipe.vae.disable_tiling()
    _free()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pipeline_memory(cfg: dict, device: torch.device, log: Callable[[str], None] = print,
                        save: Callable[[dict], None] = lambda r: None) -> dict[str, Any]:
    """BF16 then W4A4, each under every policy in ``cfg['policies']``; ratios to BF16 with ``none``
    (everything on the GPU, the paper's BF16 setting) and to BF16 under the same policy."""
    gen = {"height": int(cfg.get("height", 720)), "width": int(cfg.get("width", 1280)),
           "frames": int(cfg.get("frames", 61)), "steps": int(cfg.get("steps", 2))}
    policies = list(cfg.get("policies", ["model", "none"]))
    result: dict[str, Any] = {"video": f"{gen['height']}x{gen['width']}x{gen['frames']}", "steps": gen["steps"],
                              "policies": policies, "runs": {}}
    t0 = time.perf_counter()
    pipe = build_a14b_pipeline(device, str(cfg.get("arch", "a14b")))
    result["build_s"] = time.perf_counter() - t0
    for precision in ("bf16", "w4a4"):
        if precision == "w4a4":
            result["quantized_linears"] = quantize_experts(pipe, device, int(cfg.get("rank", 32)))
        held = pipeline_bytes(pipe)
        for policy in policies:
            r = one_video(pipe, policy, device, gen)
            r["pipeline_bytes"] = held
            result["runs"][f"{precision}/{policy}"] = r
            peak = r.get("peak_bytes")
            log(f"pipeline {precision:>4} offload={policy:<5}: held {held / GB:.2f} GB, "
                + (f"peak {peak / GB:.2f} GB" if peak else "peak n/a") + (f" (OOM: {r['oom']})" if "oom" in r else "")
                + (f", {r['seconds']:.1f} s" if "seconds" in r else ""))
            save(result)
    runs = result["runs"]
    base_none = runs.get("bf16/none", {}).get("peak_bytes") if "oom" not in runs.get("bf16/none", {}) else None
    for key, r in runs.items():
        same = runs.get(f"bf16/{key.split('/')[1]}", {})
        if r.get("peak_bytes") and "oom" not in r:
            if base_none:
                r["peak_vs_bf16_none"] = r["peak_bytes"] / base_none
            if same.get("peak_bytes") and "oom" not in same:
                r["peak_vs_bf16_same_policy"] = r["peak_bytes"] / same["peak_bytes"]
    del pipe
    _free()
    return result


def to_markdown(res: dict[str, Any]) -> list[str]:
    lines = [f"## Whole pipeline, one {res['video']} video ({res['steps']} steps with CFG across the expert "
             "boundary, text encoder, VAE decode): peak GPU memory", "",
             "| precision | offload | weights held (GB) | peak (GB) | × BF16 none | × BF16 same policy | s/video |",
             "|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        precision, policy = key.split("/")
        peak = f"{r['peak_bytes'] / GB:.2f}" if r.get("peak_bytes") else "n/a"
        peak = f"OOM (> {peak})" if "oom" in r else peak
        lines.append(f"| {precision} | {policy} | {r['pipeline_bytes'] / GB:.2f} | {peak} | "
                     f"{r.get('peak_vs_bf16_none', float('nan')):.3f} | {r.get('peak_vs_bf16_same_policy', float('nan')):.3f} | "
                     f"{r.get('seconds', float('nan')):.1f} |")
    return lines
