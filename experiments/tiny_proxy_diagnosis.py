"""Where the trained tiny proxy's generated frames lose quality: the VAE, the denoisers, the sampling
or the latent normalisation.

    PYTHONPATH=$PWD python experiments/tiny_proxy_diagnosis.py [--weights DIR]

Prints (markdown) on held-out clips of training's held-out seed:
- the VAE's per-frame PSNR of decode(encode(clip)), fp32 and bf16, and how flat fields of each object
  colour come back (does it hold colours at all?);
- the normalised training latents' mean and std (the pipeline's latents_mean/std should make them ~0/1);
- per sigma, the expert's one-step x0 prediction decoded through the VAE: if its PSNR equals the
  VAE's own round trip, the denoiser is not the limit;
- whether the experts read the caption: held-out flow loss with each clip's caption, with the empty
  prompt, with another clip's caption and with the motion words swapped (the caption alone says which
  way the objects move);
- the full pipeline's per-frame error against the drawn clip at several step counts, CFG scales and
  dtypes, beside the VAE round trip's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanexp.models import procedural, tiny
from wanexp.models import train_tiny as tt


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] videos (the 8-bit PSNR)."""
    return float(10 * torch.log10(4.0 / F.mse_loss(a.clamp(-1, 1), b)))


def denormalise(vae, x: torch.Tensor) -> torch.Tensor:
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return x * std + torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)


@torch.no_grad()
def vae_section(vae, videos: torch.Tensor) -> list[str]:
    rec = vae.decode(tt.encode_means(vae, videos)).sample
    vb = vae.to(torch.bfloat16)
    rec_bf16 = vb.decode(vb.encode(videos.bfloat16()).latent_dist.mode()).sample.float()
    vae.to(torch.float32)
    lines = ["## VAE", "",
             "Per-frame PSNR (dB) of decode(encode(clip)): fp32 "
             + " / ".join(f"{psnr(rec[:, :, f], videos[:, :, f]):.2f}" for f in range(videos.shape[2]))
             + "; bf16 " + " / ".join(f"{psnr(rec_bf16[:, :, f], videos[:, :, f]):.2f}" for f in range(videos.shape[2]))
             + ".", "", "A flat 64x64 field of each object colour, encoded and decoded (centre mean, 8-bit):", ""]
    for name, rgb in procedural.COLOURS.items():
        x = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1, 1).expand(1, 3, 1, 64, 64)
        r = vae.decode(vae.encode(x.contiguous()).latent_dist.mode()).sample.clamp(-1, 1)
        back = [round(float(v)) for v in (r[0, :, 0, 16:48, 16:48].mean((1, 2)) + 1) * 127.5]
        lines.append(f"- {name} {tuple(rgb)} -> {tuple(back)}")
    return lines + [""]


@torch.no_grad()
def normalisation_section(vae, videos: torch.Tensor) -> list[str]:
    z = tt.normalise(vae, tt.encode_means(vae, videos))
    per_frame = " / ".join(f"{float(z[:, :, f].std()):.2f}" for f in range(z.shape[2]))
    return ["## Latent normalisation", "",
            f"Normalised latents of these clips: mean {float(z.mean()):.3f}, std {float(z.std()):.3f} (per channel "
            f"{float(z.std((0, 2, 3, 4)).min()):.2f}-{float(z.std((0, 2, 3, 4)).max()):.2f}; per latent frame {per_frame}).", ""]


@torch.no_grad()
def denoiser_section(pipe, videos: torch.Tensor, captions: list[str]) -> list[str]:
    data = tt.prepare_expert_data(pipe, videos, captions)
    x0, text = data["x0"], data["text"][data["caption_index"]]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    vae_rec = pipe.vae.decode(denormalise(pipe.vae, x0)).sample
    lines = ["## Denoisers: one-step x0 prediction, decoded", "",
             f"The VAE's own round trip: frame 1 {psnr(vae_rec[:, :, :1], videos[:, :, :1]):.2f} dB, frames 2-5 "
             f"{psnr(vae_rec[:, :, 1:], videos[:, :, 1:]):.2f} dB.", "",
             "| sigma | expert | flow loss | x0 rel. error, latent frame 0 / 1 | decoded PSNR frame 1 / frames 2-5 (dB) |",
             "|---|---|---|---|---|"]
    for s in (0.05, 0.2, 0.4, 0.6, 0.8, 0.89, 0.95, 0.99):
        name, expert = ("high_noise", pipe.transformer) if s >= 0.9 else ("low_noise", pipe.transformer_2)
        xt = (1 - s) * x0 + s * noise
        pred = expert(hidden_states=torch.cat([xt, data["cond"]], 1), timestep=torch.full((len(x0),), s * 1000),
                      encoder_hidden_states=text, return_dict=False)[0]
        x0_hat = xt - s * pred
        rel = [float((x0_hat[:, :, f] - x0[:, :, f]).pow(2).mean() / x0[:, :, f].pow(2).mean()) for f in range(2)]
        img = pipe.vae.decode(denormalise(pipe.vae, x0_hat)).sample
        lines.append(f"| {s} | {name} | {float(F.mse_loss(pred, noise - x0)):.4f} | {rel[0]:.3f} / {rel[1]:.3f} | "
                     f"{psnr(img[:, :, :1], videos[:, :, :1]):.2f} / {psnr(img[:, :, 1:], videos[:, :, 1:]):.2f} |")
    return lines + [""]


