"""What produced a result: wanexp's version and git commit, the library versions, the device, the date.

Every results row (and so every W&B run and ablation table) carries these columns, so a number can
be traced to the code and machine that made it.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from wanexp.version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout wanexp runs from (``+dirty`` with uncommitted changes to tracked
    files); None when it is not a git checkout or git is absent."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def device_name(device) -> str:
    """``NVIDIA H200`` for a CUDA device; ``cpu (<model name>)`` otherwise."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model})" if model else "cpu"


def provenance(device) -> dict[str, str | None]:
    import diffusers
    import torch

    return {"wanexp_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__, "cuda_version": torch.version.cuda,
            "device_name": device_name(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
