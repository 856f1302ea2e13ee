"""Video generation: one mp4 and one latent file per (variant, sample), resumable through a manifest.

Every sample gets a seed derived from (run seed, sample id), so the BF16 reference and each quantized
variant of the same sample start from the same noise, in any order, on any number of processes.
A video is written (atomically) before its manifest line; a crash loses at most the video in flight,
and a re-run skips every sample whose manifest line and files exist.
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
from wanexp.io import append_jsonl, atomic_path, read_jsonl

MANIFEST = "manifest.jsonl"


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
    blob = repr((fingerprint, sorted((k, str(v)) for k, v in gen_cfg.items()), seed)).encode()
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


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    with atomic_path(path) as tmp:
        # ffmpeg picks the container from the extension, so the temporary name must end in .mp4 too
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
                                             macro_block_size=1, output_params=["-crf", str(crf), "-f", "mp4"],
                                             ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


def read_mp4(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames)


def generate_videos(pipe, samples: Iterable[Sample], out_dir: Path, gen_cfg: Mapping[str, Any], seed: int,
                    variant: str, progress: Callable[[Iterable], Iterable] = lambda it: it,
                    manifest: str = MANIFEST, poll_s: float = 5.0, stale_s: float = 900.0) -> list[dict]:
    """Generate every sample not yet in ``out_dir``'s manifests, appending to ``manifest``; returns all
    records for ``samples``.

    Several processes may fill one directory at once (the parallel jobs of a sweep share the BF16
    reference cache): each video is claimed first, a sample claimed by another live process is left
    to it and waited for, and a claim whose process died is taken over."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    samples = list(samples)
    done = done_records(out_dir)
    pending = [s for s in samples if s.id not in done]
    on_cuda = pipe._execution_device.type == "cuda"
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
                if on_cuda:  # the peak of this video alone, weights held included
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                latents, video = generate_one(pipe, sample, gen_cfg, s_seed, on_step=claim.touch)
                seconds = time.perf_counter() - start
                lat_rel, vid_rel = Path("latents") / f"{sample.id}.safetensors", Path("videos") / f"{sample.id}.mp4"
                with atomic_path(out_dir / lat_rel) as tmp:
                    save_file({"latents": latents.contiguous()}, str(tmp))
                write_mp4(out_dir / vid_rel, video, fps=int(gen_cfg.get("fps", 16)), crf=int(gen_cfg.get("crf", 12)))
                record = {"id": sample.id, "category": sample.category, "prompt": sample.prompt, "variant": variant,
                          "seed": s_seed, "video": str(vid_rel), "latents": str(lat_rel), "seconds": round(seconds, 3),
                          "frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2])}
                if on_cuda:
                    record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
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
