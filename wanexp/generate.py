"""Video generation: one mp4 and one latent file per (variant, sample), resumable through a manifest.

Every sample gets a seed derived from (run seed, sample id), so the BF16 reference and each quantized
variant of the same sample start from the same noise, in any order, on any number of processes.
A video is written (atomically) before its manifest line; a crash loses at most the video in flight,
and a re-run skips every sample whose manifest line and files exist.

Timing: each record holds the seconds of its generation and the process that made it; a process
warms each pipeline up (``warmup_steps``: a short untimed generation) before its first timed video,
so a run's figures never include one-time costs and never come from another process's cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from wanexp.data import Sample
from wanexp.io import append_jsonl, read_jsonl
from wanexp.video import read_mp4, write_mp4  # noqa: F401 (read_mp4: re-exported for callers)

MANIFEST = "manifest.jsonl"
# This process, as recorded beside each video it times: a run's figures come only from its own videos.
PROCESS = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
# Bump when the files of a reference set change form, so older caches are not reused (2: latents checksummed).
REFERENCE_FORMAT = 2


def sample_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:4], "little")


def manifest_name(rank: int = 0, world_size: int = 1) -> str:
    """One manifest per process, so ranks never append to the same file (``manifest.rank1.jsonl``)."""
    return MANIFEST if world_size == 1 else f"manifest.rank{rank}.jsonl"


def done_records(out_dir: Path) -> dict[str, dict]:
    """Records of every manifest shard whose files still exist, by sample id (the last line wins)."""
    records = {}
    for shard in sorted(Path(out_dir).glob("manifest*.jsonl")):
        for rec in read_jsonl(shard):
            if (out_dir / rec["video"]).is_file() and (out_dir / rec["latents"]).is_file():
                records[rec["id"]] = rec
    return records


def generation_key(fingerprint: str, gen_cfg: Mapping[str, Any], seed: int) -> str:
    """Content address of a set of videos: same model, same sampling settings, same seed → same videos."""
    blob = repr((fingerprint, sorted((k, str(v)) for k, v in gen_cfg.items()), seed, REFERENCE_FORMAT)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def generate_one(pipe, sample: Sample, gen_cfg: Mapping[str, Any], seed: int,
                 on_step: Callable[[], Any] | None = None, decode: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
    """Denoise one sample; returns (latents [1, C, F, H, W] float32 on CPU, video uint8 [F, H, W, 3],
    None with ``decode=False``). ``on_step`` is called after every denoising step (a heartbeat).
    ``gen_cfg["freeze_condition_latent"]``: after the last step, the first latent frame is reset to
    the conditioning image's latent (the seed paper code's inference, on by default there)."""
    device = pipe._execution_device
    image = sample.load_image().resize((int(gen_cfg["width"]), int(gen_cfg["height"])))
    kwargs = dict(image=image, prompt=sample.prompt, negative_prompt=gen_cfg.get("negative_prompt") or None,
                  height=int(gen_cfg["height"]), width=int(gen_cfg["width"]), num_frames=int(gen_cfg["num_frames"]),
                  num_inference_steps=int(gen_cfg["num_inference_steps"]),
                  guidance_scale=float(gen_cfg["guidance_scale"]),
                  generator=torch.Generator(device="cpu").manual_seed(seed), output_type="latent")
    if gen_cfg.get("guidance_scale_2") is not None:
        kwargs["guidance_scale_2"] = float(gen_cfg["guidance_scale_2"])
    if gen_cfg.get("max_sequence_length"):
        kwargs["max_sequence_length"] = int(gen_cfg["max_sequence_length"])
    freeze = bool(gen_cfg.get("freeze_condition_latent"))
    with _captured_condition(pipe) if freeze else contextlib.nullcontext({}) as captured:
        def step_end(_pipe, i, _t, tensors):
            if on_step is not None:
                on_step()
            if freeze and i == _pipe.num_timesteps - 1 and "condition" in captured:
                tensors["latents"] = freeze_first_frame(tensors["latents"], captured["condition"])
            return tensors
        if on_step is not None or freeze:
            kwargs["callback_on_step_end"] = step_end
        latents = pipe(**kwargs).frames
    video = decode_latents(pipe, latents.to(device)) if decode else None
    return latents.float().cpu(), video


def freeze_first_frame(latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``latents`` with latent frame 0 replaced by the conditioning image's latent, the last ``C``
    channels of the pipeline's ``condition`` (the mask channels come first)."""
    out = latents.clone()
    out[:, :, 0] = condition[:, -latents.shape[1]:, 0].to(out.dtype)
    return out