def motion_swapped(scene: procedural.Scene) -> str:
    """The scene's caption with every object's motion swapped (``procedural.MOTION_SWAP``), the rest unchanged."""
    return procedural.with_motions_swapped(scene).caption


@torch.no_grad()
def caption_section(pipe, videos: torch.Tensor, clips: list[procedural.Clip]) -> list[str]:
    held = tt.prepare_expert_data(pipe, videos, [c.caption for c in clips])
    empty = dict(held, text=held["empty_text"], caption_index=torch.zeros(len(clips), dtype=torch.long))
    other = dict(held, caption_index=held["caption_index"].roll(1))
    text, index, _ = tt.text_embeddings(pipe, [motion_swapped(c.scene) for c in clips])
    swapped = dict(held, text=text, caption_index=index)
    boundary = float(pipe.config.boundary_ratio)
    lines = ["## Do the experts read the caption?", "",
             "Held-out flow loss (as training's held-out evaluation) with each clip's own caption, the empty prompt, "
             "the next clip's caption, and its own caption with every motion swapped (left for right, up for down, "
             "still -> grows -> shrinks -> still):", "",
             "| expert | own caption | empty | another clip's | motion words swapped |", "|---|---|---|---|---|"]
    for name, expert in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        lines.append(f"| {name} | " + " | ".join(f"{tt.heldout_losses(expert, name, d, boundary, 0):.4f}"
                                              for d in (held, empty, other, swapped)) + " |")
    return lines + [""]


@torch.no_grad()
def sampling_section(pipe, clips: list[procedural.Clip]) -> list[str]:
    from PIL import Image
    vae_rows = []
    for c in clips:
        rec = pipe.vae.to(torch.float32).decode(tt.encode_means(pipe.vae, tt.clips_tensor([c]))).sample.clamp(-1, 1)
        frames = ((rec[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round()
        vae_rows.append(np.abs(frames - c.frames).mean(axis=(1, 2, 3)))
    lines = ["## Sampling: the pipeline's frames against the drawn clip", "",
             "Mean absolute error (8-bit) per frame 1-5 over the prompts; the VAE round trip of the clip: "
             + " / ".join(f"{v:.1f}" for v in np.mean(vae_rows, 0)) + ".", "",
             "| dtype | steps | CFG | per-frame MAE |", "|---|---|---|---|"]
    for dtype, steps, cfg in ((torch.bfloat16, 8, 3.5), (torch.float32, 8, 3.5), (torch.float32, 8, 1.0),
                              (torch.float32, 30, 3.5)):
        p = pipe.to(dtype)
        rows = []
        for c in clips:
            out = p(image=Image.fromarray(c.frames[0]), prompt=c.caption, height=64, width=64, num_frames=5,
                    num_inference_steps=steps, guidance_scale=cfg, output_type="np",
                    generator=torch.Generator().manual_seed(0))
            g = (np.clip(out.frames[0], 0, 1) * 255).round()
            rows.append(np.abs(g - c.frames).mean(axis=(1, 2, 3)))
        lines.append(f"| {str(dtype).split('.')[-1]} | {steps} | {cfg} | " + " / ".join(f"{v:.1f}" for v in np.mean(rows, 0)) + " |")
    pipe.to(torch.float32)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, default=tiny.TRAINED_WEIGHTS, help="a train_tiny --out directory")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tiny.TRAINED_WEIGHTS = args.weights  # build_tiny_pipeline("trained") reads the module's path
    pipe = tiny.build_tiny_pipeline("trained").to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clips = procedural.make_clips(tt.split_seeds(0)[1], args.clips)
    videos = tt.clips_tensor(clips)
    lines = [f"# Diagnosis of the trained tiny proxy ({args.weights}, {args.clips} held-out clips)", ""]
    lines += vae_section(pipe.vae, videos)
    lines += normalisation_section(pipe.vae, videos)
    lines += denoiser_section(pipe, videos, [c.caption for c in clips])
    lines += caption_section(pipe, videos, clips)
    lines += sampling_section(pipe, [procedural.make_clip(s) for s in (2024, 2025, 2026, 2027)])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
