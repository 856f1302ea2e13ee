"""The GPU-efficiency benchmark: one Wan2.2-I2V-A14B expert at full size, random weights.

In one process: build the real diffusers ``WanTransformer3DModel`` with the A14B configuration
(40 blocks, dim 5120, ffn 13824; random bf16 weights, no checkpoint), time one denoiser forward
(no CFG) per resolution in BF16, then quantize the 400 block linears in place to W4A4 MXFP4 (real
storage: packed codes + E8M0 scales, rank-r low-rank factors and smoothing in 16/32 bits, a
per-bin clip table; the bf16 originals are freed) and time the same forwards through the torch
reference path and the fused Triton path. Reports seconds per forward, peak GPU memory, bytes of
weights held, and every ratio to the BF16 numbers of the same run; optionally a torch.profiler
breakdown (attention / fused GEMM / activation quantizer / cuBLAS GEMMs / other).

The quantizer is synthetic (:class:`SyntheticTSClip`): the tensors a calibrated TS-clip layer
holds (smoothing vector, low-rank factors, RTN residual, clip table), built from the random
weights without calibration. Speed and memory do not depend on their values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import time
from pathlib import Path
from typing import Any, Mapping, Callable, Iterator

import torch
from torch import nn

from wanexp import kernels
from wanexp.bench.pipeline import run_pipeline_memory, run_whole_video, video_markdown
from wanexp.bench.pipeline import to_markdown as pipeline_md
from wanexp.bench.synthetic import SyntheticTSClip, attention_scope, make_inputs  # noqa: F401 (re-exported)
from wanexp.models import held_bytes
from wanexp.models.a14b_random import A14B_TRANSFORMER, build_expert
from wanexp.quant.api import fallback_counts, quantize_
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.targets import select_targets

GB = 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_forward(model: nn.Module, inputs: dict, warmup: int, repeats: int) -> dict[str, Any]:
    """Seconds per forward (mean of ``repeats`` after ``warmup``), the peak memory allocated during
    them (model included; 0 off the GPU), and the last output."""
    device = inputs["hidden_states"].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = None
    for _ in range(warmup):
        out = model(**inputs, return_dict=False)[0]
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(**inputs, return_dict=False)[0]
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times) / len(times), "all_seconds": times,
            "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0, "out": out}


_CATEGORIES: list[tuple[str, Callable[[str], bool]]] = [
    ("attention (flash/SDPA)", lambda n: any(s in n.lower() for s in ("flash", "fmha", "attention", "sdpa", "cudnn"))),
    ("fused W4A4 GEMM (Triton)", lambda n: "_mxfp4_gemm_kernel" in n),
    ("activation quantizer (Triton)", lambda n: any(s in n for s in ("_act_quant_kernel", "_row_absmax_kernel",
                                                                      "_act_fp8_kernel"))),
    ("FP8 fold of the weight (Triton)", lambda n: "_fold_weight_kernel" in n),
    ("cuBLAS GEMMs (bf16 linears, low-rank)", lambda n: any(s in n.lower() for s in ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul"))),
]


@torch.no_grad()
def profile_forward(model: nn.Module, inputs: dict) -> dict[str, Any]:
    """Device time of one forward by kernel category (torch.profiler), plus the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for evt in prof.key_averages():
        dt = getattr(evt, "self_device_time_total", None)
        if dt is None:
            dt = getattr(evt, "self_cuda_time_total", 0.0)
        if dt and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            per_kernel[evt.key] = per_kernel.get(evt.key, 0.0) + dt / 1e6
    if not per_kernel:  # older profilers: keep every event with device time
        for evt in prof.key_averages():
            dt = getattr(evt, "self_device_time_total", 0.0) or 0.0
            if dt:
                per_kernel[evt.key] = dt / 1e6
    cats: dict[str, float] = {c: 0.0 for c, _ in _CATEGORIES}
    cats["other (norms, RoPE, elementwise, copies)"] = 0.0
    for name, sec in per_kernel.items():
        for cat, match in _CATEGORIES:
            if match(name):
                cats[cat] += sec
                break
        else:
            cats["other (norms, RoPE, elementwise, copies)"] += sec
    total = sum(cats.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"device_seconds": total, "categories": cats,
            "top_kernels": [{"name": n[:120], "seconds": s} for n, s in top]}


