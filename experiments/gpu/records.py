"""What the GPU experiment scripts here write: one JSON record a run, its header naming the machine and
versions, rewritten atomically after each measurement (a run cut by its timeout keeps what it measured)."""

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
