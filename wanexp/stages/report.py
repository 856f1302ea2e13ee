"""The report stage: the run's results row (CSV + parquet), the per-sample table, the W&B run,
report.html and the printed summary; and the labels that tell runs apart in a table."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from wanexp.data import calib_record, sample_table
from wanexp.errors import WanexpError
from wanexp.evaluate.vbench import HIF4_DIMENSIONS as ALL_DIMENSIONS
from wanexp.generate import done_records
from wanexp.io import atomic_path, read_json, read_jsonl, write_json, write_text
from wanexp.provenance import provenance
from wanexp.quant.artifact import artifact_files
from wanexp.report.html import record_versions, write_run_report
from wanexp.report.results import write_row
from wanexp.report.stats import Bootstrap, metric_intervals
from wanexp.report.table import PER_SAMPLE
from wanexp.report.wandb_log import log_run, sweep_group
from wanexp.rundir import RunDir
from wanexp.stages.evaluate import twin_vbench_file
from wanexp.stages.quantize import artifact_path, keep_lists
from wanexp.stages.state import Run


def report(state: Run) -> dict:
    """One results row (CSV + parquet), the per-sample table, W&B, report.html and the printed summary."""
    cfg, run_dir = state.cfg, state.run_dir
    if not state.dir.eval_summary.is_file():
        raise WanexpError(f"{run_dir} has no evaluation yet (run stage=evaluate first)")
    evals = read_json(state.dir.eval_summary)
    gen = read_json(state.dir.generated)
    row = results_row(state, evals, gen)
    twin = None
    if "vbench" in cfg.evaluate.get("metrics", ()) and state.recorded(gen, "quant_dir") != state.recorded(gen, "reference_dir"):
        twin = twin_vbench_file(state.recorded(gen, "reference_dir"), OmegaConf.to_container(cfg.evaluate.vbench, resolve=True))
    per_sample = per_sample_table(run_dir, twin).merge(sample_table(state.splits.eval), on="id", how="left")
    with atomic_path(state.dir.per_sample) as tmp:
        per_sample.to_csv(tmp, index=False)
    # each per-video metric's interval over this run's samples (README "Intervals and sample sizes")
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
    artifact = artifact_files(artifact_path(state)) if logger.get("log_artifact") and cfg.quant.name != "bf16" else None
    wandb_where = log_run(logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                          {k: v for k, v in row.items() if k != "run_dir"},
                          {"per_sample": per_sample, "results": pd.DataFrame([row])}, videos=videos, artifact=artifact)
    record_versions(run_dir)
    html = write_run_report(run_dir, OmegaConf.to_container(cfg.report, resolve=True))
    summary = dict(row, videos=str(quant_dir), reference_videos=str(state.recorded(gen, "reference_dir")),
                   results=str(state.dir.results_csv), wandb=wandb_where, report=str(html))
    write_json(state.dir.summary, summary)
    write_text(state.dir.summary_txt, format_summary(summary) + "\n")
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
    table = pd.DataFrame(read_jsonl(RunDir(run_dir).fidelity))
    for path, suffix in ((RunDir(run_dir).vbench, ""), (twin_vbench, "_bf16")):
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
    path = RunDir(run_dir).hydra_overrides
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


def format_summary(s: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
    return "\n".join([
        f"wanexp  method={s['method']}  format={s['format']}  experts={s['expert_policy']}  model={s['model']}",
        f"  videos: {s['num_videos']}   PSNR {num(s['psnr'], '.2f')} dB   SSIM {num(s['ssim'], '.4f')}   "
        f"latent rel. err {num(s['latent_rel_err'], '.4f')}",
        *([f"  VBench avg {num(s['vbench_avg'], '.4f')} (bf16 {num(s.get('vbench_avg_bf16'), '.4f')})   "
           + "   ".join(f"{d} {num(s[d], '.4f')}" for d in ALL_DIMENSIONS if d in s)] if "vbench_avg" in s else []),
        f"  model size {num(s['model_size_gb'], '.4f')} GB   s/video {num(s['sec_per_video'], '.2f')} "
        f"(bf16 {num(s['sec_per_video_bf16'], '.2f')})",
        f"  videos:  {s['videos']}",
        f"  table:   {s['results']}",
        f"  wandb:   {s['wandb'] or 'off'}",
        *([f"  report:  {s['report']}"] if s.get("report") else []),
    ])


def _gb(n: int | None) -> float | None:
    return None if n is None else n / 1e9
