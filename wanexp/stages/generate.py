"""The generate stage: this rank's share of the BF16 reference videos (shared through the reference
cache) and of the method's videos, same seeds; then, once every rank's shard is in, the timing and
memory figures of the results row, each with where it comes from."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from wanexp.errors import WanexpError
from wanexp.generate import PROCESS, done_records, generate_videos, generation_key, manifest_name, time_videos
from wanexp.io import read_json, write_json
from wanexp.models import experts
from wanexp.models.compiled import compile_denoisers, compile_setting
from wanexp.provenance import device_name
from wanexp.quant.api import path_calls
from wanexp.stages.common import generation_cfg
from wanexp.stages.quantize import quantized_pipe
from wanexp.stages.state import Run


def reference_dir(state: Run) -> Path:
    gen = generation_cfg(state.cfg)
    return (Path(str(state.cfg.paths.reference_cache)).expanduser().resolve()
            / generation_key(state.fingerprint, gen, int(state.cfg.seed)))


def generate(state: Run) -> None:
    """This rank's share of the BF16 reference videos (shared through the reference cache) and of this
    method's videos, same seeds; each rank appends to its own manifest shard. Rank 0 then times in
    this process what the run reports but did not make here (``timing``)."""
    cfg, world = state.cfg, state.world
    samples = world.shard(state.splits.eval)
    gen = generation_cfg(cfg)
    ref_dir, quant_dir, shard = reference_dir(state), state.run_dir, manifest_name(world.rank, world.size)
    warmup = timing_cfg(cfg)["warmup_steps"]
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
        write_json(state.dir.layer_calls(world.rank), {k: after[k] - before[k] for k in after})

    # Use whichever pipeline is in memory first, so a single process loads the model as rarely as possible.
    order = (make_quant, make_reference) if state._pipe_quantized else (make_reference, make_quant)
    for step in order if samples else ():
        step()
    if world.main:
        _time_here(state, ref_dir, gen)


def timing_cfg(cfg) -> dict:
    t = OmegaConf.to_container(cfg.timing, resolve=True) if cfg.get("timing") is not None else {}
    return {"warmup_steps": int(t.get("warmup_steps", 2)), "videos": int(t.get("videos", 1)),
            "bf16_twin": bool(t.get("bf16_twin", False))}


def _timed_here(records: dict, ids: list[str]) -> list[dict]:
    """Records of the videos this process generated (and so timed, after its warm-up)."""
    return [records[i] for i in ids if i in records and records[i].get("process") == PROCESS]


def _time_here(state: Run, ref_dir: Path, gen: dict) -> None:
    """Every speed and memory figure of the row is measured in this process: the run's own method
    always, the BF16 twin with ``timing.bf16_twin``. A variant this process made no video of (the
    references came from the cache, or the videos from an earlier attempt) is timed now on
    ``timing.videos`` samples after a warm-up; only the timings are kept."""
    cfg, timing = state.cfg, timing_cfg(state.cfg)
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


def generation_summary(state: Run) -> dict:
    """Once every rank's shard is in: check that no video is missing, and record timing and memory
    (each figure with where it comes from)."""
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
    calls = [read_json(p) for p in sorted(state.run_dir.glob(state.dir.layer_calls("*").name))] if quant_dir != ref_dir else []
    if calls:  # summed over ranks; only the videos made by the last attempt of each rank are counted
        info["quant_layer_calls"] = {k: sum(c.get(k, 0) for c in calls) for k in calls[0]}
    write_json(state.dir.generated, info)
    return info


def _figures(state: Run, variant: str, records: dict, ids: list[str]) -> tuple[float | None, int | None, str]:
    """(seconds per video, peak memory, where they come from) for one variant, from this process only."""
    made = _timed_here(records, ids)
    timed = made or state.extra_timings.get(variant, [])
    if not timed:
        return None, None, ("not measured in this run" + (
            ": its BF16 references came from the cache (timing.bf16_twin=true times a BF16 twin in this run; "
            "a quant=bf16 run times BF16 in its own run)" if variant == "bf16" else ""))
    warmup = timing_cfg(state.cfg)["warmup_steps"]
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
