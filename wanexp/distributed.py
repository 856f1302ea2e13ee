"""One run over several processes (``torchrun``, or ``srun`` with torchrun's variables set).

The ranks agree on one run directory and meet at barriers. Calibration is data parallel: every
rank denoises its share of the calibration samples and the statistics are reduced to rank 0
through the process group (``wanexp.calib.reduce``: gloo for CPU tensors, NCCL for CUDA tensors);
rank 0 quantizes, every rank generates its own share of the evaluation samples (its own manifest
shard), and rank 0 evaluates and reports once every shard is in. Model weights never cross it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every ``size``-th item from ``rank`` (deterministic, order kept)."""
        return list(items)[self.rank::self.size]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def world_from_env(timeout_s: float = 24 * 3600) -> World:
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process
    otherwise. Under plain ``srun`` the Slurm task ids are used when MASTER_ADDR/PORT are exported.

    The timeout bounds how long ranks wait for rank 0's calibration: a day by default, since GPTQ
    over both A14B experts takes hours (a dead peer is still noticed at once: its sockets close)."""
    env = os.environ
    if "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in env:
        env = dict(env, RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        os.environ.update({k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist
    if not dist.is_initialized():
        import atexit
        import torch
        # objects and CPU tensors over gloo; CUDA tensors (the calibration statistics on the GPU) over NCCL
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():  # NCCL collectives and barriers use this rank's own GPU
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(env.get("LOCAL_RANK", "0")))


def drop_orphan_dir(own: Path, shared: Path) -> None:
    """Hydra made a run dir for this rank too; when it is not the shared one and holds only Hydra's
    record, remove it so one run leaves one directory."""
    own, shared = Path(own).resolve(), Path(shared).resolve()
    if own == shared or not own.is_dir():
        return
    if {p.name for p in own.iterdir()} <= {".hydra", "wanexp.log"}:
        shutil.rmtree(own, ignore_errors=True)