# The W4A4 paths the bench can time, each eager or with every block compiled ("_compiled")
W4A4_PATHS = ("reference", "fused", "fused_triton", "fused_cublas", "fused_fp8", "fused_compiled",
              "fused_triton_compiled", "fused_cublas_compiled", "fused_fp8_compiled", "fused_fp8_unchecked",
              "fused_fp8_unchecked_compiled", "fused_fp8_triton", "fused_fp8_triton_compiled",
              "fused_fp8_rowwise", "fused_fp8_rowwise_compiled", "fused_fp8_layer_checked_compiled")
# the GEMM backend (wanexp.kernels.gemm_backend) of each fused path that pins one; the others take "auto"
PATH_BACKENDS = {"fused_triton": "triton", "fused_cublas": "cublas", "fused_fp8": "fp8",
                 "fused_fp8_unchecked": "fp8_unchecked", "fused_fp8_triton": "fp8_triton",
                 "fused_fp8_rowwise": "fp8_rowwise", "fused_fp8_layer_checked": "fp8"}
# ... and with quantized attention (wanexp.quant.attention: its Triton kernels, cuDNN's FP8 SDPA):
# "<path>+attn_<name>[_compiled]"
ATTENTION_PATHS = tuple(f"fused_fp8+attn_{a}{c}" for c in ("", "_compiled") for a in ("fp8", "int8_sage", "fp8_cudnn"))
W4A4_PATHS += ATTENTION_PATHS


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, block_checks: bool = True) -> Iterator[None]:
    """Every transformer block ``torch.compile``d (as a diffusers user would), for the block;
    compiled afresh for each path (dynamo's caches reset), eager again after. The kernel caches are
    filled first (``kernels.prepare``), as ``model.compile`` does: filled inside the graph they were
    guards that failed layer by layer (the H200 saw the compiled FP8 path at 14.4 s for it). As
    ``model.compile`` too, the FP8 fold's bound is checked once a block (``kernels.block_checked``);
    ``block_checks=False`` keeps the check of every layer call (the path ``fused_fp8_layer_checked``)."""
    torch._dynamo.reset()
    kernels.prepare(model)
    for block in model.blocks:
        block.compile()
        if block_checks:
            kernels.block_checked(block)
    try:
        yield
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()


