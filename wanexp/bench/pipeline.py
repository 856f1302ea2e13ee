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

from wanexp import kernels
from wanexp.bench.synthetic import SyntheticTSClip, attention_scope
from wanexp.generate import decode_latents
from wanexp.models import experts, install_timestep_hooks, pipeline_bytes
from wanexp.models.compiled import compile_denoisers
from wanexp.models.a14b_random import build_random_pipeline
from wanexp.models.loading import place_pipeline
from wanexp.quant.api import fallback_counts, quantize_
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.targets import select_targets

GB = 1e9


def build_a14b_pipeline(init_device: torch.device, arch: str = "a14b"):
    """The A14B pipeline with random weights, every component left on the CPU (each initialised on
    ``init_device``, fast on a GPU, then moved). ``arch='tiny'`` builds the tiny model's sizes."""
    return build_random_pipeline(init_device, "cpu", arch=arch)


def quantize_experts(pipe, device: torch.device, rank: int = 32, home: torch.device | str = "cpu",
                     contexts: dict[str, TimestepContext] | None = None) -> int:
    """Swap both experts' block linears for packed W4A4 MXFP4 (on the GPU, then to ``home``).
    ``contexts`` collects each expert's TimestepContext (its bins span [0, 1000])."""
    builder = SyntheticTSClip(rank=rank)
    swapped = 0
    for name, model in experts(pipe).items():
        model.to(device)
        ctx = TimestepContext(bins=TimestepBins.equal_width(0.0, 1000.0, len(builder.clip_table)))
        if contexts is not None:
            contexts[name] = ctx
        with torch.no_grad():
            swapped += len(quantize_(model, builder, select_targets(model), context=ctx))
        model.to(home)
        _free()
    return swapped


def bench_latents(pipe, gen: dict, steps: int, guidance_scale: float, on_step_end=None) -> torch.Tensor:
    """The benches' one video: a grey first frame and a fixed prompt, seed 0, ``steps`` steps with
    CFG, latents out (``on_step_end``: diffusers' step-end callback)."""
    return pipe(image=Image.new("RGB", (gen["width"], gen["height"]), (128, 128, 128)),
                prompt="a cat jumps onto a wooden table next to a glass of water", negative_prompt="",
                height=gen["height"], width=gen["width"], num_frames=gen["frames"], num_inference_steps=steps,
                guidance_scale=guidance_scale, output_type="latent", generator=torch.Generator().manual_seed(0),
                callback_on_step_end=on_step_end).frames


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
        latents = bench_latents(pipe, gen, gen["steps"], 3.5)
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


