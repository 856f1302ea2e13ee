"""The stage sequence of one run: calibrate → quantize → generate → evaluate → report.

Each stage writes into the run directory and marks itself done (``stages/<name>.json``) only after
its outputs are on disk; ``stage=all`` skips finished stages, so a re-run after a crash redoes
nothing that completed, and ``stage=<name>`` re-enters one stage on an existing run directory.
This is the only module that knows every other room.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wanexp.config import check_writable
from wanexp.console import say
from wanexp.errors import ERROR_FILE, WanexpError, record_error
from wanexp.io import append_jsonl, atomic_path, read_json, read_jsonl, rebased, write_json, write_text
from wanexp.models.compiled import compile_denoisers, compile_setting
from wanexp.stages.common import calib_generation_cfg, generation_cfg  # noqa: F401
from wanexp.stages.calibrate import calibrate, load_calib_stats  # noqa: F401 (load_calib_stats: for callers)
from wanexp.stages.quantize import (ARTIFACT, artifact_expect, artifact_path, keep_lists, layer_stats, quantize,  # noqa: F401
                                    quantized_pipe)

STAGES = ("calibrate", "quantize", "generate", "evaluate", "report")
OPTIONAL_STAGES = ("analyze",)  # stage=analyze; analysis.auto=true also runs it at the end of stage=all
METHODS = ("bf16", "w4a16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "tsclip_keep_sensitive",
           "hif4_conservative", "hif4_tailaware", "smoothquant", "fp8_dynamic", "awq", "viditq")
# The challenge rule of both papers: at most this many whole blocks kept in high precision.
MAX_KEEP_BLOCKS = {"mxfp4": 5, "hif4": 2}
# What each stage's outputs depend on, and so which settings may change when a run directory is
# resumed, is stated in wanexp.config (OWNERS, REDOABLE); each stage marker records its inputs.


class Run:
    """State shared by the stages of one run: config, directory, and the (lazily loaded) pipeline."""

    def __init__(self, cfg: DictConfig, run_dir: Path, world=None):
        from wanexp.distributed import World
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.world = world or World()
        self.device = _device(str(cfg.device), self.world.local_rank)
        self._pipe = None
        self._pipe_quantized = False
        self._splits = None
        self.inputs: dict[str, dict] = {}     # per stage, what its outputs depend on (wanexp.config)
        self.extra_timings: dict[str, list] = {}  # generate: videos timed in this process beyond those it made
        self.artifact_sha256: str | None = None   # the data hash of the artifact loaded into the pipeline

    # -- bookkeeping ---------------------------------------------------------------------------
    def marker(self, stage: str) -> Path:
        return self.run_dir / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict) -> None:
        write_json(self.marker(stage), dict(info, inputs=self.inputs.get(stage), run_dir=str(self.run_dir)))

    def progress(self, iterable, desc: str):
        from wanexp.console import progress
        return progress(iterable, desc, enabled=bool(self.cfg.progress))

    def recorded(self, info: dict, key: str) -> Path:
        """A path a stage recorded, read from where the run directory is now (it may have moved)."""
        old = info.get("run_dir")
        if old and Path(old) != self.run_dir and not getattr(self, "_told_moved", False):
            say(f"wanexp: {self.run_dir} was recorded at {old}; paths inside it are read from here")
            self._told_moved = True
        return rebased(info[key], old, self.run_dir)

    # -- inputs --------------------------------------------------------------------------------
    @property
    def splits(self):
        if self._splits is None:
            from wanexp.data import load_splits
            self._splits = load_splits(OmegaConf.to_container(self.cfg.data, resolve=True), self.cfg.paths.cache_dir)
        return self._splits

    def bf16_pipe(self):
        """The unquantized pipeline (reloaded if a previous stage quantized the one in memory)."""
        if self._pipe is None or self._pipe_quantized:
            from wanexp.models import load_pipeline, model_fingerprint
            self._pipe = None
            self._pipe = load_pipeline(OmegaConf.to_container(self.cfg.model, resolve=True),
                                       self.cfg.paths.cache_dir, self.device)
            self._pipe_quantized = False
            _guard(self._pipe)
            fingerprint = model_fingerprint(self._pipe)
            model_file = self.run_dir / "model.json"
            if model_file.is_file() and read_json(model_file)["fingerprint"] != fingerprint:
                raise WanexpError(f"{self.run_dir} was started with base model {read_json(model_file)['fingerprint']}, "
                                  f"but model={self.cfg.model.name} is {fingerprint}; use a new run directory")
            write_json(model_file, {"fingerprint": fingerprint, "name": self.cfg.model.name})
        return self._pipe

    @property
    def fingerprint(self) -> str:
        model_file = self.run_dir / "model.json"
        if not model_file.is_file():
            self.bf16_pipe()
        return read_json(model_file)["fingerprint"]

    def contexts(self, pipe) -> dict:
        """Each expert's timestep bins, following the generation's step schedule (README "LoRAs and short schedules")."""
        from wanexp.stages.calibrate import contexts_of
        return contexts_of(self.cfg, pipe)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Execute ``cfg.stage`` (or every unfinished stage) in ``run_dir``; returns the run summary.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0's run directory is used by all,
    rank 0 alone calibrates, quantizes, evaluates and reports, and every rank generates its share."""
    from wanexp.console import snapshot, written
    from wanexp.distributed import drop_orphan_dir, world_from_env
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
        from wanexp.data.check import check_run_data  # every sample of both splits read, before any model loads
        check_run_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.cache_dir)
        if world.main:
            check_writable(cfg, run_dir)
            todo = _setup(state, wanted)
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # this attempt replaces an earlier failed one
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
        record_error(run_dir, f"{stage} (rank {world.rank})" if world.size > 1 else stage, err)
        raise
    if not world.main:
        return {}
    return read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}


