"""mp4 files of generated videos: written atomically (x264, yuv420p), read back as uint8 frames.

Its own room so that evaluation and analysis read videos without importing generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wanexp.io import atomic_path


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
