"""What the GPU experiment scripts here write: one JSON record a run, its header naming the machine and
versions, rewritten atomically after each measurement (a run cut by its timeout keeps what it measured); and the
FP8 probes' shared operands."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch


def gpu_record(**fields) -> dict:
    import triton
    return {"gpu": torch.cuda.get_device_name(), "date": str(datetime.datetime.now(datetime.timezone.utc)),
            "torch": torch.__version__, "triton": triton.__version__, **fields}


def save_record(record: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{name}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_dir / name)


def fp8_operands(m: int, k: int, n: int, g):
    """A Wan-shaped FP8 linear's operands as the MXFP4 fold makes them, drawn from the CUDA generator ``g``:
    E4M3 ``a8 [m, k]`` and ``w8 [n, k]``, power-of-two row / column scales, a bf16 bias and a rank-32 branch
    (T [m, 32], L1 [n, 32])."""
    a8 = (torch.randn(m, k, device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
    w8 = (torch.randn(n, k, device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
    sa = 2.0 ** torch.randint(-14, -8, (m,), device="cuda", generator=g).float()
    sw = 2.0 ** torch.randint(-14, -8, (n,), device="cuda", generator=g).float()
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    t = (torch.randn(m, 32, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    up = (torch.randn(n, 32, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    return a8, w8, sa, sw, bias, t, up