def _setup(state: Run, wanted: tuple[str, ...]) -> list[str]:
    """Read the samples, decide what a re-run here may do (wanexp.config.resume_plan: per stage,
    what its outputs depend on), record the configuration; returns the stages to run."""
    from wanexp.config import check_legacy_config, resume_plan, sample_identity, stage_inputs
    cfg, run_dir = state.cfg, state.run_dir
    config = OmegaConf.to_container(cfg, resolve=True)
    samples = {"calib": sample_identity(state.splits.calib), "eval": sample_identity(state.splits.eval)}
    state.inputs = stage_inputs(json.loads(json.dumps(config, default=str)), samples)
    finished = {s: read_json(state.marker(s)) for s in (*STAGES, *OPTIONAL_STAGES) if state.done(s)}
    check_legacy_config(config, run_dir, finished)
    plan = resume_plan(finished, state.inputs, wanted, run_dir, explicit=cfg.stage != "all")
    record = run_dir / "wanexp_config.json"
    if not record.is_file() or read_json(record) != json.loads(json.dumps(config, default=str)):
        write_json(record, config)  # the configuration of the latest attempt (reports read method and format)
    say(f"wanexp: run directory {run_dir}")
    for note in plan.notes:
        say(f"wanexp: {note}")
    todo = [s for s in wanted if cfg.stage != "all" or s not in finished or s in plan.redo]
    if cfg.quant.get("load") and cfg.quant.name != "bf16" and {"quantize", "generate"} & set(todo):
        from wanexp.quant.artifact import verify_artifact
        verify_artifact(artifact_path(state), artifact_expect(cfg))  # a reused artifact: checked before any model loads
    if not todo:
        say(f"wanexp: nothing to do: every stage of {run_dir} is finished "
            "(stage=<name> runs one again; a new run directory starts over)")
    return todo


def _written_dirs(state: Run, stage: str) -> list[Path]:
    """Where a stage writes: the run directory, and the shared cache it fills."""
    cache = {"calibrate": state.cfg.paths.get("calib_cache"), "generate": state.cfg.paths.get("reference_cache")}.get(stage)
    return [state.run_dir] + ([Path(str(cache)).expanduser().resolve()] if cache else [])


def _guard(pipe) -> None:
    """Stop at the first NaN/Inf a layer produces, naming layer, expert and timestep (wanexp.guard)."""
    from wanexp.guard import install_guard
    from wanexp.models import experts
    from wanexp.quant.linear import QuantLinear

    def step_of(t: float) -> str:
        steps = [float(x) for x in getattr(pipe.scheduler, "timesteps", [])]
        hit = [i for i, x in enumerate(steps) if abs(x - t) < 1e-3]
        return f"denoising step {hit[0] + 1} of {len(steps)}" if hit else "outside the schedule"
    install_guard(experts(pipe), step_of, quantized=lambda m: isinstance(m, QuantLinear))


