"""Train the tiny Wan2.2-I2V on procedural captioned clips, on the CPU, reproducibly.

``python -m wanexp.models.train_tiny`` writes the weights ``model=tiny`` loads
(``wanexp/models/tiny_weights/``): the VAE first, as an autoencoder of the clips, then each expert
with Wan's flow-matching objective on its own timestep range, split at the pipeline's boundary
(high noise: t >= boundary_ratio * 1000; low noise: below). The architecture is ``TINY_SPEC``'s;
the text encoder is the tiny UMT5, kept frozen as Wan keeps its UMT5; the tokenizer is retrained on
the clips' vocabulary as well (same size), so a caption is ~20 tokens instead of 60 bytes.

Image conditioning is exactly the pipeline's: the first frame followed by blank frames, VAE-encoded,
with the 4-channel first-frame mask (``WanImageToVideoPipeline.prepare_latents``); the flow target
is ``noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise`` with timestep ``1000 sigma``, which is what
the UniPC flow scheduler's ``flow_prediction`` expects. Captions are dropped 10% of the time so
classifier-free guidance has an unconditional model to push against.

Reproducible: every random draw comes from generators seeded by ``--seed``, on a fixed thread count;
the same seed gives bit-identical weights (tests/test_train_tiny.py checks a short run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wanexp.models import procedural
from wanexp.models.tiny import (EXPERT_FILES, TEXT_ENCODER_FILE, TINY_SPEC, TRAINED_WEIGHTS, _build_tokenizer,
                                build_tiny_pipeline, tokenizer_corpus)

@dataclass
class TrainConfig:
    seed: int = 0
    train_clips: int = 768
    heldout_clips: int = 64
    # The VAE trains in two phases. Wan's VAE is causal: frame 0 of a clip is encoded and decoded
    # alone, so 1-frame clips (any frame of any clip) train the spatial path at full size cheaply;
    # then whole clips train the temporal path on top of it. Small batches, many steps: at the same
    # compute, 1200 steps x 4 frames reach 20.1 dB held-out where 300 x 16 reach 19.1 (and 2400 x 2, 19.4).
    vae_image_steps: int = 3600
    vae_image_batch: int = 4
    # whole-clip steps: a clip step costs what 10 frames as images cost (0.37 s against 0.15 s for 4 frames,
    # 1 thread), so the same per frame
    vae_steps: int = 600
    vae_batch: int = 2
    vae_crop: int = 64            # whole-clip steps see random crops of this size (64 = the full frame)
    vae_lr: float = 2e-3
    vae_l1: float = 1.0           # weight of the L1 term beside the MSE (sharper edges than MSE alone)
    vae_mean_penalty: float = 1e-4  # weight of the mean square latent (keeps its scale bounded)
    # noise added to the latent before decoding in training, relative to the latent's own std: the decoder
    # must tolerate latents that are a little off, as a denoiser's are (scale-free, unlike a KL)
    vae_latent_noise: float = 0.15
    # Weight W of the target's object pixels in the VAE's reconstruction loss: the per-element MSE and L1
    # terms are multiplied by 1 + W where the target pixel is within ``OBJECT_TOLERANCE`` (8-bit, L-inf) of
    # a ``procedural.COLOURS`` colour (``object_mask``), 1 elsewhere; 0 computes the loss exactly as before.
    # Objects are a few percent of the pixels, and with the plain loss the VAE decodes their colours as
    # grey or orange; with W = 4 and 2400 single-frame steps a probe got red, green and blue right on 3 of
    # 3 seeds, 22.7-23.3 dB (experiments/results/tiny_proxy_diagnosis_cpu.md, "objw19b"). Off in the
    # shipped recipe: no proxy has been retrained with it.
    vae_object_weight: float = 0.0
    # Start the VAE as a per-frame autoencoder (``init_vae_per_frame``): single-frame steps never reach the
    # causal convolutions' taps on past frames or the temporal resampling, which otherwise meet the clip
    # steps at their random initialisation. Off in the shipped recipe: with it and 1000 clip steps the VAE
    # reaches 20.5 dB (shipped 19.5) and its round trip moves as drawn, but the experts predict its latent
    # frames 2-5 worse and the generated frames come out further from the clip
    # (experiments/results/tiny_proxy_diagnosis_cpu.md, "proxy19c").
    vae_per_frame_init: bool = False
    # Pre-train the tiny UMT5 on the captions' attributes (``pretrain_text_encoder``) before it is frozen:
    # 0 keeps it at its seeded random weights. Cross-attention reads tokens without positions, so a
    # token must carry what it binds to ("left" of an object or of the camera, the motion of the
    # object its colour names); the random encoder binds 65-93%, the pre-trained one 100%, and the
    # high-noise expert then reads the motion words (experiments/results/tiny_proxy_diagnosis_cpu.md,
    # "proxy19d"). Off in the shipped recipe: the generated objects still do not move.
    text_pretrain_steps: int = 0
    text_pretrain_batch: int = 128
    text_pretrain_captions: int = 8192
    text_pretrain_lr: float = 3e-3
    expert_steps: int = 1000
    expert_batch: int = 48
    expert_lr: float = 1e-3
    caption_dropout: float = 0.1
    flow_shift: float = 5.0       # training sigmas are shifted as the sampling sigmas are
    # One thread per process: on a 2-core machine the experts train in two processes at once, and a
    # one-thread process loses far less than a two-thread one when others share the cores.
    threads: int = 1
    parallel_experts: bool = True
    height: int = 64
    width: int = 64
    frames: int = 5
    # What the clips show (``procedural.DataOptions``): the objects' speed (world px a frame), the motions
    # drawn from (comma-separated; empty: all of procedural.MOTIONS), and at most how many objects a clip has.
    # The defaults are the shipped data. Speed 8, five motions and one object (with the per-frame VAE) score
    # 12 of 15 on "Does it move?", but as a fade the count cannot tell from motion: the experts ignore the
    # motion words (experiments/results/tiny_proxy_diagnosis_cpu.md, "proxy19e").
    object_speed: float = procedural.SPEED
    motions: str = ""
    max_objects: int = 2

    def __post_init__(self):
        self.data_options()  # a bad data option fails here, before anything is drawn
        w = self.vae_object_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"vae_object_weight must be a finite number >= 0 (0: off), got {w!r}")

    def data_options(self) -> procedural.DataOptions:
        return procedural.DataOptions(speed=self.object_speed, motions=procedural.DataOptions.parse_motions(self.motions),
                                      max_objects=self.max_objects)

    def quick(self) -> "TrainConfig":
        """A few steps of everything (tests, smoke runs)."""
        return TrainConfig(**{**asdict(self), "train_clips": 8, "heldout_clips": 4, "vae_image_steps": 2,
                              "text_pretrain_captions": 64, "vae_image_batch": 2, "vae_steps": 2, "vae_batch": 2,
                              "vae_crop": 16, "expert_steps": 2, "expert_batch": 4})


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def clips_tensor(clips: list[procedural.Clip]) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] clips as the pipeline's video range: float [N, 3, F, H, W] in [-1, 1]."""
    arr = np.stack([c.frames for c in clips]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 4, 1, 2, 3).contiguous()


