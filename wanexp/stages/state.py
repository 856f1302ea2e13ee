"""Run: what the stages of one run share — its config, its directory, its samples and the (lazily
loaded) pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from wanexp.console import progress, say
from wanexp.data import load_splits
from wanexp.distributed import World
from wanexp.errors import WanexpError
from wanexp.guard import install_guard
from wanexp.io import read_json, rebased, write_json
from wanexp.models import experts, load_pipeline, model_fingerprint
from wanexp.quant.linear import QuantLinear
from wanexp.rundir import RunDir
from wanexp.stages.calibrate import contexts_of


class Run:
    """State shared by the stages of one run: config, directory, and the (lazily loaded) pipeline."""

    def __init__(self, cfg: DictConfig, run_dir: Path, world: World | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dir = RunDir(self.run_dir)
        self.world = world or World()
        self.device = device_of(str(cfg.device), self.world.local_rank)
        self._pipe = None
        self._pipe_quantized = False
        self._splits = None
        self._told_moved = False
        self.inputs: dict[str, dict] = {}     # per stage, what its outputs depend on (wanexp.config)
        self.extra_timings: dict[str, list] = {}  # generate: videos timed in this process beyond those it made
        self.artifact_sha256: str | None = None   # the data hash of the artifact loaded into the pipeline

    # -- bookkeeping ---------------------------------------------------------------------------
    def marker(self, stage: str) -> Path:
        return self.dir.marker(stage)

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict) -> None:
        write_json(self.marker(stage), dict(info, inputs=self.inputs.get(stage), run_dir=str(self.run_dir)))

    def progress(self, iterable, desc: str):
        return progress(iterable, desc, enabled=bool(self.cfg.progress))

    def recorded(self, info: dict, key: str) -> Path:
        """A path a stage recorded, read from where the run directory is now (it may have moved)."""
        old = info.get("run_dir")
        if old and Path(old) != self.run_dir and not self._told_moved:
            say(f"wanexp: {self.run_dir} was recorded at {old}; paths inside it are read from here")
            self._told_moved = True
        return rebased(info[key], old, self.run_dir)

    # -- inputs --------------------------------------------------------------------------------
    @property
    def splits(self):
        if self._splits is None:
            self._splits = load_splits(OmegaConf.to_container(self.cfg.data, resolve=True), self.cfg.paths.cache_dir)
        return self._splits

    def bf16_pipe(self):
        """The unquantized pipeline (reloaded if a previous stage quantized the one in memory)."""
        if self._pipe is None or self._pipe_quantized:
            self._pipe = None
            self._pipe = load_pipeline(OmegaConf.to_container(self.cfg.model, resolve=True),
                                       self.cfg.paths.cache_dir, self.device)
            self._pipe_quantized = False
            guard(self._pipe)
            fingerprint = model_fingerprint(self._pipe)
            model_file = self.dir.model
            if model_file.is_file() and read_json(model_file)["fingerprint"] != fingerprint:
                raise WanexpError(f"{self.run_dir} was started with base model {read_json(model_file)['fingerprint']}, "
                                  f"but model={self.cfg.model.name} is {fingerprint}; use a new run directory")
            write_json(model_file, {"fingerprint": fingerprint, "name": self.cfg.model.name})
        return self._pipe

    @property
    def fingerprint(self) -> str:
        if not self.dir.model.is_file():
            self.bf16_pipe()
        return read_json(self.dir.model)["fingerprint"]

    def contexts(self, pipe) -> dict:
        """Each expert's timestep bins, following the generation's step schedule (README "LoRAs and short schedules")."""
        return contexts_of(self.cfg, pipe)


def guard(pipe) -> None:
    """Stop at the first NaN/Inf a layer produces, naming layer, expert and timestep (wanexp.guard)."""
    def step_of(t: float) -> str:
        steps = [float(x) for x in getattr(pipe.scheduler, "timesteps", [])]
        hit = [i for i, x in enumerate(steps) if abs(x - t) < 1e-3]
        return f"denoising step {hit[0] + 1} of {len(steps)}" if hit else "outside the schedule"
    install_guard(experts(pipe), step_of, quantized=lambda m: isinstance(m, QuantLinear))


def device_of(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # one GPU per rank of a torchrun job
        device = torch.device("cuda", local_rank)
    return device