@contextlib.contextmanager
def _captured_condition(pipe):
    """Record the ``condition`` that the I2V pipeline's ``prepare_latents`` returns (mask + VAE latent
    of the image; diffusers passes it to no callback). Pipelines whose ``prepare_latents`` also returns
    a first-frame mask (``expand_timesteps``) already put the image latent back after the loop: nothing
    is recorded for them."""
    captured: dict[str, torch.Tensor] = {}
    own = pipe.__dict__.get("prepare_latents")
    original = pipe.prepare_latents

    def prepare_latents(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 2:
            captured["condition"] = out[1]
        return out

    pipe.prepare_latents = prepare_latents
    try:
        yield captured
    finally:
        if own is None:
            del pipe.prepare_latents
        else:
            pipe.prepare_latents = own


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """The pipeline's own latent → pixel path (un-normalise, VAE decode, postprocess) as uint8 frames."""
    vae = pipe.vae
    z = latents.to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    video = vae.decode(z * std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]  # [F, H, W, 3] in [0, 1]
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generate_videos(pipe, samples: Iterable[Sample], out_dir: Path, gen_cfg: Mapping[str, Any], seed: int,
                    variant: str, progress: Callable[[Iterable], Iterable] = lambda it: it,
                    manifest: str = MANIFEST, poll_s: float = 5.0, stale_s: float = 900.0,
                    warmup_steps: int = 0) -> list[dict]:
    """Generate every sample not yet in ``out_dir``'s manifests, appending to ``manifest``; returns all
    records for ``samples``. Before the first video it makes, a ``warmup_steps`` generation (untimed,
    not kept) takes the one-time costs out of the timings.

    Several processes may fill one directory at once (the parallel jobs of a sweep share the BF16
    reference cache): each video is claimed first, a sample claimed by another live process is left
    to it and waited for, and a claim whose process died is taken over."""
    from wanexp.integrity import save_tensors

    out_dir = Path(out_dir)
    samples = list(samples)
    done = done_records(out_dir)
    pending = [s for s in samples if s.id not in done]
    on_cuda = pipe._execution_device.type == "cuda"
    warm = warmup_steps <= 0
    while pending:
        waiting = []
        for sample in progress(pending):
            claim = _claim(out_dir / CLAIMS / sample.id, stale_s)
            if claim is None:
                waiting.append(sample)
                continue
            try:
                if sample.id in done_records(out_dir):  # finished by another process meanwhile
                    continue
                s_seed = sample_seed(seed, sample.id)
                if not warm:
                    warm_up(pipe, sample, gen_cfg, s_seed, warmup_steps)
                    warm = True
                latents, video, timing = timed_generation(pipe, sample, gen_cfg, s_seed, on_step=claim.touch)
                lat_rel, vid_rel = Path("latents") / f"{sample.id}.safetensors", Path("videos") / f"{sample.id}.mp4"
                digest = save_tensors(out_dir / lat_rel, {"latents": latents})  # checksummed: checked when read
                write_mp4(out_dir / vid_rel, video, fps=int(gen_cfg.get("fps", 16)), crf=int(gen_cfg.get("crf", 12)))
                record = {"id": sample.id, "category": sample.category, "prompt": sample.prompt, "variant": variant,
                          "seed": s_seed, "video": str(vid_rel), "latents": str(lat_rel), "latents_sha256": digest,
                          "frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2]),
                          **timing}
                append_jsonl(out_dir / manifest, record)
            finally:
                claim.unlink(missing_ok=True)
        done = done_records(out_dir)
        pending = [s for s in waiting if s.id not in done]
        if pending:
            time.sleep(poll_s)
    with contextlib.suppress(OSError):
        (out_dir / CLAIMS).rmdir()  # only when empty: no other process is at work here
    return [done[s.id] for s in samples]


def timed_generation(pipe, sample: Sample, gen_cfg: Mapping[str, Any], seed: int,
                     on_step: Callable[[], Any] | None = None) -> tuple[torch.Tensor, np.ndarray, dict]:
    """``generate_one`` with its wall time, the process that measured it and, on CUDA, the peak
    memory of this video alone (weights held included)."""
    on_cuda = pipe._execution_device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    latents, video = generate_one(pipe, sample, gen_cfg, seed, on_step=on_step)
    if on_cuda:
        torch.cuda.synchronize()
    timing = {"seconds": round(time.perf_counter() - start, 3), "process": PROCESS}
    if on_cuda:
        timing["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return latents, video, timing


def warm_up(pipe, sample: Sample, gen_cfg: Mapping[str, Any], seed: int, steps: int) -> None:
    """A short untimed generation (``steps`` denoising steps, same size): the first call of a
    pipeline in a process pays one-time costs (allocations, kernel selection) no later video pays."""
    from wanexp.errors import WanexpError
    short = dict(gen_cfg, num_inference_steps=max(1, min(int(steps), int(gen_cfg["num_inference_steps"]))))
    try:
        generate_one(pipe, sample, short, seed)
    except WanexpError as err:  # e.g. a NaN: say it happened in the short warm-up, not in a video
        raise type(err)(f"{err} [during the {short['num_inference_steps']}-step warm-up generation]") from err


def time_videos(pipe, samples: Iterable[Sample], gen_cfg: Mapping[str, Any], seed: int, warmup_steps: int) -> list[dict]:
    """Time the generation of ``samples`` in this process after a warm-up, keeping nothing but the
    timings (the videos themselves are on disk already, made by another process)."""
    samples = list(samples)
    if samples and warmup_steps > 0:
        warm_up(pipe, samples[0], gen_cfg, sample_seed(seed, samples[0].id), warmup_steps)
    return [{"id": s.id, **timed_generation(pipe, s, gen_cfg, sample_seed(seed, s.id))[2]} for s in samples]


CLAIMS = "claims"


def _claim(path: Path, stale_s: float) -> Path | None:
    """Create ``path`` exclusively (host and pid inside); None while another live process holds it.
    A claim is stale when its process is gone (same host) or untouched for ``stale_s`` seconds
    (another host: the claimant touches it at every denoising step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _stale(path, stale_s):
                return None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return path
    return None


def _stale(path: Path, stale_s: float) -> bool:
    try:
        holder, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
    except (OSError, ValueError):  # vanished, or half-written by a process that died at that moment
        return path.exists()
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > stale_s