def split_seeds(seed: int) -> tuple[int, int]:
    """Training and held-out clip seeds: disjoint streams of one seed."""
    return seed * 2 + 1000, seed * 2 + 1001


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def init_vae_per_frame(vae) -> None:
    """Make the VAE's time axis start as the identity: every causal 3x3x3 convolution's taps on the two
    previous frames are zeroed (the current-frame tap is what single frames train), the decoder's
    temporal upsampling starts by duplicating each frame and the encoder's temporal downsampling by
    averaging the frames it merges. The untrained VAE then codes each latent frame like an image, and
    the clip steps learn motion from there (as an inflated 2D network is initialised; Wan2.2's VAE
    keeps duplicate/average shortcuts for the same reason). Frame 0's path is unchanged."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    for m in vae.modules():
        if isinstance(m, WanResample) and m.mode in ("upsample3d", "downsample3d"):
            w = m.time_conv.weight  # [out, in, 3, 1, 1], causal: tap 2 is the current frame
            w.zero_()
            m.time_conv.bias.zero_()
            eye = torch.eye(w.shape[1])
            if m.mode == "upsample3d":  # out channels = the two output frames' channels, one after the other
                w[:, :, 2, 0, 0] = torch.cat([eye, eye])
            else:
                w[:, :, :, 0, 0] = eye.unsqueeze(-1) / 3
        elif isinstance(m, WanCausalConv3d) and tuple(m.kernel_size) == (3, 3, 3):
            m.weight[:, :, :2] = 0.0


def train_vae(vae, videos: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, log) -> dict[str, list[float]]:
    """Both VAE phases: single frames at full size, then whole clips (``TrainConfig``)."""
    if cfg.vae_per_frame_init:
        init_vae_per_frame(vae)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses = {"image": _vae_phase(vae, opt, lambda: _frames_batch(videos, cfg.vae_image_batch, gen),
                                  cfg.vae_image_steps, cfg, gen, "vae frames", log),
              "clip": _vae_phase(vae, opt, lambda: _clips_batch(videos, cfg, gen), cfg.vae_steps, cfg, gen,
                                 "vae clips", log)}
    vae.eval()
    return losses


def _frames_batch(videos: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random frames of random clips, each as a 1-frame clip [batch, 3, 1, H, W]."""
    clip = torch.randint(len(videos), (batch,), generator=gen)
    frame = torch.randint(videos.shape[2], (batch,), generator=gen)
    return videos[clip, :, frame].unsqueeze(2)


