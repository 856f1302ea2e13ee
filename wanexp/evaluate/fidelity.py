"""Fidelity of each quantized video to its BF16 twin (same sample, same seed).

Per video: PSNR and SSIM over the decoded mp4 frames (what a viewer and VBench see; the identical
encoder settings on both sides keep the comparison fair), and the relative error of the final
latents ``‖z_q − z_ref‖ / ‖z_ref‖``, which no video codec touches. Means overall and per category.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from wanexp.errors import WanexpError
from wanexp.video import read_mp4

METRICS = ("psnr", "ssim", "latent_rel_err")


def video_psnr_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """PSNR over the whole video (one MSE over every pixel) and SSIM averaged over frames; uint8 input."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    if a.shape != b.shape:
        raise WanexpError(f"videos differ in shape {a.shape} vs {b.shape}; were they generated with the same settings?")
    x = torch.from_numpy(a).float().div(255).permute(0, 3, 1, 2)
    y = torch.from_numpy(b).float().div(255).permute(0, 3, 1, 2)
    mse = float(torch.mean((x - y) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
    if mse == 0:  # identical videos: SSIM is 1 by definition (torchmetrics' float32 gives 0.99996 on flat frames)
        return psnr, 1.0
    # An 11-pixel Gaussian window needs frames of at least 11 pixels a side; smaller ones use a smaller window.
    k = 11 if min(x.shape[-2:]) >= 11 else (min(x.shape[-2:]) // 2) * 2 - 1
    return psnr, float(ssim(x, y, data_range=1.0, kernel_size=k))


def load_latents(path: Path) -> torch.Tensor:
    """A video's final latents, checked against the checksum written beside them."""
    from wanexp.integrity import load_tensors
    tensors, _, _ = load_tensors(path, "latents", f"delete it and the video beside it ({Path(path).stem}.mp4), "
                                 "then re-run stage=generate: that video alone is made again")
    return tensors["latents"]


def latent_rel_err(path_q: Path, path_ref: Path) -> float:
    zq, zr = load_latents(path_q).double(), load_latents(path_ref).double()
    return float(torch.linalg.vector_norm(zq - zr) / torch.linalg.vector_norm(zr).clamp_min(1e-30))


def score_pair(ref_dir: Path, ref: dict, quant_dir: Path, quant: dict) -> dict:
    psnr, ssim = video_psnr_ssim(read_mp4(quant_dir / quant["video"]), read_mp4(ref_dir / ref["video"]))
    return {"id": ref["id"], "category": ref["category"], "psnr": psnr, "ssim": ssim,
            "latent_rel_err": latent_rel_err(quant_dir / quant["latents"], ref_dir / ref["latents"])}


def summarize(rows: Iterable[dict]) -> dict:
    """Means over videos (PSNR averaged in dB, capped at 100 dB so identical videos stay finite)."""
    rows = list(rows)
    out: dict = {"num_videos": len(rows)}
    if not rows:
        return out

    def mean(values):
        return float(np.mean([min(v, 100.0) for v in values]))

    for m in METRICS:
        out[m] = mean(r[m] for r in rows)
    cats: dict = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    out["per_category"] = {c: {m: mean(r[m] for r in rs) for m in METRICS} | {"num_videos": len(rs)}
                           for c, rs in sorted(cats.items())}
    return out
