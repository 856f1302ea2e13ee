"""Activation statistics of the trained vs the random tiny Wan2.2-I2V, against the seed paper's observations.

    PYTHONPATH=$PWD python experiments/tiny_proxy_activations.py

Runs both pipelines (bf16, the tiny default's generation: 64x64x5, 8 UniPC steps, CFG 3.5) on the
data=tiny fixture's prompts and images, with a forward pre-hook on every linear layer of both experts
recording, per denoising step: each input channel's max |x|, the input's kurtosis, and the relative
output error of that layer under RTN W4A4 MXFP4 (weights and activations fake-quantized, the same
format code the runs use). Writes experiments/results/tiny_proxy_activations_cpu.md and
tiny_proxy_activations.png (per-channel max |x| of two layers across the steps).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
SAMPLES = 4
MODULE_TYPES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def module_type(name: str) -> str:
    return name.split(".", 2)[2]  # blocks.<i>.<type>


def record(weights: str, samples) -> dict:
    """{(expert, layer): {"t": [...], "absmax": [[C]...], "kurt": [...], "err": [...]}}."""
    from wanexp.formats import get_format
    from wanexp.models.tiny import build_tiny_pipeline
    fmt = get_format("mxfp4")
    pipe = build_tiny_pipeline(weights).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    out: dict = defaultdict(lambda: defaultdict(list))
    hooks = []
    for expert, model in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("blocks."):
                def hook(m, args, key=(expert, name)):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    w = m.weight.detach().float()
                    y = F.linear(x, w)
                    yq = F.linear(fmt.quantize_dequantize(x), fmt.quantize_dequantize(w))
                    z = (x - x.mean()) / x.std().clamp_min(1e-12)
                    rec = out[key]
                    rec["t"].append(float(pipe.current_timestep))
                    rec["absmax"].append(x.abs().amax(dim=0).numpy())
                    rec["kurt"].append(float((z ** 4).mean()))
                    rec["err"].append(float((yq - y).norm() / y.norm().clamp_min(1e-12)))
                hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for s in samples:
            pipe(image=s.load_image(), prompt=s.prompt, height=64, width=64, num_frames=5, num_inference_steps=8,
                 guidance_scale=3.5, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    return out


def summarise(rec: dict) -> dict:
    """Per layer: outlier ratio (max / median channel max|x|, mean over calls), kurtosis, RTN error,
    and how much the layer's range moves with t (max over steps of the layer's max|x| / min over steps)."""
    rows = {}
    for key, r in rec.items():
        absmax = np.stack(r["absmax"])  # [calls, C]
        ratio = absmax.max(axis=1) / np.median(absmax, axis=1).clip(1e-12)
        t = np.array(r["t"])
        per_step = [absmax[t == v].max() for v in np.unique(t)]
        chan = np.stack([absmax[t == v].max(axis=0) for v in np.unique(t)])  # [steps, C]
        rows[key] = {"outlier_ratio": float(ratio.mean()), "kurtosis": float(np.mean(r["kurt"])),
                     "rtn_err": float(np.mean(r["err"])), "range_shift": float(max(per_step) / max(min(per_step), 1e-12)),
                     "channel_cv_over_t": float((chan.std(axis=0) / chan.mean(axis=0).clip(1e-12)).mean())}
    return rows


def by_type(rows: dict) -> dict:
    agg = defaultdict(lambda: defaultdict(list))
    for (expert, layer), v in rows.items():
        for k, x in v.items():
            agg[module_type(layer)][k].append(x)
    return {t: {k: float(np.mean(x)) for k, x in v.items()} for t, v in agg.items()}


def heatmap(recs: dict, path: Path, layers=(("low_noise", "blocks.1.attn1.to_q"), ("low_noise", "blocks.1.ffn.net.2"))):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(layers), len(recs), figsize=(5 * len(recs), 3.2 * len(layers)), squeeze=False)
    for j, (weights, rec) in enumerate(recs.items()):
        for i, key in enumerate(layers):
            r = rec[key]
            t, absmax = np.array(r["t"]), np.stack(r["absmax"])
            steps = np.unique(t)[::-1]
            chan = np.stack([absmax[t == v].max(axis=0) for v in steps])
            im = axes[i][j].imshow(chan, aspect="auto", cmap="viridis")
            axes[i][j].set_title(f"{weights}: {key[0]} {key[1]}", fontsize=9)
            axes[i][j].set_yticks(range(len(steps)), [f"{v:.0f}" for v in steps], fontsize=7)
            axes[i][j].set_ylabel("timestep")
            axes[i][j].set_xlabel("input channel")
            fig.colorbar(im, ax=axes[i][j], label="max |x|")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from wanexp.data import TINY_FILES, ensure_tiny_dataset
    from wanexp.data.opens2v import read_opens2v
    torch.set_num_threads(2)
    cache = os.environ.get("WANEXP_CACHE") or "~/.cache/wanexp"
    samples = read_opens2v(ensure_tiny_dataset(cache), TINY_FILES)[:SAMPLES]
    t0 = time.perf_counter()
    recs = {w: record(w, samples) for w in ("trained", "random")}
    seconds = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    heatmap(recs, RESULTS / "tiny_proxy_activations.png")
    rows = {w: summarise(r) for w, r in recs.items()}
    types = {w: by_type(r) for w, r in rows.items()}
    lines = ["# Activation statistics: trained vs random tiny Wan2.2-I2V (issue 19, item 3)", "",
             f"`PYTHONPATH=$PWD python experiments/tiny_proxy_activations.py` ({seconds:.0f} s on the shared 2-core CPU, "
             f"{time.strftime('%Y-%m-%d')}): {SAMPLES} data=tiny samples, bf16, 8 steps, CFG 3.5 (cond and uncond "
             "passes both recorded), every linear layer's input in both experts.", "",
             "Columns: *outlier ratio* = max / median over input channels of the channel's max |x| (per call, "
             "averaged); *kurtosis* of the input's values (3 = Gaussian); *range shift* = the layer's largest "
             "max |x| over the denoising steps / its smallest (Fig. 1 of the seed paper: ranges move with t); "
             "*channel CV over t* = per channel, std / mean of its max |x| across steps, averaged; *RTN error* = "
             "relative output error of the layer under W4A4 MXFP4 RTN (Fig. 4: the paper finds `attn1.to_out.0` and "
             "`ffn.net.2` worst).", "",
             "## Per module type (mean over blocks and both experts)", "",
             "| module | outlier ratio trained / random | kurtosis trained / random | range shift trained / random | "
             "channel CV over t trained / random | RTN error trained / random |", "|---|---|---|---|---|---|"]
    for t in MODULE_TYPES:
        a, b = types["trained"][t], types["random"][t]
        lines.append(f"| `{t}` | {a['outlier_ratio']:.1f} / {b['outlier_ratio']:.1f} | {a['kurtosis']:.1f} / "
                     f"{b['kurtosis']:.1f} | {a['range_shift']:.2f} / {b['range_shift']:.2f} | "
                     f"{a['channel_cv_over_t']:.3f} / {b['channel_cv_over_t']:.3f} | {a['rtn_err']:.4f} / {b['rtn_err']:.4f} |")
    for w in ("trained", "random"):
        order = sorted(types[w], key=lambda t: -types[w][t]["rtn_err"])
        lines += ["", f"RTN error ranking, {w}: " + " > ".join(f"`{t}`" for t in order[:4]) + " > …"]
    for w in ("trained", "random"):
        worst = sorted(rows[w].items(), key=lambda kv: -kv[1]["rtn_err"])[:5]
        lines += ["", f"Worst 5 layers, {w}: " + ", ".join(f"{e}/{l} {v['rtn_err']:.4f}" for (e, l), v in worst)]
    lines += ["", "![per-channel max |x| across steps](tiny_proxy_activations.png)", ""]
    (RESULTS / "tiny_proxy_activations_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