def _free(*objs) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def run_bench(cfg: dict, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` (the ``bench`` config group) and write
    ``<name>.json`` and ``<name>.md`` into ``out_dir``. TF32 is off and ``gemm_variant`` pins the
    fused GEMM while it runs; both are as they were afterwards."""
    unknown = [p for p in cfg.get("paths") or [] if p not in ("bf16", "bf16_compiled", *W4A4_PATHS)]
    if unknown:  # before any model is built: a misspelt path would otherwise be skipped in silence
        raise ValueError(f"bench.paths: unknown {unknown}; known: bf16, bf16_compiled, {', '.join(W4A4_PATHS)}")
    if cfg.get("device", "cuda") == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("wanexp.bench needs a CUDA GPU")
    with contextlib.ExitStack() as scope:
        scope.enter_context(_tf32(False))
        if cfg.get("gemm_variant") is not None:
            from wanexp.kernels.mxfp4 import gemm_options  # Triton: imported only on a GPU
            scope.enter_context(gemm_options(variant=int(cfg["gemm_variant"])))
        return _run_bench(cfg, out_dir, log)


@contextlib.contextmanager
def _tf32(allowed: bool):
    """cuBLAS's TF32 setting for a block of code, the process's own back after it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _run_bench(cfg: dict, out_dir: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    device = torch.device(cfg.get("device", "cuda"))  # cpu: the bench's own smoke test, at a small spec
    spec = None if not cfg.get("spec") else {**A14B_TRANSFORMER, **cfg["spec"]}
    num_layers = int(cfg.get("num_layers", 40))
    warmup, repeats = int(cfg.get("warmup", 1)), int(cfg.get("repeats", 1))
    resolutions = [dict(r) for r in cfg["resolutions"]]
    paths = list(cfg.get("paths", ["bf16", "reference", "fused"]))
    prof_cfg = dict(cfg.get("profile") or {})
    q = dict(cfg.get("quant") or {})

    import diffusers
    import triton
    result: dict[str, Any] = {
        "name": cfg.get("name", "bench"), "date": str(cfg.get("date") or datetime.date.today()),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
        "diffusers": diffusers.__version__, "num_layers": num_layers, "warmup": warmup, "repeats": repeats,
        "quant": q, "resolutions": {}, "paths": paths,
        "pipeline_memory": None,  # whole-pipeline peak memory under the model.offload= policies (bench.pipeline_memory)
        "whole_video": None,  # one whole video at the papers' setting, BF16 and W4A4, compiled (bench.whole_video)
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.get("name", "bench")

    def save(snapshot: dict) -> None:  # after each measurement, so a cut-off command keeps what it measured
        (out_dir / f"{stem}.json").write_text(json.dumps(snapshot, indent=2, default=str))

    calib = dict(cfg.get("calib") or {})
    if calib.get("enabled"):  # the calibration bench: the runner's own stages (wanexp.bench.calib)
        from wanexp.bench.calib import run_calib_bench
        return run_calib_bench(dict(calib, name=stem), out_dir, log)
    for key, run_section in (("pipeline_memory", run_pipeline_memory), ("whole_video", run_whole_video)):
        section = dict(cfg.get(key) or {})
        if section.get("enabled"):  # the whole-pipeline sections, each saved as it grows
            result[key] = {}
            result[key] = run_section(section, device, log,
                                      save=lambda r, key=key: (result.__setitem__(key, r), save(result)))
            save(result)
    if not paths:
        md = to_markdown(result)
        (out_dir / f"{stem}.md").write_text(md)
        log(md)
        return result
    t0 = time.perf_counter()
    model = build_expert(device, num_layers, spec=spec)
    result["build_s"] = time.perf_counter() - t0
    result["bytes_bf16"] = held_bytes(model)
    log(f"built A14B expert ({num_layers} blocks): {result['bytes_bf16'] / GB:.2f} GB in {result['build_s']:.1f} s")
    outs: dict[str, dict[str, torch.Tensor]] = {}
    prof_res = prof_cfg.get("resolution")

    def measure(path: str) -> None:
        for r in resolutions:
            inputs, tokens = make_inputs(r["height"], r["width"], r["frames"], device)
            m = timed_forward(model, inputs, warmup, repeats)
            entry = result["resolutions"].setdefault(r["name"], {"video": f"{r['height']}x{r['width']}x{r['frames']}",
                                                                 "tokens": tokens})
            entry[path] = {"seconds": m["seconds"], "all_seconds": m["all_seconds"], "peak_bytes": m["peak_bytes"]}
            outs.setdefault(r["name"], {})[path] = m["out"].float().cpu()
            log(f"{path:>9} {r['name']:>5} ({tokens} tokens): {m['seconds']:.3f} s/forward, "
                f"peak {m['peak_bytes'] / GB:.2f} GB")
            if prof_cfg.get("enabled") and r["name"] == prof_res and path in prof_cfg.get("paths", []):
                entry[path]["profile"] = profile_forward(model, inputs)
                log(f"  profile {path} {r['name']}: " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in entry[path]["profile"]["categories"].items()))
            _free(inputs, m)
            save(result)

    compiled = [p for p in paths if p.endswith("_compiled")]
    if "bf16" in paths:
        measure("bf16")
    if "bf16_compiled" in paths:
        with compiled_blocks(model):
            measure("bf16_compiled")
    # W4A4: swap the 400 block linears for QuantLinear in place (bf16 originals freed one by one)
    t0 = time.perf_counter()
    builder = SyntheticTSClip(rank=int(q.get("rank", 32)), smooth=bool(q.get("smooth", True)),
                              clip_table=tuple(q.get("clip_table", (1.0, 0.9, 0.8, 0.9))),
                              scale_rule=str(q.get("scale_rule", "floor")), format=str(q.get("format", "mxfp4")))

    def quantized(model: nn.Module, builder: SyntheticTSClip) -> tuple[list, TimestepContext]:
        """``model``'s block linears swapped for ``builder``'s QuantLinears, in a bin of the clip table."""
        ctx = TimestepContext(bins=TimestepBins.equal_width(900.0, 1000.0, len(builder.clip_table)))
        ctx.set_timestep(950.0)
        with torch.no_grad():
            swapped = quantize_(model, builder, select_targets(model), context=ctx)
        _sync(device)
        _free()
        return swapped, ctx
    swapped, ctx = quantized(model, builder)
    result["quantize_s"] = time.perf_counter() - t0
    result["targeted_linears"] = len(swapped)
    result["bytes_w4a4"] = held_bytes(model)
    result["timestep_bin"] = ctx.bin
    log(f"quantized {len(swapped)} linears in {result['quantize_s']:.1f} s: {result['bytes_w4a4'] / GB:.2f} GB held")
    for path in [p for p in W4A4_PATHS if p in paths]:
        base = path.removesuffix("_compiled").partition("+attn_")[0]
        backend = PATH_BACKENDS.get(base, "auto")
        with kernels.fused(base != "reference"), kernels.gemm_backend(backend), attention_scope(path), \
                (compiled_blocks(model, block_checks=base != "fused_fp8_layer_checked") if path in compiled
                 else contextlib.nullcontext()):
            before = fallback_counts(model)
            measure(path)
            # rows the FP8 fold could not hold exactly, recomputed by the bf16 path
            if base in ("fused_fp8", "fused", "fused_fp8_triton", "fused_fp8_rowwise", "fused_fp8_layer_checked"):
                after = fallback_counts(model)
                result.setdefault("fp8_fallbacks", {})[path] = {k: after[k] - before[k] for k in after}
    # each further format: the expert built again and quantized in it, its fused path eager and compiled
    for fmt in [f for f in cfg.get("extra_formats") or [] if f != builder.format]:
        _free(model)
        del model
        model = build_expert(device, num_layers, spec=spec)
        quantized(model, dataclasses.replace(builder, format=str(fmt)))
        result.setdefault("bytes_by_path", {})
        per_format = cfg.get("extra_format_paths") or ("fused", "fused_compiled")
        if isinstance(per_format, Mapping):  # {format: [paths]}, the others both
            per_format = per_format.get(fmt, ("fused", "fused_compiled"))
        for base_path in per_format:  # e.g. fused_compiled -> fused_int4_compiled; fused_cublas -> fused_int4_cublas
            path = f"fused_{fmt}" + base_path.removeprefix("fused")
            backend = PATH_BACKENDS.get(base_path.removesuffix("_compiled"), "auto")
            result["paths"].append(path)
            result["bytes_by_path"][path] = held_bytes(model)
            with kernels.fused(True), kernels.gemm_backend(backend), \
                    (compiled_blocks(model) if path.endswith("_compiled") else contextlib.nullcontext()):
                measure(path)
    for name, o in outs.items():
        entry = result["resolutions"][name]
        if "reference" in o and "fused" in o:
            entry["fused_vs_reference_rel_err"] = float((o["fused"] - o["reference"]).norm() / o["reference"].norm())
        if "fused_triton" in o and "reference" in o:
            entry["fused_triton_vs_reference_rel_err"] = float((o["fused_triton"] - o["reference"]).norm()
                                                               / o["reference"].norm())
        for path in [p for p in result["paths"] if p != "bf16" and p in o]:
            if "bf16" in o:
                entry[f"{path}_vs_bf16_rel_err"] = float((o[path] - o["bf16"]).norm() / o["bf16"].norm())
            plain = path.partition("+attn_")[0] + ("_compiled" if path.endswith("_compiled") else "")
            if plain != path and plain in o:  # the quantized attention's own effect, on the same W4A4 path
                entry[f"{path}_vs_{plain}_rel_err"] = float((o[path] - o[plain]).norm() / o[plain].norm())
            if path != "reference" and "reference" in o and path not in ("fused", "fused_triton", "bf16_compiled"):
                entry[f"{path}_vs_reference_rel_err"] = float((o[path] - o["reference"]).norm()
                                                              / o["reference"].norm())
        base = entry.get("bf16")
        fast = entry.get("bf16_compiled")  # the baseline a diffusers user would pick
        for path in [p for p in result["paths"] if p != "bf16" and p in entry]:
            if base:
                entry[path]["time_ratio"] = entry[path]["seconds"] / base["seconds"]
                entry[path]["peak_ratio"] = entry[path]["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
            if fast:
                entry[path]["time_ratio_compiled_bf16"] = entry[path]["seconds"] / fast["seconds"]
    result["bytes_ratio"] = result["bytes_w4a4"] / result["bytes_bf16"]
    from wanexp.kernels.mxfp4 import tuned_configs
    result["gemm_configs"] = tuned_configs()
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (out_dir / f"{stem}.md").write_text(md)
    log(md)
    _free(model)
    return result


def to_markdown(r: dict[str, Any]) -> str:
    """Table II of the paper's layout: per method, model size, and per resolution latency, the ratio
    to BF16 and peak memory; then the profile breakdown."""
    names = list(r["resolutions"])
    if not r["paths"]:  # the whole-pipeline sections alone
        return "\n".join([f"# Wan2.2-I2V-A14B whole pipeline ({r['gpu']}, {r['date']}; torch {r['torch']}, "
                          f"triton {r['triton']}, diffusers {r['diffusers']})", "", *_pipeline_sections(r)]) + "\n"
    lines = [f"# Wan2.2-I2V-A14B expert, one denoiser forward: BF16 vs W4A4 {r['quant'].get('format', 'mxfp4').upper()} "
             f"({r['gpu']}, {r['date']})", "",
             f"torch {r['torch']}, triton {r['triton']}, diffusers {r['diffusers']}; {r['num_layers']} blocks, random "
             f"weights; {r['targeted_linears']} block linears quantized (smoothing, rank-{r['quant'].get('rank', 32)} "
             f"low-rank, clip table); {r['warmup']} warm-up + {r['repeats']} timed forward(s) per cell, no CFG.", ""]
    head = "| method | weights held (GB) | size ratio |"
    sep = "|---|---|---|"
    for n in names:
        e = r["resolutions"][n]
        head += f" {n} s/forward ({e['tokens']} tok) | {n} × BF16 | {n} × compiled BF16 | {n} peak GB |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    labels = {"bf16": "BF16", "reference": "W4A4 reference (torch, unfused)",
              "fused": "W4A4 fused (Triton act-quant; GEMM auto: above 4096 tokens FP8 on Hopper, else upcast + cuBLAS)",
              "fused_cublas": "W4A4 fused (Triton act-quant; upcast + cuBLAS)",
              "fused_triton": "W4A4 fused (Triton act-quant + Triton packed-weight GEMM)",
              "fused_fp8": "W4A4 fused on FP8 tensor cores (row-folded E4M3, torch._scaled_mm)",
              "fused_fp8_unchecked": "the same without the exact-fallback check (diagnostic: its host sync's cost)",
              "fused_fp8_triton": "W4A4 fused on FP8 tensor cores, Triton GEMM with bias and low-rank branch "
                                  "in its epilogue",
              "fused_fp8_rowwise": "W4A4 fused on FP8 tensor cores, every layer on the row-wise-scaled "
                                   "torch._scaled_mm",
              "fused_fp8_layer_checked": "W4A4 fused on FP8 tensor cores, the fold's bound checked at every layer "
                                         "call (one host sync each; compiled paths otherwise check once a block)"}
    labels.update({"fused_fp8+attn_fp8": f"{labels['fused_fp8']} + FP8 attention (Triton)",
                   "fused_fp8+attn_int8_sage": f"{labels['fused_fp8']} + INT8 SageAttention, fp16 P·V (Triton)",
                   "fused_fp8+attn_fp8_cudnn": f"{labels['fused_fp8']} + FP8 attention, per tensor (cuDNN sdpa_fp8)"})
    labels.update({f"{k}_compiled": f"{v}, blocks compiled" for k, v in list(labels.items()) if k != "reference"})
    for path in [p for p in r["paths"] if p not in labels]:   # fused_<format>[_<backend>][_compiled]
        fmt, _, how = path.removeprefix("fused_").removesuffix("_compiled").removesuffix("compiled").partition("_")
        how = {"": "GEMM auto: INT4 in groups of 128 above 4096 tokens on Hopper on FP8 tensor cores, block-scaled; "
                   "else upcast weight + cuBLAS", "cublas": "upcast weight + cuBLAS"}.get(how, how)
        labels[path] = f"W4A4 {fmt.upper()} fused (Triton act-quant; {how})" + (
            ", blocks compiled" if path.endswith("_compiled") else "")
    for path in r["paths"]:
        held = (r["bytes_bf16"] if path in ("bf16", "bf16_compiled")
                else (r.get("bytes_by_path") or {}).get(path, r["bytes_w4a4"]))
        row = f"| {labels[path]} | {held / GB:.2f} | {held / r['bytes_bf16']:.3f} |"
        for n in names:
            e = r["resolutions"][n].get(path)
            if not e:
                row += " – | – | – | – |"
                continue
            ratio = 1.0 if path == "bf16" else e.get("time_ratio")   # None: no eager BF16 in this run
            fast = e.get("time_ratio_compiled_bf16")
            show = lambda v: "–" if v is None else f"{v:.2f}×"  # noqa: E731
            row += f" {e['seconds']:.3f} | {show(ratio)} | {show(fast)} | {e['peak_bytes'] / GB:.2f} |"
        lines.append(row)
    lines.append("")
    for n in names:
        e = r["resolutions"][n]
        if "fused_vs_reference_rel_err" in e:
            lines.append(f"- {n}: fused vs reference output relative error {e['fused_vs_reference_rel_err']:.2e}"
                         + (f", Triton-GEMM fused vs reference {e['fused_triton_vs_reference_rel_err']:.2e}"
                            if "fused_triton_vs_reference_rel_err" in e else "")
                         + f" (W4A4 vs BF16: {e.get('fused_vs_bf16_rel_err', float('nan')):.3f}; random weights, "
                         "40 blocks: per-layer bf16-rounding differences flip later MXFP4 roundings)")
    for path, c in (r.get("fp8_fallbacks") or {}).items():
        lines.append(f"- {labels[path]}: {c['fp8_rows']} activation rows and {c['fp8_cols']} weight rows (summed over "
                     "layers and forwards) spanned more than 14 octaves and took the exact bf16 fallback")
    for n in names:
        for path in r["paths"]:
            p = (r["resolutions"][n].get(path) or {}).get("profile")
            if not p:
                continue
            lines += ["", f"## Where the time goes: {labels[path]}, {n} (torch.profiler, device time of one forward)", "",
                      "| kernels | seconds | share |", "|---|---|---|"]
            for cat, sec in p["categories"].items():
                lines.append(f"| {cat} | {sec:.3f} | {sec / max(p['device_seconds'], 1e-9):.1%} |")
            lines.append(f"| total | {p['device_seconds']:.3f} | |")
    sections = _pipeline_sections(r)
    if sections:
        lines += ["", *sections]
    return "\n".join(lines) + "\n"


def _pipeline_sections(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if r.get("pipeline_memory"):
        lines += pipeline_md(r["pipeline_memory"])
    if r.get("whole_video"):
        lines += ([""] if lines else []) + video_markdown(r["whole_video"])
    return lines
