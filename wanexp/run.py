"""The stage loop of one run: calibrate → quantize → generate → evaluate → report (→ analyze).

Each stage writes into the run directory and marks itself done (``stages/<name>.json``) only after
its outputs are on disk; ``stage=all`` skips finished stages, so a re-run after a crash redoes
nothing that completed, and ``stage=<name>`` re-enters one stage on an existing run directory.
What each stage does lives in ``wanexp.stages``; this module decides the order, the markers, the
errors and which rank runs what. It is the only module that knows every other room.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from wanexp.analysis import qualitative_settings
from wanexp.config import (check_format_options, check_legacy_config, check_settings, check_writable, resume_plan,
                           sample_identity, stage_inputs)
from wanexp.console import say, snapshot, written
from wanexp.data.check import check_run_data
from wanexp.distributed import drop_orphan_dir, world_from_env
from wanexp.errors import WanexpError
from wanexp.evaluate.vbench import MOTION_MIN_SIDE, validate_dimensions
from wanexp.formats import FORMAT_NAMES, max_keep_blocks
from wanexp.io import read_json, write_json
from wanexp.models import EXPERTS
from wanexp.models.lora import check_specs
from wanexp.quant.artifact import verify_artifact
from wanexp.quant.methods import validate_quant_cfg
from wanexp.quant.recipes import check_method
from wanexp.rundir import RunDir
from wanexp.stages import OPTIONAL_STAGES, STAGES
from wanexp.stages.analyze import analyze
from wanexp.stages.calibrate import calibrate
from wanexp.stages.evaluate import evaluate
from wanexp.stages.generate import generate, generation_summary
from wanexp.stages.quantize import artifact_expect, artifact_path, keep_lists, quantize
from wanexp.stages.report import report
from wanexp.stages.state import Run

# What each stage's outputs depend on, and so which settings may change when a run directory is
# resumed, is stated in wanexp.config (OWNERS, REDOABLE); each stage marker records its inputs.


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Execute ``cfg.stage`` (or every unfinished stage) in ``run_dir``; returns the run summary.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0's run directory is used by all,
    rank 0 alone calibrates, quantizes, evaluates and reports, and every rank generates its share."""
    world = world_from_env()
    own_dir, run_dir = Path(run_dir).resolve(), Path(world.broadcast(str(Path(run_dir).resolve())))
    drop_orphan_dir(own_dir, run_dir)
    stage = "setup"
    try:
        validate(cfg)
        state = Run(cfg, run_dir, world)
        wanted = STAGES if cfg.stage == "all" else (str(cfg.stage),)
        wanted += OPTIONAL_STAGES if cfg.stage == "all" and (cfg.get("analysis") or {}).get("auto") else ()
        todo = None
        check_run_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.cache_dir)
        if world.main:
            check_writable(cfg, run_dir)
            todo = _setup(state, wanted)
            state.dir.error.unlink(missing_ok=True)  # this attempt replaces an earlier failed one
        todo = world.broadcast(todo)
        state.inputs = world.broadcast(state.inputs)
        for k, stage in enumerate(wanted, 1):
            heading = f"[{k}/{len(wanted)}] {stage}"
            if stage not in todo:
                if world.main and todo:
                    say(f"{heading}: finished earlier")
                continue
            if world.main:
                say(heading)
                before = snapshot(_written_dirs(state, stage))
            start = time.perf_counter()
            info = _STAGE_FUNCS[stage](state) if world.main or stage in PER_RANK or stage in ALL_RANKS else None
            if stage in PER_RANK or stage in ("calibrate", "quantize"):
                world.barrier()  # the next stage needs every rank's files (or rank 0's artifact)
            if stage in PER_RANK and world.main:
                info = PER_RANK[stage](state)
            if info is not None and world.main:
                info["seconds"] = round(time.perf_counter() - start, 3)
                state.mark_done(stage, info)
                # a stage that did nothing says why (analyze's per-figure skips are printed by analyze)
                outcome = f"skipped: {info['skipped']}" if isinstance(info.get("skipped"), str) else \
                    f"wrote {written(before, snapshot(_written_dirs(state, stage)), run_dir)}"
                say(f"      {stage} done in {info['seconds']:.1f} s; {outcome}")
    except BaseException as err:
        RunDir(run_dir).record_error(f"{stage} (rank {world.rank})" if world.size > 1 else stage, err)
        raise
    if not world.main:
        return {}
    summary = RunDir(run_dir).summary
    return read_json(summary) if summary.is_file() else {}