@torch.no_grad()
def timed_video(pipe, gen: dict, steps: int, device: torch.device, decode: bool = True) -> dict[str, Any]:
    """One video of ``steps`` denoising steps (CFG, both experts), timed: seconds in all and the
    seconds of each step (synchronised at every step end), the rest being text and image encoding
    and the VAE decode."""
    marks: list[float] = []

    def on_step_end(p, i, t, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return kwargs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    latents = bench_latents(pipe, gen, steps, gen["guidance_scale"], on_step_end)
    if decode:
        decode_latents(pipe, latents.to(pipe._execution_device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return {"steps": steps, "seconds": total, "step_marks": [m - start for m in marks], "step_seconds": step_s,
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None}


def video_fit(v: dict[str, Any]) -> dict[str, float]:
    """seconds = overhead + steps · step_s, from one timed video: step_s the median of its step
    intervals (from the second step on, so the first step's own start-up is in the overhead)."""
    s = sorted(v["step_seconds"])
    step_s = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return {"step_s": step_s, "overhead_s": v["seconds"] - v["steps"] * step_s}


def run_whole_video(cfg: dict, device: torch.device, log: Callable[[str], None] = print,
                    save: Callable[[dict], None] = lambda r: None) -> dict[str, Any]:
    """Issue 17's whole video: the A14B pipeline at full size (both experts, UMT5-XXL, Wan VAE), every
    denoiser block compiled, BF16 and then W4A4 (MXFP4 on the FP8 tensor-core path), one video each
    at ``fit_steps`` with CFG and VAE decode after a warm-up video (compilation). Projected to
    ``paper_steps`` by ``video_fit``; the projection is checked against a measured video of
    ``check_steps`` (for the precisions in ``check``)."""
    gen = {"height": int(cfg.get("height", 720)), "width": int(cfg.get("width", 1280)),
           "frames": int(cfg.get("frames", 61)), "guidance_scale": float(cfg.get("guidance_scale", 3.5))}
    policy = str(cfg.get("policy", "none"))
    warmup_steps, fit_steps = int(cfg.get("warmup_steps", 2)), int(cfg.get("fit_steps", 3))
    check_steps, paper_steps = int(cfg.get("check_steps", 6)), int(cfg.get("paper_steps", 40))
    check = list(cfg.get("check", ["bf16"]))
    result: dict[str, Any] = {"video": f"{gen['height']}x{gen['width']}x{gen['frames']}", "policy": policy,
                              "guidance_scale": gen["guidance_scale"], "paper_steps": paper_steps,
                              "compile": bool(cfg.get("compile", True)), "runs": {}}
    t0 = time.perf_counter()
    pipe = build_a14b_pipeline(device, str(cfg.get("arch", "a14b")))
    result["build_s"] = time.perf_counter() - t0
    contexts: dict[str, TimestepContext] = {}
    for precision in list(cfg.get("precisions", ["bf16", "w4a4"])):
        base = precision.partition("+attn_")[0]   # e.g. "w4a4+attn_fp8_cudnn": quantized attention too (attention_scope)
        hooks = []
        if base == "w4a4":
            if "quantized_linears" not in result:  # the experts stay quantized for any later W4A4 precision
                home = device if policy == "none" else "cpu"  # everything stays on the GPU between the two
                result["quantized_linears"] = quantize_experts(pipe, device, int(cfg.get("rank", 32)), home=home,
                                                               contexts=contexts)
            hooks = install_timestep_hooks(pipe, lambda e, t: contexts[e].set_timestep(t))
        place_pipeline(pipe, policy, device, vae_tiling=policy != "none")
        run: dict[str, Any] = result["runs"].setdefault(precision, {"pipeline_bytes": pipeline_bytes(pipe)})
        backend = kernels.gemm_backend(str(cfg.get("w4a4_backend", "fp8")) if base == "w4a4" else "auto")
        with backend, kernels.fused(True), attention_scope(precision):
            if result["compile"]:
                torch._dynamo.reset()
                compile_denoisers(pipe)
            t1 = time.perf_counter()
            timed_video(pipe, gen, warmup_steps, device, decode=True)
            run["warmup_s"] = time.perf_counter() - t1
            log(f"video {precision}: warm-up ({warmup_steps} steps, compile) {run['warmup_s']:.1f} s")
            for steps in [fit_steps] + ([check_steps] if precision in check else []):
                before = fallback_counts(*experts(pipe).values())
                v = timed_video(pipe, gen, steps, device)
                after = fallback_counts(*experts(pipe).values())
                v["fp8_fallbacks"] = {k: after[k] - before[k] for k in after}  # rows the FP8 fold could not hold
                run[f"steps_{steps}"] = v
                log(f"video {precision}: {steps} steps {v['seconds']:.1f} s (steps "
                    + ", ".join(f"{x:.2f}" for x in v["step_seconds"]) + f" s; FP8 fallbacks {v['fp8_fallbacks']})")
                save(result)
        fit = video_fit(run[f"steps_{fit_steps}"])
        run.update(fit, projected_s=fit["overhead_s"] + paper_steps * fit["step_s"])
        if f"steps_{check_steps}" in run:
            predicted = fit["overhead_s"] + check_steps * fit["step_s"]
            measured = run[f"steps_{check_steps}"]["seconds"]
            run["check"] = {"steps": check_steps, "predicted_s": predicted, "measured_s": measured,
                            "error": predicted / measured - 1}
        log(f"video {precision}: {paper_steps} steps projected {run['projected_s']:.1f} s "
            f"(overhead {fit['overhead_s']:.1f} s + {fit['step_s']:.2f} s/step)")
        for h in hooks:
            h.remove()
        for model in experts(pipe).values():
            for block in model.blocks:
                block._compiled_call_impl = None
        if policy != "none":
            _unplace(pipe)
        _free()
        save(result)
    _unplace(pipe)
    runs = result["runs"]
    if "bf16" in runs and "w4a4" in runs:
        result["w4a4_vs_bf16"] = runs["w4a4"]["projected_s"] / runs["bf16"]["projected_s"]
    result["paper_h100_s"] = {"bf16": 520.7, "w4a4": 955.1}
    del pipe
    _free()
    return result


def video_markdown(res: dict[str, Any]) -> list[str]:
    lines = [f"## One whole {res['video']} video, {res['paper_steps']} steps with CFG {res['guidance_scale']}, "
             f"VAE decode (offload={res['policy']}, blocks compiled: {res['compile']})", "",
             "| precision | s/step (both CFG passes) | overhead s | projected s | check: steps, predicted s, measured s | paper (H100) s |",
             "|---|---|---|---|---|---|"]
    for precision, r in res["runs"].items():
        if "projected_s" not in r:
            continue
        c = r.get("check")
        check = f"{c['steps']}, {c['predicted_s']:.1f}, {c['measured_s']:.1f} ({c['error']:+.1%})" if c else "not run"
        lines.append(f"| {precision} | {r['step_s']:.2f} | {r['overhead_s']:.1f} | {r['projected_s']:.1f} | {check} | "
                     f"{res['paper_h100_s'].get(precision, float('nan'))} |")
    if "w4a4_vs_bf16" in res:
        lines += ["", f"W4A4 ÷ BF16: {res['w4a4_vs_bf16']:.3f}×; the target is under half the paper's W4A4 "
                  f"({res['paper_h100_s']['w4a4'] / 2:.1f} s)."]
    return lines


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