def _clips_batch(videos: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(videos), (cfg.vae_batch,), generator=gen)
    c = min(cfg.vae_crop, cfg.height, cfg.width)
    y0 = int(torch.randint(cfg.height - c + 1, (1,), generator=gen))
    x0 = int(torch.randint(cfg.width - c + 1, (1,), generator=gen))
    return videos[idx][..., y0:y0 + c, x0:x0 + c]


def _vae_phase(vae, opt, batches, steps: int, cfg: TrainConfig, gen: torch.Generator, label: str,
               log) -> list[float]:
    losses = []
    for step in range(steps):
        _set_lr(opt, cfg.vae_lr, step, steps)
        x = batches()
        # decode the posterior mean: the pipeline only ever uses the mean (``sample_mode="argmax"``), and
        # sampling from a fresh encoder's unit-variance posterior drowns the latent in noise for
        # hundreds of steps; a small penalty on the mean keeps the latent's scale bounded instead of a KL
        mean = vae.encode(x).latent_dist.mode()
        noise = torch.randn(mean.shape, generator=gen) * (cfg.vae_latent_noise * mean.detach().std())
        recon = vae.decode(mean + noise).sample
        loss = vae_recon_loss(recon, x, cfg) + cfg.vae_mean_penalty * mean.pow(2).mean()
        _step(opt, loss, vae.parameters())
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{label} step {step + 1}/{steps}: loss {loss.item():.4f}")
    return losses


OBJECT_TOLERANCE = 24  # 8-bit levels: a pixel this close (every channel) to an object colour is the object's


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """Where clips ``x`` ([N, 3, F, H, W] in [-1, 1]) show an object: [N, 1, F, H, W] bool, true where a
    pixel's 8-bit value is within ``OBJECT_TOLERANCE`` of a ``procedural.COLOURS`` colour in every channel
    (the backdrops are never that close; anti-aliased edges are in only as far as they are that close).
    Draws no random numbers."""
    px = ((x + 1) * 127.5).round()  # back to the 8-bit levels the clips were made of
    mask = torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool)
    for colour in procedural.COLOURS.values():
        c = torch.tensor(colour, dtype=px.dtype).view(1, 3, 1, 1, 1)
        mask |= (px - c).abs().amax(dim=1, keepdim=True) <= OBJECT_TOLERANCE
    return mask