def _setup(state: Run, wanted: tuple[str, ...]) -> list[str]:
    """Read the samples, decide what a re-run here may do (wanexp.config.resume_plan: per stage,
    what its outputs depend on), record the configuration; returns the stages to run."""
    cfg, run_dir = state.cfg, state.run_dir
    config = OmegaConf.to_container(cfg, resolve=True)
    samples = {"calib": sample_identity(state.splits.calib), "eval": sample_identity(state.splits.eval)}
    state.inputs = stage_inputs(json.loads(json.dumps(config, default=str)), samples)
    finished = {s: read_json(state.marker(s)) for s in (*STAGES, *OPTIONAL_STAGES) if state.done(s)}
    check_legacy_config(config, run_dir, finished)
    plan = resume_plan(finished, state.inputs, wanted, run_dir, explicit=cfg.stage != "all")
    record = state.dir.config
    if not record.is_file() or read_json(record) != json.loads(json.dumps(config, default=str)):
        write_json(record, config)  # the configuration of the latest attempt (reports read method and format)
    say(f"wanexp: run directory {run_dir}")
    for note in plan.notes:
        say(f"wanexp: {note}")
    todo = [s for s in wanted if cfg.stage != "all" or s not in finished or s in plan.redo]
    if cfg.quant.get("load") and cfg.quant.name != "bf16" and {"quantize", "generate"} & set(todo):
        verify_artifact(artifact_path(state), artifact_expect(cfg))  # a reused artifact: checked before any model loads
    if not todo:
        say(f"wanexp: nothing to do: every stage of {run_dir} is finished "
            "(stage=<name> runs one again; a new run directory starts over)")
    return todo


def _written_dirs(state: Run, stage: str) -> list[Path]:
    """Where a stage writes: the run directory, and the shared cache it fills."""
    cache = {"calibrate": state.cfg.paths.get("calib_cache"), "generate": state.cfg.paths.get("reference_cache")}.get(stage)
    return [state.run_dir] + ([Path(str(cache)).expanduser().resolve()] if cache else [])


def validate(cfg: DictConfig) -> None:
    """Refuse bad values before any heavy work, with one message naming the key."""
    check_settings(cfg)  # every numeric and choice setting in range (wanexp.config.SETTINGS)
    if cfg.stage not in (*STAGES, *OPTIONAL_STAGES, "all"):
        raise WanexpError(f"stage={cfg.stage} is not one of all, {', '.join(STAGES + OPTIONAL_STAGES)}")
    if "vbench" in (cfg.evaluate.get("metrics") or ()):
        dims = validate_dimensions(cfg.evaluate.vbench.dimensions)  # a typo fails now, not after generation
        side = min(int(cfg.model.generation.height), int(cfg.model.generation.width))
        if "motion_smoothness" in dims and -(-side // 16) * 16 < MOTION_MIN_SIDE:
            raise WanexpError(f"evaluate.vbench: motion_smoothness (AMT-S) needs frames of at least "
                              f"{MOTION_MIN_SIDE - 15} pixels a side, but model.generation makes "
                              f"{cfg.model.generation.width}×{cfg.model.generation.height}; drop the dimension "
                              "(evaluate.vbench.dimensions=[…]) or generate larger videos")
    qualitative_settings(OmegaConf.to_container(cfg.analysis, resolve=True) if "analysis" in cfg else {})
    check_method(cfg.quant.name)  # the registry (wanexp.quant.recipes)
    validate_quant_cfg(OmegaConf.to_container(cfg.quant, resolve=True), list(cfg.model.generation))
    if cfg.quant.get("bin_rule") == "step_fraction" and cfg.expert.policy == "shared":
        raise WanexpError("quant.bin_rule=step_fraction cuts each expert's own steps; expert=shared has one set "
                          "of bins over the whole trajectory (use bin_rule=equal_width or quant.bin_edges)")
    if cfg.format.name not in FORMAT_NAMES:
        raise WanexpError(f"format.name={cfg.format.name} is unknown; available: {', '.join(FORMAT_NAMES)}")
    if cfg.expert.policy not in ("per_expert", "shared"):
        raise WanexpError(f"expert.policy={cfg.expert.policy} is not one of per_expert, shared")
    for expert in EXPERTS:
        blocks, _ = keep_lists(cfg, expert)
        limit = cfg.expert.get("max_keep_blocks")
        limit = max_keep_blocks(cfg.format.name) if limit in (None, "auto") else int(limit)
        if limit is not None and len(blocks) > limit:
            raise WanexpError(f"{len(blocks)} blocks kept in high precision for {expert} ({blocks}) but the "
                              f"{cfg.format.name} rule allows at most {limit} (expert.max_keep_blocks)")
    if str(cfg.device) not in ("auto", "cpu") and not str(cfg.device).startswith("cuda"):
        raise WanexpError(f"device={cfg.device} is not one of auto, cpu, cuda[:N]")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise WanexpError(f"device={cfg.device} but no CUDA device is available (use device=auto or cpu)")
    check_format_options(cfg)
    if (cfg.get("attention") or {}).get("name", "bf16") != "bf16" and cfg.quant.name == "bf16":
        raise WanexpError(f"attention={cfg.attention.name} composes with a quantized method; quant=bf16 is the "
                          "run every other is compared to, so its attention stays bf16")
    check_specs(OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None)


_STAGE_FUNCS = {"calibrate": calibrate, "quantize": quantize, "generate": generate, "evaluate": evaluate,
                "report": report, "analyze": analyze}
# Stages every rank runs on its own share of the samples, with what rank 0 does once all shards
# are in; the other stages run on rank 0 alone.
PER_RANK = {"generate": generation_summary}
# Stages every rank takes part in, rank 0 recording the result: calibration is data parallel
# (each rank denoises its share of the calibration samples; wanexp.calib.reduce combines them).
ALL_RANKS = ("calibrate",)
