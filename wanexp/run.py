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

from wanexp.errors import WanexpError
from wanexp.io import append_jsonl, atomic_path, flatten, read_json, read_jsonl, write_json, write_text
from wanexp.stages.common import calib_generation_cfg, generation_cfg  # noqa: F401
from wanexp.stages.calibrate import calibrate, load_calib_stats  # noqa: F401 (load_calib_stats: for callers)
from wanexp.stages.quantize import (ARTIFACT, artifact_path, keep_lists, layer_stats, quantize,  # noqa: F401
                                    quantized_pipe)

STAGES = ("calibrate", "quantize", "generate", "evaluate", "report")
OPTIONAL_STAGES = ("analyze",)  # stage=analyze; analysis.auto=true also runs it at the end of stage=all
METHODS = ("bf16", "w4a16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "tsclip_keep_sensitive",
           "hif4_conservative", "hif4_tailaware")
# The challenge rule of both papers: at most this many whole blocks kept in high precision.
MAX_KEEP_BLOCKS = {"mxfp4": 5, "hif4": 2}
# Keys that may differ between the first run in a directory and a resumed one.
# Evaluation settings may change too: the generated videos do not depend on them (stage=evaluate re-scores).
_RESUME_FREE = ("stage", "logger", "progress", "device", "paths", "report", "analysis", "evaluate")


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

    # -- bookkeeping ---------------------------------------------------------------------------
    def marker(self, stage: str) -> Path:
        return self.run_dir / "stages" / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def mark_done(self, stage: str, info: dict) -> None:
        write_json(self.marker(stage), info)

    def progress(self, iterable, desc: str):
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, disable=not self.cfg.progress, leave=False, dynamic_ncols=True)

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
    from wanexp.distributed import drop_orphan_dir, world_from_env
    world = world_from_env()
    own_dir, run_dir = Path(run_dir), Path(world.broadcast(str(run_dir)))
    drop_orphan_dir(own_dir, run_dir)
    stage = "setup"
    try:
        validate(cfg)
        from wanexp.data.check import check_run_data  # every sample of both splits read, before any model loads
        check_run_data(OmegaConf.to_container(cfg.data, resolve=True), cfg.paths.cache_dir)
        if world.main:
            _check_writable(run_dir)
            _check_same_config(cfg, run_dir)
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # this attempt replaces an earlier failed one
        world.barrier()
        state = Run(cfg, run_dir, world)
        wanted = STAGES if cfg.stage == "all" else (str(cfg.stage),)
        wanted += OPTIONAL_STAGES if cfg.stage == "all" and (cfg.get("analysis") or {}).get("auto") else ()
        for stage in wanted:
            if cfg.stage == "all" and state.done(stage):
                continue
            start = time.perf_counter()
            info = _STAGE_FUNCS[stage](state) if world.main or stage in PER_RANK or stage in ALL_RANKS else None
            if stage in PER_RANK or stage in ("calibrate", "quantize"):
                world.barrier()  # the next stage needs every rank's files (or rank 0's artifact)
            if stage in PER_RANK and world.main:
                info = PER_RANK[stage](state)
            if info is not None and world.main:
                info["seconds"] = round(time.perf_counter() - start, 3)
                state.mark_done(stage, info)
    except BaseException as err:
        _record_error(run_dir, f"{stage} (rank {world.rank})" if world.size > 1 else stage, err)
        raise
    if not world.main:
        return {}
    return read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}


ERROR_FILE = "error.json"


def _record_error(run_dir: Path, stage: str, err: BaseException) -> None:
    """Leave ``error.json`` behind a failed stage, so a sweep's report can name the failure (what the
    finished stages wrote stays; a re-run resumes from the failed stage)."""
    import traceback
    if isinstance(err, KeyboardInterrupt):
        message = "interrupted"
    else:
        message = str(err) or type(err).__name__
    info = {"stage": stage, "error": message, "type": type(err).__name__}
    if not isinstance(err, (WanexpError, KeyboardInterrupt)):
        info["traceback"] = traceback.format_exc()
    try:
        write_json(run_dir / ERROR_FILE, info)
    except OSError:
        pass  # an unwritable run dir already has its own error; don't mask it