def validate(cfg: DictConfig) -> None:
    """Refuse bad values before any heavy work, with one message naming the key."""
    from wanexp.config import check_format_options, check_settings
    from wanexp.formats import FORMAT_NAMES
    check_settings(cfg)  # every numeric and choice setting in range (wanexp.config.SETTINGS)
    if cfg.stage not in (*STAGES, *OPTIONAL_STAGES, "all"):
        raise WanexpError(f"stage={cfg.stage} is not one of all, {', '.join(STAGES + OPTIONAL_STAGES)}")
    if "vbench" in (cfg.evaluate.get("metrics") or ()):
        from wanexp.evaluate.vbench import MOTION_MIN_SIDE, validate_dimensions
        dims = validate_dimensions(cfg.evaluate.vbench.dimensions)  # a typo fails now, not after generation
        side = min(int(cfg.model.generation.height), int(cfg.model.generation.width))
        if "motion_smoothness" in dims and -(-side // 16) * 16 < MOTION_MIN_SIDE:
            raise WanexpError(f"evaluate.vbench: motion_smoothness (AMT-S) needs frames of at least "
                              f"{MOTION_MIN_SIDE - 15} pixels a side, but model.generation makes "
                              f"{cfg.model.generation.width}×{cfg.model.generation.height}; drop the dimension "
                              "(evaluate.vbench.dimensions=[…]) or generate larger videos")
    from wanexp.analysis import qualitative_settings
    qualitative_settings(OmegaConf.to_container(cfg.analysis, resolve=True) if "analysis" in cfg else {})
    if cfg.quant.name not in METHODS:
        raise WanexpError(f"quant={cfg.quant.name} is not implemented; available: {', '.join(METHODS)}")
    from wanexp.quant.methods import validate_quant_cfg
    validate_quant_cfg(OmegaConf.to_container(cfg.quant, resolve=True), list(cfg.model.generation))
    if cfg.quant.get("bin_rule") == "step_fraction" and cfg.expert.policy == "shared":
        raise WanexpError("quant.bin_rule=step_fraction cuts each expert's own steps; expert=shared has one set "
                          "of bins over the whole trajectory (use bin_rule=equal_width or quant.bin_edges)")
    if cfg.format.name not in FORMAT_NAMES:
        raise WanexpError(f"format.name={cfg.format.name} is unknown; available: {', '.join(FORMAT_NAMES)}")
    if cfg.expert.policy not in ("per_expert", "shared"):
        raise WanexpError(f"expert.policy={cfg.expert.policy} is not one of per_expert, shared")
    for expert in ("high_noise", "low_noise"):
        blocks, _ = keep_lists(cfg, expert)
        limit = cfg.expert.get("max_keep_blocks")
        limit = MAX_KEEP_BLOCKS.get(cfg.format.name) if limit in (None, "auto") else int(limit)
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
    from wanexp.models.lora import check_specs
    check_specs(OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None)


def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # one GPU per rank of a torchrun job
        device = torch.device("cuda", local_rank)
    return device


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def reference_dir(state: Run) -> Path:
    from wanexp.generate import generation_key
    gen = generation_cfg(state.cfg)
    return (Path(str(state.cfg.paths.reference_cache)).expanduser().resolve()
            / generation_key(state.fingerprint, gen, int(state.cfg.seed)))


def generate(state: Run) -> None:
    """This rank's share of the BF16 reference videos (shared through the reference cache) and of this
    method's videos, same seeds; each rank appends to its own manifest shard. Rank 0 then times in
    this process what the run reports but did not make here (``timing``)."""
    from wanexp.generate import generate_videos, manifest_name

    cfg, world = state.cfg, state.world
    samples = world.shard(state.splits.eval)
    gen = generation_cfg(cfg)
    ref_dir, quant_dir, shard = reference_dir(state), state.run_dir, manifest_name(world.rank, world.size)
    warmup = _timing(cfg)["warmup_steps"]
    mode = compile_setting(cfg.model.get("compile"))

    def ready(pipe):  # model.compile: the denoiser blocks compiled, as a diffusers user runs them
        if mode is not None:
            compile_denoisers(pipe, None if mode == "default" else mode)
        return pipe

    def make_reference():
        generate_videos(ready(state.bf16_pipe()), samples, ref_dir, gen, int(cfg.seed), "bf16",
                        lambda it: state.progress(it, "bf16 videos"), manifest=shard, warmup_steps=warmup)

    def make_quant():
        if cfg.quant.name == "bf16":
            return
        from wanexp.models import experts
        from wanexp.quant.api import path_calls
        pipe, hooks = quantized_pipe(state)
        ready(pipe)
        before = path_calls(*experts(pipe).values())
        try:
            generate_videos(pipe, samples, quant_dir, gen, int(cfg.seed), cfg.quant.name,
                            lambda it: state.progress(it, f"{cfg.quant.name} videos"), manifest=shard,
                            warmup_steps=warmup)
        finally:
            for h in hooks:
                h.remove()
        # which path the quantized layers took while this rank generated (fused GPU kernels or torch)
        after = path_calls(*experts(pipe).values())
        write_json(quant_dir / LAYER_CALLS.format(rank=world.rank), {k: after[k] - before[k] for k in after})

    # Use whichever pipeline is in memory first, so a single process loads the model as rarely as possible.
    order = (make_quant, make_reference) if state._pipe_quantized else (make_reference, make_quant)
    for step in order if samples else ():
        step()
    if world.main:
        _time_here(state, ref_dir, gen)


def _timing(cfg) -> dict:
    t = OmegaConf.to_container(cfg.timing, resolve=True) if cfg.get("timing") is not None else {}
    return {"warmup_steps": int(t.get("warmup_steps", 2)), "videos": int(t.get("videos", 1)),
            "bf16_twin": bool(t.get("bf16_twin", False))}


def _timed_here(records: dict, ids: list[str]) -> list[dict]:
    """Records of the videos this process generated (and so timed, after its warm-up)."""
    from wanexp.generate import PROCESS
    return [records[i] for i in ids if i in records and records[i].get("process") == PROCESS]


def _time_here(state: Run, ref_dir: Path, gen: dict) -> None:
    """Every speed and memory figure of the row is measured in this process: the run's own method
    always, the BF16 twin with ``timing.bf16_twin``. A variant this process made no video of (the
    references came from the cache, or the videos from an earlier attempt) is timed now on
    ``timing.videos`` samples after a warm-up; only the timings are kept."""
    from wanexp.generate import done_records, time_videos
    cfg, timing = state.cfg, _timing(state.cfg)
    ids = [s.id for s in state.splits.eval]
    dirs = {"bf16": ref_dir, "quant": ref_dir if cfg.quant.name == "bf16" else state.run_dir}
    wanted = ["quant"] + (["bf16"] if timing["bf16_twin"] and cfg.quant.name != "bf16" else [])
    missing = [v for v in wanted if not _timed_here(done_records(dirs[v]), ids)]
    missing.sort(key=lambda v: (v == "quant") != state._pipe_quantized)  # the pipeline in memory first
    for variant in missing:
        pipe, hooks = quantized_pipe(state) if variant == "quant" and cfg.quant.name != "bf16" else (state.bf16_pipe(), [])
        try:
            state.extra_timings[variant] = time_videos(pipe, state.splits.eval[: timing["videos"]], gen, int(cfg.seed),
                                                       timing["warmup_steps"])
        finally:
            for h in hooks:
                h.remove()


LAYER_CALLS = "layer_calls.rank{rank}.json"


def generation_summary(state: Run) -> dict:
    """Once every rank's shard is in: check that no video is missing, and record timing and memory
    (each figure with where it comes from)."""
    from wanexp.generate import done_records

    ref_dir = reference_dir(state)
    quant_dir = ref_dir if state.cfg.quant.name == "bf16" else state.run_dir
    ids = [s.id for s in state.splits.eval]
    refs, quants = done_records(ref_dir), done_records(quant_dir)
    missing = [i for i in ids if i not in refs or i not in quants]
    if missing:
        raise WanexpError(f"{len(missing)} of {len(ids)} videos were not generated ({', '.join(missing[:5])}"
                          f"{' …' if len(missing) > 5 else ''}): a rank stopped early; re-run to fill the gaps")
    quant_secs, quant_peak, quant_src = _figures(state, "quant", quants, ids)
    if state.cfg.quant.name == "bf16":
        bf16_secs, bf16_peak, bf16_src = quant_secs, quant_peak, quant_src
    else:
        bf16_secs, bf16_peak, bf16_src = _figures(state, "bf16", refs, ids)
    info = {"reference_dir": str(ref_dir), "quant_dir": str(quant_dir), "run_dir": str(state.run_dir),
            "frames": refs[ids[0]]["frames"],
            "bf16_sec_per_video": bf16_secs, "bf16_peak_memory_bytes": bf16_peak, "bf16_timing_source": bf16_src,
            "quant_sec_per_video": quant_secs, "peak_memory_bytes": quant_peak, "timing_source": quant_src}
    calls = [read_json(p) for p in sorted(quant_dir.glob(LAYER_CALLS.format(rank="*")))] if quant_dir != ref_dir else []
    if calls:  # summed over ranks; only the videos made by the last attempt of each rank are counted
        info["quant_layer_calls"] = {k: sum(c.get(k, 0) for c in calls) for k in calls[0]}
    write_json(state.run_dir / "generate.json", info)
    return info


def _figures(state: Run, variant: str, records: dict, ids: list[str]) -> tuple[float | None, int | None, str]:
    """(seconds per video, peak memory, where they come from) for one variant, from this process only."""
    from wanexp.generate import PROCESS
    from wanexp.provenance import device_name
    made = _timed_here(records, ids)
    timed = made or state.extra_timings.get(variant, [])
    if not timed:
        return None, None, ("not measured in this run" + (
            ": its BF16 references came from the cache (timing.bf16_twin=true times a BF16 twin in this run; "
            "a quant=bf16 run times BF16 in its own run)" if variant == "bf16" else ""))
    warmup = _timing(state.cfg)["warmup_steps"]
    how = "generated" if made else "timed again (made by another process)"
    source = (f"{len(timed)} video(s) {how} in this run, after a {warmup}-step warm-up, on "
              f"{device_name(state.device)} ({PROCESS})" if warmup else
              f"{len(timed)} video(s) {how} in this run, no warm-up, on {device_name(state.device)} ({PROCESS})")
    return _mean_seconds(timed), _max_peak(timed), source


def _mean_seconds(records: list[dict]) -> float | None:
    secs = [r["seconds"] for r in records if "seconds" in r]
    return round(sum(secs) / len(secs), 3) if secs else None


def _max_peak(records: list[dict]) -> int | None:
    """Peak GPU memory of the costliest video (recorded per video on CUDA; None on the CPU)."""
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes")]
    return max(peaks) if peaks else None


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
FIDELITY_FILE = Path("eval") / "fidelity.jsonl"
VBENCH_FILE = Path("eval") / "vbench.jsonl"        # evaluate=vbench: one line per video


def twin_vbench_file(ref_dir: Path, vcfg: dict) -> Path:
    """The BF16 twin's per-video VBench scores, kept beside the shared reference videos (one file per
    set of VBench weights)."""
    from wanexp.evaluate.vbench import weights_key
    return Path(ref_dir) / f"vbench-{weights_key(vcfg['cache_dir'])}.jsonl"


def evaluate(state: Run) -> dict:
    """Fidelity of every video of this method to its BF16 twin; per-video lines resume after a crash."""
    from wanexp.evaluate.fidelity import score_pair, summarize
    from wanexp.generate import done_records

    gen_file = state.run_dir / "generate.json"
    if not gen_file.is_file():
        raise WanexpError(f"{state.run_dir} has no generated videos yet (run stage=generate first)")
    gen = read_json(gen_file)
    ref_dir, quant_dir = state.recorded(gen, "reference_dir"), state.recorded(gen, "quant_dir")
    refs, quants = done_records(ref_dir), done_records(quant_dir)
    wanted = [s.id for s in state.splits.eval]
    missing = [i for i in wanted if i not in refs or i not in quants]
    if missing:
        raise WanexpError(f"videos missing for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                          "re-run stage=generate to fill the gaps")
    out = state.run_dir / FIDELITY_FILE
    scored = {r["id"]: r for r in read_jsonl(out)}
    for sid in state.progress([i for i in wanted if i not in scored], "fidelity"):
        row = score_pair(ref_dir, refs[sid], quant_dir, quants[sid])
        append_jsonl(out, row)
        scored[sid] = row
    summary = {"fidelity": summarize(scored[i] for i in wanted)}
    write_json(state.run_dir / "eval" / "summary.json", summary)  # kept if VBench below refuses
    if "vbench" in state.cfg.evaluate.get("metrics", ()):
        from wanexp.evaluate.vbench import score_into
        vcfg = OmegaConf.to_container(state.cfg.evaluate.vbench, resolve=True)
        samples = {s.id: s for s in state.splits.eval}
        device = vcfg.get("device") or state.device
        summary["vbench"] = score_into(state.run_dir / VBENCH_FILE, {i: quant_dir / quants[i]["video"] for i in wanted},
                                       samples, vcfg, device, state.run_dir / "eval" / "vbench",
                                       lambda it: state.progress(it, "vbench"))
        write_json(state.run_dir / "eval" / "summary.json", summary)
        # The BF16 twin's scores, kept beside the shared reference videos (scored once per sweep), so
        # every run's row carries its own VBench deltas.
        summary["vbench_bf16"] = summary["vbench"] if quant_dir == ref_dir else score_into(
            twin_vbench_file(ref_dir, vcfg), {i: ref_dir / refs[i]["video"] for i in wanted},
            samples, vcfg, device, state.run_dir / "eval" / "vbench_bf16", lambda it: state.progress(it, "vbench bf16"))
        write_json(state.run_dir / "eval" / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report(state: Run) -> dict:
    """One results row (CSV + parquet), the per-sample table, W&B, report.html and the printed summary."""
    from wanexp.generate import done_records
    from wanexp.report.html import record_versions, write_run_report
    from wanexp.report.results import write_row
    from wanexp.report.wandb_log import log_run, sweep_group

    cfg, run_dir = state.cfg, state.run_dir
    if not (run_dir / "eval" / "summary.json").is_file():
        raise WanexpError(f"{run_dir} has no evaluation yet (run stage=evaluate first)")
    evals = read_json(run_dir / "eval" / "summary.json")
    gen = read_json(run_dir / "generate.json")
    row = results_row(state, evals, gen)
    from wanexp.data import sample_table
    from wanexp.report.stats import Bootstrap, metric_intervals
    twin = None
    if "vbench" in cfg.evaluate.get("metrics", ()) and state.recorded(gen, "quant_dir") != state.recorded(gen, "reference_dir"):
        twin = twin_vbench_file(state.recorded(gen, "reference_dir"), OmegaConf.to_container(cfg.evaluate.vbench, resolve=True))
    per_sample = per_sample_table(run_dir, twin).merge(sample_table(state.splits.eval), on="id", how="left")
    with atomic_path(run_dir / "eval" / "per_sample.csv") as tmp:
        per_sample.to_csv(tmp, index=False)
    # each per-video metric's interval over this run's samples (README "Intervals and sample sizes")
    from wanexp.report.table import PER_SAMPLE
    row.update(metric_intervals(per_sample, [m for m in PER_SAMPLE if m in row],
                                Bootstrap.from_cfg(OmegaConf.to_container(cfg.report.get("bootstrap") or {}, resolve=True))))
    write_row(run_dir, row)
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    if not logger.get("group"):  # the runs of one sweep share a W&B group: the sweep directory
        logger["group"] = sweep_group(run_dir)
    quant_dir = state.recorded(gen, "quant_dir")
    records = done_records(quant_dir)
    videos = [(f"{r['id']} ({r['category']})", quant_dir / r["video"])
              for r in (records[s.id] for s in state.splits.eval[: int(logger.get("videos") or 0)])]
    artifact = artifact_path(state) if logger.get("log_artifact") and cfg.quant.name != "bf16" else None
    wandb_where = log_run(logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          {k: v for k, v in row.items() if k != "run_dir"},
                          {"per_sample": per_sample, "results": pd.DataFrame([row])}, videos=videos, artifact=artifact)
    record_versions(run_dir)
    html = write_run_report(run_dir, OmegaConf.to_container(cfg.report, resolve=True))
    summary = dict(row, videos=str(quant_dir), reference_videos=str(state.recorded(gen, "reference_dir")),
                   results=str(run_dir / "results.csv"), wandb=wandb_where, report=str(html))
    write_json(run_dir / "summary.json", summary)
    write_text(run_dir / "summary.txt", format_summary(summary) + "\n")
    return {"row": row}


def results_row(state: Run, evals: dict, gen: dict) -> dict:
    """The run's line of every ablation table: what was run (keys), every metric, size, memory, speed."""
    cfg, run_dir = state.cfg, state.run_dir
    quant_info = read_json(state.marker("quantize")) if state.done("quantize") else {}
    fid = evals["fidelity"]
    secs = gen.get("quant_sec_per_video")
    row = {
        "method": cfg.quant.name, "recipe": cfg.quant.get("recipe"),
        "format": format_label(cfg.format) if cfg.quant.name != "bf16" else "bf16",
        "attention": None if (cfg.get("attention") or {}).get("name", "bf16") == "bf16" else cfg.attention.name,
        "expert_policy": cfg.expert.policy, "bins": int(cfg.quant.get("bins", 1)),
        "clip_candidates": _candidates_label(cfg.quant) if cfg.quant.get("clip_search") else None,
        "rank": int(cfg.quant.get("rank", 0) or 0), "kept": kept_label(cfg),
        "seed": int(cfg.seed), "model": cfg.model.name, "data": cfg.data.name, "num_videos": fid.get("num_videos"),
        "psnr": fid.get("psnr"), "ssim": fid.get("ssim"), "latent_rel_err": fid.get("latent_rel_err"),
    }
    from wanexp.data import calib_record  # what calibration ran on, and whether it was evaluated too
    calibrated = state.done("calibrate") and "samples" in read_json(state.marker("calibrate"))
    row.update(calib_record(state.splits, calibrated))
    row.update({k: v for k, v in (evals.get("vbench") or {}).items() if isinstance(v, float)})
    row.update({
        "model_size_gb": _gb(quant_info.get("model_bytes")), "pipeline_size_gb": _gb(quant_info.get("pipeline_bytes")),
        "peak_memory_gb": _gb(gen.get("peak_memory_bytes")), "sec_per_video": secs, "fps": _fps(gen, secs),
    })
    # The BF16 twin's figures, measured in this run (timing: only when this process timed it, see
    # generation_summary), so a table can give deltas without a bf16 run.
    bf16_secs = gen.get("bf16_sec_per_video")
    row.update({f"{k}_bf16": v for k, v in (evals.get("vbench_bf16") or {}).items() if isinstance(v, float)})
    row.update({
        "model_size_gb_bf16": _gb(quant_info.get("bf16_model_bytes")),
        "pipeline_size_gb_bf16": _gb(quant_info.get("bf16_pipeline_bytes")),
        "peak_memory_gb_bf16": _gb(gen.get("bf16_peak_memory_bytes")), "sec_per_video_bf16": bf16_secs,
        "fps_bf16": _fps(gen, bf16_secs),
        # where the figures come from: sizes are counted from the tensors held, timings as stated
        "timing_source": gen.get("timing_source"), "timing_source_bf16": gen.get("bf16_timing_source"),
        "artifact_sha256": quant_info.get("artifact_sha256"),
        "overrides": _overrides(run_dir), "run_dir": str(run_dir),
    })
    from wanexp.provenance import provenance
    row.update(provenance(state.device))
    return row


def _candidates_label(quant) -> str:
    """``0.6,0.7,0.8,0.9,1``, with ``×2^-1,0,1`` when exponent shifts multiply the set (the paper code's 15)."""
    label = ",".join(f"{float(c):g}" for c in quant.clip_candidates)
    shifts = [int(k) for k in quant.get("exp_shifts") or [0]]
    return label if shifts == [0] else f"{label} ×2^{','.join(map(str, shifts))}"


def _fps(gen: dict, secs: float | None) -> float | None:
    """Table II's throughput: frames of one video over its generation time."""
    return round(gen["frames"] / secs, 6) if secs and gen.get("frames") else None


def per_sample_table(run_dir: Path, twin_vbench: Path | None = None) -> pd.DataFrame:
    """One line per evaluated video: fidelity, VBench's per-dimension scores when they were computed, and
    the BF16 twin's (``<dimension>_bf16``, from ``twin_vbench``) so deltas pair sample by sample."""
    table = pd.DataFrame(read_jsonl(run_dir / FIDELITY_FILE))
    for path, suffix in ((run_dir / "eval" / "vbench.jsonl", ""), (twin_vbench, "_bf16")):
        rows = read_jsonl(path) if path is not None else []
        if rows and not table.empty:
            scores = pd.DataFrame(rows).drop_duplicates("id", keep="last").drop(columns=["category"], errors="ignore")
            scores = scores.rename(columns={c: c + suffix for c in scores if c != "id"})
            table = table.merge(scores[[c for c in scores if c not in table or c == "id"]], on="id", how="left")
    return table


def kept_label(cfg) -> str | None:
    """What stays in BF16, e.g. ``blocks=3`` or ``modules=blocks.*.ffn.net.2`` (per expert when they differ)."""
    def label(expert):
        blocks, modules = keep_lists(cfg, expert)
        parts = ([f"blocks={','.join(map(str, sorted(blocks)))}"] if blocks else []) + \
                ([f"modules={'+'.join(modules)}"] if modules else [])
        return " ".join(parts)
    high, low = label("high_noise"), label("low_noise")
    if high == low:
        return high or None
    return f"high_noise: {high or '-'}; low_noise: {low or '-'}"


def _overrides(run_dir: Path) -> str | None:
    """The command-line overrides of this run (Hydra's record), e.g. ``quant=tsclip quant.bins=8``."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    items = OmegaConf.load(path)
    return " ".join(str(o) for o in items if not str(o).startswith(("progress=", "hydra.", "stage="))) or None


def format_label(fmt_cfg) -> str:
    """``mxfp4``, or ``mxfp4(scale_rule=ceil)`` when options set it apart from the format's defaults."""
    opts = {**OmegaConf.to_container(fmt_cfg.weight, resolve=True)}
    for k, v in OmegaConf.to_container(fmt_cfg.act, resolve=True).items():
        opts.setdefault(f"act_{k}" if k in opts and opts[k] != v else k, v)
    defaults = {"int4": {"group_size": 128}, "int8": {"group_size": -1}}.get(fmt_cfg.name, {})
    extra = {k: v for k, v in opts.items() if defaults.get(k) != v}
    return fmt_cfg.name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + ")" if extra else "")


VBENCH_DIMS = ("imaging_quality", "aesthetic_quality", "subject_consistency", "motion_smoothness", "overall_consistency")


def format_summary(s: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    return "\n".join([
        f"wanexp  method={s['method']}  format={s['format']}  experts={s['expert_policy']}  model={s['model']}",
        f"  videos: {s['num_videos']}   PSNR {num(s['psnr'], '.2f')} dB   SSIM {num(s['ssim'], '.4f')}   "
        f"latent rel. err {num(s['latent_rel_err'], '.4f')}",
        *([f"  VBench avg {num(s['vbench_avg'], '.4f')} (bf16 {num(s.get('vbench_avg_bf16'), '.4f')})   "
           + "   ".join(f"{d} {num(s[d], '.4f')}" for d in VBENCH_DIMS if d in s)] if "vbench_avg" in s else []),
        f"  model size {num(s['model_size_gb'], '.4f')} GB   s/video {num(s['sec_per_video'], '.2f')} "
        f"(bf16 {num(s['sec_per_video_bf16'], '.2f')})",
        f"  videos:  {s['videos']}",
        f"  table:   {s['results']}",
        f"  wandb:   {s['wandb'] or 'off'}",
        *([f"  report:  {s['report']}"] if s.get("report") else []),
    ])


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 1e9


# ---------------------------------------------------------------------------------------------
# analyze (opt-in)
# ---------------------------------------------------------------------------------------------
def analyze(state: Run) -> dict:
    """The seed paper's diagnostic figures and the qualitative grids of this run from what it recorded
    (``analysis/*.png|pdf|json``), logged to W&B as images unless ``logger=none``; report.html redrawn
    with them. A figure whose data the run lacks is skipped, one printed line each saying why; a run
    with the data of no figure fails, naming what is missing and the stage to run first."""
    from wanexp.analysis import NothingToAnalyze
    from wanexp.report.html import write_run_report
    from wanexp.report.plots import analyze_run
    from wanexp.report.wandb_log import sweep_group
    cfg = state.cfg
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    if not logger.get("group"):
        logger["group"] = sweep_group(state.run_dir)
    analysis = cfg.get("analysis")
    analysis = OmegaConf.to_container(analysis, resolve=True) if analysis is not None else {}
    try:
        info = analyze_run(state.run_dir, analysis, logger=logger, config=OmegaConf.to_container(cfg, resolve=True))
    except NothingToAnalyze as err:
        first = next((s for s in STAGES if s in err.stages), None)
        raise WanexpError(f"{err}; run stage={first} first (stage=all runs every stage)" if first else str(err)) from None
    for name, why in info["skipped"].items():
        print(f"wanexp: analyze: skipped {name}: {why}")
    info["report"] = str(write_run_report(state.run_dir, OmegaConf.to_container(cfg.report, resolve=True)))
    print(f"wanexp: analyze: {len(info['figures'])} figures in {state.run_dir / 'analysis'}; report: {info['report']}")
    return info


_STAGE_FUNCS = {"calibrate": calibrate, "quantize": quantize, "generate": generate, "evaluate": evaluate,
                "report": report, "analyze": analyze}
# Stages every rank runs on its own share of the samples, with what rank 0 does once all shards
# are in; the other stages run on rank 0 alone.
PER_RANK = {"generate": generation_summary}
# Stages every rank takes part in, rank 0 recording the result: calibration is data parallel
# (each rank denoises its share of the calibration samples; wanexp.calib.reduce combines them).
ALL_RANKS = ("calibrate",)
