"""Safetensors files that carry a SHA-256 of every tensor, checked whenever they are read.

The quantized artifact, the calibration statistics parts and the cached reference latents are
reused across runs and sweeps; a flipped byte in any of them would silently change every number
computed from it. Each is written with ``save_tensors`` (the digests go into the safetensors header
under ``wanexp.sha256``) and read with ``load_tensors``, which refuses a file whose tensor bytes no
longer match, naming the tensor. ``file_digest`` is one hash for the whole file's data (the hash
of the per-tensor digests), cheap to compute once the tensors are checked: runs that reuse a file
record it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping

from wanexp.errors import WanexpError
from wanexp.io import atomic_path

DIGESTS_KEY = "wanexp.sha256"


def tensor_sha256(t) -> str:
    """SHA-256 of a tensor's bytes as stored (dtype and shape are in the safetensors header)."""
    import torch
    flat = t.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def file_digest(digests: Mapping[str, str]) -> str:
    """One hash of a file's data: the SHA-256 of its sorted ``name:digest`` lines."""
    blob = "".join(f"{k}:{digests[k]}\n" for k in sorted(digests)).encode()
    return hashlib.sha256(blob).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` atomically with their digests in the header; returns the file digest."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digests = {k: tensor_sha256(v) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), DIGESTS_KEY: json.dumps(digests, sort_keys=True)})
    return file_digest(digests)


def read_metadata(path: str | os.PathLike, what: str) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise WanexpError(f"{what} {path} is corrupt or not a safetensors file ({err})") from err


def load_tensors(path: str | os.PathLike, what: str, fix: str,
                 select: Callable[[str], bool] | None = None) -> tuple[dict, dict[str, str], str]:
    """(tensors on the CPU, the header metadata, the file digest), every tensor checked against
    its recorded digest. ``what`` names the file in messages, ``fix`` says what to do about a bad
    one; ``select`` reads only the tensors whose name it accepts (each still checked)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise WanexpError(f"{what} {path} does not exist; {fix}")
    meta = read_metadata(path, what)
    if DIGESTS_KEY not in meta:
        raise WanexpError(f"{what} {path} carries no checksums (written by an older wanexp); {fix}")
    digests = json.loads(meta[DIGESTS_KEY])
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            wanted = names if select is None else [k for k in names if select(k)]
            tensors = {k: f.get_tensor(k) for k in wanted}
    except Exception as err:
        raise WanexpError(f"{what} {path} is corrupt ({err}); {fix}") from err
    if set(names) != set(digests):
        odd = sorted(set(names) ^ set(digests))
        raise WanexpError(f"{what} {path} does not hold the tensors its checksums list ({', '.join(odd[:3])}"
                          f"{' …' if len(odd) > 3 else ''}); {fix}")
    bad = [k for k, t in tensors.items() if tensor_sha256(t) != digests[k]]
    if bad:
        raise WanexpError(f"{what} {path}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
                          f"does not match its checksum: the file was modified or damaged; {fix}")
    return tensors, meta, file_digest(digests)