def validate(cfg: DictConfig) -> None:
    """Refuse bad values before any heavy work, with one message naming the key."""
    from wanexp.formats import FORMAT_NAMES
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
    from wanexp.models.lora import check_specs
    check_specs(OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None)
    gen = cfg.model.generation
    if (int(gen.num_frames) - 1) % 4:
        raise WanexpError(f"model.generation.num_frames={gen.num_frames}: Wan needs 4k+1 frames (e.g. 5, 61, 81)")
    if int(gen.height) % 16 or int(gen.width) % 16:
        raise WanexpError(f"model.generation height×width {gen.height}×{gen.width} must be multiples of 16")


def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # one GPU per rank of a torchrun job
        device = torch.device("cuda", local_rank)
    return device


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise WanexpError(f"cannot write to the run directory {run_dir}: {err.strerror} "
                          "(set paths.output_root or hydra.run.dir to a writable place)") from err


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory belongs to one configuration; resuming it with another would mix results."""
    current = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _RESUME_FREE}
    path = run_dir / "wanexp_config.json"
    if path.is_file():
        before, now = flatten(read_json(path)), flatten(json.loads(json.dumps(current)))
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if diff:
            raise WanexpError(f"{run_dir} holds a run with a different configuration ({', '.join(diff[:6])}"
                              f"{' …' if len(diff) > 6 else ''} differ); use a new run directory")
    else:
        write_json(path, current)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def reference_dir(state: Run) -> Path:
    from wanexp.generate import generation_key
    gen = generation_cfg(state.cfg)
    return Path(state.cfg.paths.reference_cache) / generation_key(state.fingerprint, gen, int(state.cfg.seed))


def generate(state: Run) -> None:
    """This rank's share of the BF16 reference videos (shared through the reference cache) and of this
    method's videos, same seeds; each rank appends to its own manifest shard."""
    from wanexp.generate import generate_videos, manifest_name

    cfg, world = state.cfg, state.world
    samples = world.shard(state.splits.eval)
    gen = generation_cfg(cfg)
    ref_dir, quant_dir, shard = reference_dir(state), state.run_dir, manifest_name(world.rank, world.size)

    def make_reference():
        generate_videos(state.bf16_pipe(), samples, ref_dir, gen, int(cfg.seed), "bf16",
                        lambda it: state.progress(it, "bf16 videos"), manifest=shard)

    def make_quant():
        if cfg.quant.name == "bf16":
            return
        from wanexp.models import experts
        from wanexp.quant.api import path_calls
        pipe, hooks = quantized_pipe(state)
        before = path_calls(*experts(pipe).values())
        try:
            generate_videos(pipe, samples, quant_dir, gen, int(cfg.seed), cfg.quant.name,
                            lambda it: state.progress(it, f"{cfg.quant.name} videos"), manifest=shard)
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


LAYER_CALLS = "layer_calls.rank{rank}.json"


def generation_summary(state: Run) -> dict:
    """Once every rank's shard is in: check that no video is missing, and record timing and memory."""
    from wanexp.generate import done_records

    ref_dir = reference_dir(state)
    quant_dir = ref_dir if state.cfg.quant.name == "bf16" else state.run_dir
    ids = [s.id for s in state.splits.eval]
    refs, quants = done_records(ref_dir), done_records(quant_dir)
    missing = [i for i in ids if i not in refs or i not in quants]
    if missing:
        raise WanexpError(f"{len(missing)} of {len(ids)} videos were not generated ({', '.join(missing[:5])}"
                          f"{' …' if len(missing) > 5 else ''}): a rank stopped early; re-run to fill the gaps")
    ref_recs, quant_recs = [refs[i] for i in ids], [quants[i] for i in ids]
    info = {"reference_dir": str(ref_dir), "quant_dir": str(quant_dir), "frames": ref_recs[0]["frames"],
            "bf16_sec_per_video": _mean_seconds(ref_recs), "bf16_peak_memory_bytes": _max_peak(ref_recs),
            "quant_sec_per_video": _mean_seconds(quant_recs), "peak_memory_bytes": _max_peak(quant_recs)}
    calls = [read_json(p) for p in sorted(quant_dir.glob(LAYER_CALLS.format(rank="*")))] if quant_dir != ref_dir else []
    if calls:  # summed over ranks; only the videos made by the last attempt of each rank are counted
        info["quant_layer_calls"] = {k: sum(c.get(k, 0) for c in calls) for k in calls[0]}
    write_json(state.run_dir / "generate.json", info)
    return info


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