def vae_recon_loss(recon: torch.Tensor, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The VAE's reconstruction loss, MSE + ``vae_l1`` x L1, each a mean over elements. With
    ``vae_object_weight`` W > 0 every element's terms are weighted by 1 + W at the target's object pixels
    (``object_mask(x)``), 1 elsewhere, still divided by the element count (not by the weights' sum); with
    W = 0 nothing new is computed: the same ops as before the option existed."""
    if cfg.vae_object_weight > 0:
        w = 1 + cfg.vae_object_weight * object_mask(x).to(recon.dtype)  # [N, 1, F, H, W], broadcast over channels
        d = recon - x
        return (w * d.pow(2)).mean() + cfg.vae_l1 * (w * d.abs()).mean()
    return F.mse_loss(recon, x) + cfg.vae_l1 * F.l1_loss(recon, x)


@torch.no_grad()
def encode_means(vae, videos: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Posterior means (the pipeline's ``sample_mode="argmax"``), unnormalised."""
    return torch.cat([vae.encode(videos[i:i + batch]).latent_dist.mode() for i in range(0, len(videos), batch)])


def set_latent_stats(vae, means: torch.Tensor) -> None:
    """Record per-channel mean/std of the training latents in the VAE config, where the pipeline
    reads them to normalise latents (``(z - mean) / std``) and back."""
    mean = means.mean(dim=(0, 2, 3, 4))
    std = means.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                           latents_std=[round(float(v), 6) for v in std])


def normalise(vae, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


@torch.no_grad()
def conditions(pipe, videos: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The pipeline's I2V condition of each clip's first frame: [N, 4 + 16, latent frames, h, w].

    Batched equivalent of ``pipe.prepare_latents`` (which encodes one image at a time); a test checks
    they agree."""
    out = []
    for i in range(0, len(videos), batch):
        first = videos[i:i + batch, :, :1]
        blank = first.new_zeros(first.shape[0], 3, videos.shape[2] - 1, *videos.shape[3:])
        z = pipe.vae.encode(torch.cat([first, blank], dim=2)).latent_dist.mode()
        out.append(torch.cat([first_frame_mask(pipe, z), normalise(pipe.vae, z)], dim=1))
    return torch.cat(out)


def first_frame_mask(pipe, z: torch.Tensor) -> torch.Tensor:
    """The pipeline's mask channels: 1 on the (temporally packed) first frame, 0 elsewhere."""
    n, _, lf, h, w = z.shape
    st = pipe.vae_scale_factor_temporal
    mask = torch.zeros(n, st, lf, h, w)
    mask[:, :, 0] = 1.0
    return mask


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------
def sigma_range(expert: str, boundary_ratio: float) -> tuple[float, float]:
    """The sigmas (= timestep / 1000) an expert serves: high noise at or above the boundary."""
    return (boundary_ratio, 1.0) if expert == "high_noise" else (0.0, boundary_ratio)


def shift(u: torch.Tensor, s: float) -> torch.Tensor:
    return s * u / (1 + (s - 1) * u)


def unshift(sigma: float, s: float) -> float:
    return sigma / (s - (s - 1) * sigma)


def sample_sigmas(n: int, expert: str, cfg: TrainConfig, boundary_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Shifted-uniform sigmas restricted to the expert's range (the density sampling visits)."""
    lo, hi = sigma_range(expert, boundary_ratio)
    ulo, uhi = unshift(lo, cfg.flow_shift), unshift(hi, cfg.flow_shift)
    u = ulo + (uhi - ulo) * torch.rand(n, generator=gen)
    return shift(u, cfg.flow_shift).clamp(max(lo, 1e-3), hi)


def flow_loss(expert, x0, cond, text, sigma, noise) -> torch.Tensor:
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = expert(hidden_states=torch.cat([xt, cond], dim=1), timestep=sigma * 1000, encoder_hidden_states=text,
                  return_dict=False)[0]
    return F.mse_loss(pred.float(), noise - x0)


def train_expert(expert, name: str, data: dict, cfg: TrainConfig, boundary_ratio: float, gen: torch.Generator,
                 log) -> list[float]:
    expert.train()
    opt = torch.optim.AdamW(expert.parameters(), lr=cfg.expert_lr, weight_decay=0.01)
    losses = []
    for step in range(cfg.expert_steps):
        _set_lr(opt, cfg.expert_lr, step, cfg.expert_steps)
        idx = torch.randint(len(data["x0"]), (cfg.expert_batch,), generator=gen)
        text = data["text"][data["caption_index"][idx]]
        drop = torch.rand(cfg.expert_batch, generator=gen) < cfg.caption_dropout
        text = torch.where(drop.view(-1, 1, 1), data["empty_text"].expand_as(text), text)
        sigma = sample_sigmas(cfg.expert_batch, name, cfg, boundary_ratio, gen)
        noise = torch.randn(data["x0"][idx].shape, generator=gen)
        loss = flow_loss(expert, data["x0"][idx], data["cond"][idx], text, sigma, noise)
        _step(opt, loss, expert.parameters())
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.expert_steps - 1:
            log(f"{name} step {step + 1}/{cfg.expert_steps}: loss {loss.item():.4f}")
    expert.eval()
    return losses


EXPERT_MODULES = {"high_noise": "transformer", "low_noise": "transformer_2"}


def train_experts(pipe, data: dict, cfg: TrainConfig, boundary_ratio: float, echo: bool = True) -> dict:
    """Train both experts (in place), each from its own seeded generator, so they are independent:
    with ``cfg.parallel_experts`` in two processes at once (one core each), else one after the other;
    the weights are the same either way. Returns each expert's training losses."""
    jobs = [(getattr(pipe, attr), name, data, cfg, boundary_ratio, echo) for name, attr in EXPERT_MODULES.items()]
    if cfg.parallel_experts:
        ctx = torch.multiprocessing.get_context("spawn")  # fork would copy the parent's OpenMP state
        with ctx.Pool(len(jobs)) as pool:
            results = pool.starmap(_expert_job, jobs)
    else:
        results = [_expert_job(*job) for job in jobs]
    out = {}
    for (name, attr), (state, losses) in zip(EXPERT_MODULES.items(), results):
        getattr(pipe, attr).load_state_dict(state)
        out[name] = losses
    return out


def _expert_job(expert, name: str, data: dict, cfg: TrainConfig, boundary_ratio: float, echo: bool):
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(expert_seed(cfg.seed, name))
    start = time.perf_counter()
    log = (lambda m: print(f"[{name} {time.perf_counter() - start:7.1f}s] {m}", flush=True)) if echo else (lambda m: None)
    losses = train_expert(expert, name, data, cfg, boundary_ratio, gen, log)
    return {k: v.detach().clone() for k, v in expert.state_dict().items()}, losses


def expert_seed(seed: int, name: str) -> int:
    return seed * 10 + 1 + list(EXPERT_MODULES).index(name)


def _step(opt, loss: torch.Tensor, params) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1 (both stages train this way)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _set_lr(opt, base: float, step: int, total: int, warmup: int = 20) -> None:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------------------------------------
# text encoder
# ---------------------------------------------------------------------------------------------
CAPTION_FIELDS = {"motion": tuple(procedural.MOTIONS), "colour": tuple(procedural.COLOURS), "kind": procedural.KINDS,
                  "pan": tuple(procedural.PANS), "texture": procedural.TEXTURES}
OBJECT_FIELDS = ("motion", "colour", "kind")
CAPTION_TOKENS = 32  # a training caption is at most 26 tokens


def caption_attribute_labels(tokenizer, scenes: list[procedural.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, mask and per-token labels [N, tokens, len(CAPTION_FIELDS)] of the scenes' captions: a token
    of an object's phrase is labelled with that object's motion, colour and kind; every token with the
    caption's pan and texture; -100 where a field does not apply (padding, the object fields elsewhere)."""
    t = tokenizer([s.caption for s in scenes], padding="max_length", max_length=CAPTION_TOKENS, truncation=True,
                  return_tensors="pt", return_offsets_mapping=True)
    labels = torch.full((*t.input_ids.shape, len(CAPTION_FIELDS)), -100)
    fields = list(CAPTION_FIELDS)
    for i, scene in enumerate(scenes):
        spans, start = [], 0
        for thing in scene.things:
            begin = scene.caption.index(thing.phrase(), start)
            start = begin + len(thing.phrase())
            spans.append((begin, start, thing))
        for pos, (a, _) in enumerate(t.offset_mapping[i].tolist()):
            if not t.attention_mask[i, pos]:
                continue
            labels[i, pos, fields.index("pan")] = CAPTION_FIELDS["pan"].index(scene.pan)
            labels[i, pos, fields.index("texture")] = CAPTION_FIELDS["texture"].index(scene.texture)
            for begin, end, thing in spans:
                if begin <= a < end:
                    for f in OBJECT_FIELDS:
                        labels[i, pos, fields.index(f)] = CAPTION_FIELDS[f].index(getattr(thing, f))
    return t.input_ids, t.attention_mask, labels


def pretrain_text_encoder(text_encoder, tokenizer, cfg: TrainConfig, log) -> list[float]:
    """Teach the tiny UMT5 what each caption token binds to: from every token's output a linear head (then
    discarded) predicts the attributes ``caption_attribute_labels`` gives it, over captions of fresh random
    scenes (text only, nothing rendered). Seeded by ``cfg.seed``, apart from the VAE's and experts' draws."""
    scenes_rng, options = np.random.default_rng(cfg.seed * 10 + 7), cfg.data_options()
    ids, mask, labels = caption_attribute_labels(
        tokenizer, [procedural.random_scene(scenes_rng, options=options) for _ in range(cfg.text_pretrain_captions)])
    gen = torch.Generator().manual_seed(cfg.seed * 10 + 7)
    torch.manual_seed(cfg.seed * 10 + 7)
    sizes = [len(v) for v in CAPTION_FIELDS.values()]
    head = torch.nn.Linear(text_encoder.config.d_model, sum(sizes))
    params = list(text_encoder.parameters()) + list(head.parameters())
    text_encoder.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, weight_decay=0.0)
    losses = []
    for step in range(cfg.text_pretrain_steps):
        _set_lr(opt, cfg.text_pretrain_lr, step, cfg.text_pretrain_steps)
        idx = torch.randint(len(ids), (cfg.text_pretrain_batch,), generator=gen)
        loss = caption_attribute_loss(text_encoder, head, ids[idx], mask[idx], labels[idx], sizes)
        _step(opt, loss, params)
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.text_pretrain_steps - 1:
            log(f"text encoder step {step + 1}/{cfg.text_pretrain_steps}: loss {loss.item():.4f}")
    text_encoder.requires_grad_(False).eval()
    return losses


def caption_attribute_loss(text_encoder, head, ids, mask, labels, sizes) -> torch.Tensor:
    logits = head(text_encoder(ids, attention_mask=mask).last_hidden_state).split(sizes, dim=-1)
    return sum(F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten(), ignore_index=-100)
               for k, lg in enumerate(logits) if bool((labels[..., k] >= 0).any()))


@torch.no_grad()
def text_embeddings(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UMT5 embeddings of each distinct caption, each clip's index into them, and the empty prompt's."""
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    max_len = 64
    embeds = torch.cat([pipe.encode_prompt(unique[i:i + 64], do_classifier_free_guidance=False,
                                           max_sequence_length=max_len, device="cpu")[0]
                        for i in range(0, len(unique), 64)]).float()
    empty = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=max_len,
                               device="cpu")[0].float()
    return embeds, torch.tensor([where[c] for c in captions]), empty


def prepare_expert_data(pipe, videos: torch.Tensor, captions: list[str]) -> dict:
    text, caption_index, empty = text_embeddings(pipe, captions)
    return {"x0": normalise(pipe.vae, encode_means(pipe.vae, videos)), "cond": conditions(pipe, videos),
            "text": text, "caption_index": caption_index, "empty_text": empty}


# ---------------------------------------------------------------------------------------------
# held-out evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_losses(expert, name: str, data: dict, boundary_ratio: float, seed: int, points: int = 8) -> float:
    """Mean flow-matching loss over the held-out clips at ``points`` fixed sigmas of the expert's range,
    with fixed noise: the same numbers for every model compared."""
    lo, hi = sigma_range(name, boundary_ratio)
    sigmas = torch.linspace(lo, hi, points + 2)[1:-1] if name == "low_noise" else torch.linspace(lo, hi, points)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((points, *data["x0"].shape), generator=gen)
    text = data["text"][data["caption_index"]]
    total = 0.0
    for k, s in enumerate(sigmas):
        sigma = s.expand(len(data["x0"]))
        total += float(flow_loss(expert, data["x0"], data["cond"], text, sigma, noise[k]))
    return total / points


@torch.no_grad()
def mean_prediction_loss(train: dict, heldout: dict, name: str, boundary_ratio: float, seed: int,
                         points: int = 8) -> float:
    """The same held-out loss for a predictor of the training mean of the target (noise - x0)."""
    lo, hi = sigma_range(name, boundary_ratio)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((points, *heldout["x0"].shape), generator=gen)
    mean_target = -train["x0"].mean(dim=0, keepdim=True)
    return float(sum(F.mse_loss(mean_target.expand_as(heldout["x0"]), noise[k] - heldout["x0"])
                     for k in range(points)) / points)


@torch.no_grad()
def reconstruction_psnr(vae, videos: torch.Tensor) -> float:
    """PSNR (dB, 8-bit range) of decode(encode mean) over the clips."""
    recon = torch.cat([vae.decode(vae.encode(videos[i:i + 16]).latent_dist.mode()).sample.clamp(-1, 1)
                       for i in range(0, len(videos), 16)])
    mse = F.mse_loss((recon + 1) * 127.5, (videos + 1) * 127.5)
    return float(10 * torch.log10(255.0 ** 2 / mse))


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------
def build_untrained(seed: int):
    """The tiny pipeline with the retrained tokenizer and default-initialised (diffusers') VAE and experts."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    pipe = build_tiny_pipeline(weights="random")  # the frozen tiny UMT5, the scheduler, the boundary
    pipe.tokenizer = _build_tokenizer(tokenizer_corpus())
    torch.manual_seed(seed)
    pipe.vae = AutoencoderKLWan(**TINY_SPEC["vae"])
    pipe.transformer = WanTransformer3DModel(**TINY_SPEC["transformer"])
    pipe.transformer_2 = WanTransformer3DModel(**TINY_SPEC["transformer"])
    pipe.text_encoder.requires_grad_(False)
    return pipe


def train(cfg: TrainConfig, log=print, evaluate_heldout: bool = True) -> tuple[object, dict]:
    """Train everything; return the pipeline (fp32) and a record of losses, timings and (unless
    ``evaluate_heldout`` is off) the held-out evaluation. ``log=None`` is quiet."""
    torch.set_num_threads(cfg.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    echo, log = log is not None, log or (lambda m: None)
    train_seed, heldout_seed = split_seeds(cfg.seed)
    dims = dict(height=cfg.height, width=cfg.width, frames=cfg.frames, options=cfg.data_options())
    train_clips = procedural.make_clips(train_seed, cfg.train_clips, **dims)
    heldout_clips = procedural.make_clips(heldout_seed, cfg.heldout_clips, **dims)
    videos, heldout_videos = clips_tensor(train_clips), clips_tensor(heldout_clips)
    record: dict = {"config": asdict(cfg), "seconds": {"data": time.perf_counter() - t_start}}
    pipe = build_untrained(cfg.seed)
    boundary = float(pipe.config.boundary_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)

    t = time.perf_counter()
    vae_losses = train_vae(pipe.vae, videos, cfg, gen, log)
    record["vae_image_loss"], record["vae_loss"] = _ends(vae_losses["image"]), _ends(vae_losses["clip"])
    set_latent_stats(pipe.vae, encode_means(pipe.vae, videos))
    record["seconds"]["vae"] = time.perf_counter() - t

    if cfg.text_pretrain_steps:
        t = time.perf_counter()
        record["text_encoder_loss"] = _ends(pretrain_text_encoder(pipe.text_encoder, pipe.tokenizer, cfg, log))
        record["seconds"]["text_encoder"] = time.perf_counter() - t

    t = time.perf_counter()
    data = prepare_expert_data(pipe, videos, [c.caption for c in train_clips])
    held = prepare_expert_data(pipe, heldout_videos, [c.caption for c in heldout_clips])
    record["seconds"]["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    for name, losses in train_experts(pipe, data, cfg, boundary, echo=echo).items():
        record[f"{name}_loss"] = _ends(losses)
    record["seconds"]["experts"] = time.perf_counter() - t
    record["seconds"]["total"] = time.perf_counter() - t_start
    # CPU seconds of this process and its finished children (the expert processes)
    children = os.times()
    record["cpu_seconds"] = time.process_time() - cpu_start + children.children_user + children.children_system
    record["load_average"] = list(os.getloadavg())
    if evaluate_heldout:
        record["heldout"] = evaluate(pipe, data, held, heldout_videos, boundary, cfg.seed)
    return pipe, record


def evaluate(pipe, data: dict, held: dict, heldout_videos: torch.Tensor, boundary: float, seed: int) -> dict:
    """Held-out flow loss of each trained expert, of the random tiny model's experts and of the mean."""
    random_pipe = build_tiny_pipeline(weights="random")
    out = {"vae_psnr_db": reconstruction_psnr(pipe.vae, heldout_videos),
           "random_vae_psnr_db": reconstruction_psnr(random_pipe.vae.float(), heldout_videos)}
    for name, trained, rand in (("high_noise", pipe.transformer, random_pipe.transformer),
                                ("low_noise", pipe.transformer_2, random_pipe.transformer_2)):
        out[name] = {"trained": heldout_losses(trained, name, held, boundary, seed),
                     "random_tiny": heldout_losses(rand.float(), name, held, boundary, seed),
                     "train_mean": mean_prediction_loss(data, held, name, boundary, seed)}
    return out


def _ends(losses: list[float], k: int = 10) -> dict:
    if not losses:
        return {"first": None, "last": None, "steps": 0}
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "steps": len(losses)}


def save(pipe, record: dict, out_dir: Path) -> None:
    """The trained VAE and experts as safetensors (fp32, with their configs), the text encoder too where it was
    pre-trained (else ``model=tiny`` keeps the seeded random one), plus the training record."""
    from safetensors.torch import save_file

    from wanexp.io import atomic_path, write_json
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [("vae.safetensors", pipe.vae), (EXPERT_FILES["high_noise"], pipe.transformer),
               (EXPERT_FILES["low_noise"], pipe.transformer_2)]
    if record["config"].get("text_pretrain_steps"):
        modules.append((TEXT_ENCODER_FILE, pipe.text_encoder))
    else:
        (out_dir / TEXT_ENCODER_FILE).unlink(missing_ok=True)  # a stale one would be loaded with these weights
    for fname, module in modules:
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        # cloned: UMT5's embedding table is tied to its encoder's, and safetensors keeps no shared tensors
        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        with atomic_path(out_dir / fname) as tmp:
            save_file(state, str(tmp), metadata={"config": json.dumps(config, default=str)})
    write_json(out_dir / "train.json", record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wanexp.models.train_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the weights go (default: the package's)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    for f, v in asdict(TrainConfig()).items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(v, bool) else type(v)
        parser.add_argument(f"--{f.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args(argv)
    cfg = TrainConfig().quick() if args.quick else TrainConfig()
    cfg = TrainConfig(**{**asdict(cfg), **{f: getattr(args, f) for f in asdict(cfg) if getattr(args, f) is not None}})
    start = time.perf_counter()
    pipe, record = train(cfg, log=lambda m: print(f"[{time.perf_counter() - start:7.1f}s] {m}", flush=True))
    out = args.out or TRAINED_WEIGHTS
    save(pipe, record, out)
    print(json.dumps({k: record.get(k) for k in ("seconds", "cpu_seconds", "load_average", "heldout")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