def evaluate(state: Run) -> dict:
    """Fidelity of every video of this method to its BF16 twin; per-video lines resume after a crash."""
    from wanexp.evaluate.fidelity import score_pair, summarize
    from wanexp.generate import done_records

    gen_file = state.run_dir / "generate.json"
    if not gen_file.is_file():
        raise WanexpError(f"{state.run_dir} has no generated videos yet (run stage=generate first)")
    gen = read_json(gen_file)
    ref_dir, quant_dir = Path(gen["reference_dir"]), Path(gen["quant_dir"])
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
        from wanexp.evaluate.vbench import score_into, weights_key
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
            ref_dir / f"vbench-{weights_key(vcfg['cache_dir'])}.jsonl", {i: ref_dir / refs[i]["video"] for i in wanted},
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
    write_row(run_dir, row)
    from wanexp.data import sample_table
    per_sample = per_sample_table(run_dir).merge(sample_table(state.splits.eval), on="id", how="left")
    with atomic_path(run_dir / "eval" / "per_sample.csv") as tmp:
        per_sample.to_csv(tmp, index=False)
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    if not logger.get("group"):  # the runs of one sweep share a W&B group: the sweep directory
        logger["group"] = sweep_group(run_dir)
    records = done_records(Path(gen["quant_dir"]))
    videos = [(f"{r['id']} ({r['category']})", Path(gen["quant_dir"]) / r["video"])
              for r in (records[s.id] for s in state.splits.eval[: int(logger.get("videos") or 0)])]
    artifact = artifact_path(state) if logger.get("log_artifact") and cfg.quant.name != "bf16" else None
    wandb_where = log_run(logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          {k: v for k, v in row.items() if k != "run_dir"},
                          {"per_sample": per_sample, "results": pd.DataFrame([row])}, videos=videos, artifact=artifact)
    record_versions(run_dir)
    html = write_run_report(run_dir, OmegaConf.to_container(cfg.report, resolve=True))
    summary = dict(row, videos=gen["quant_dir"], reference_videos=gen["reference_dir"],
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
    # The BF16 twin's figures, measured in this run, so any table can give deltas without a bf16 run.
    bf16_secs = gen.get("bf16_sec_per_video")
    row.update({f"{k}_bf16": v for k, v in (evals.get("vbench_bf16") or {}).items() if isinstance(v, float)})
    row.update({
        "model_size_gb_bf16": _gb(quant_info.get("bf16_model_bytes")),
        "pipeline_size_gb_bf16": _gb(quant_info.get("bf16_pipeline_bytes")),
        "peak_memory_gb_bf16": _gb(gen.get("bf16_peak_memory_bytes")), "sec_per_video_bf16": bf16_secs,
        "fps_bf16": _fps(gen, bf16_secs),
        "overrides": _overrides(run_dir), "run_dir": str(run_dir),
    })
    return row


def _candidates_label(quant) -> str:
    """``0.6,0.7,0.8,0.9,1``, with ``×2^-1,0,1`` when exponent shifts multiply the set (the paper code's 15)."""
    label = ",".join(f"{float(c):g}" for c in quant.clip_candidates)
    shifts = [int(k) for k in quant.get("exp_shifts") or [0]]
    return label if shifts == [0] else f"{label} ×2^{','.join(map(str, shifts))}"


def _fps(gen: dict, secs: float | None) -> float | None:
    """Table II's throughput: frames of one video over its generation time."""
    return round(gen["frames"] / secs, 6) if secs and gen.get("frames") else None


def per_sample_table(run_dir: Path) -> pd.DataFrame:
    """One line per evaluated video: fidelity, and VBench's per-dimension scores when they were computed."""
    table = pd.DataFrame(read_jsonl(run_dir / FIDELITY_FILE))
    vbench = read_jsonl(run_dir / "eval" / "vbench.jsonl")
    if vbench and not table.empty:
        scores = pd.DataFrame(vbench).drop_duplicates("id", keep="last")
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
