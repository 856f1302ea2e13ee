"""The calibration bench (``python -m wanexp.bench bench=calib_a14b``): the runner's real calibrate and
quantize stages for ``quant=tsclip`` on ``model=a14b_random`` at full width on the GPU, at reduced
depth, steps and samples, with the BF16 generation of one video at the same setting in the same
process as the yardstick; then a projection to the papers' setting (16 samples, 40 steps, CFG,
720×1280×61, 40 blocks) by the formulas printed beside the figures, checked once at a larger setting.

Per stage: seconds, peak GPU memory (allocated), peak host RSS (sampled every 50 ms), bytes written
(run directory and calibration cache). The stages are wanexp's own (``wanexp.stages``); nothing here
re-implements them.

The model of the costs (fitted on the measured settings, each term measured, not assumed):

    calibration  = N · (o_cal + S · (a_cal + b_cal · L))       o: per-sample overhead (text and image
    generation   = o_gen + S · (a_gen + b_gen · L)               encoding, twice in calibration; VAE
    quantize     = 2 experts · L · q_block                       decode in generation); a + b·L: one
    GPU peak     = p0 + L · p_block                              denoising step (both CFG passes)

``a + b·L`` comes from the per-step times that calibrate records (``stages/calibrate.json``), so
the overheads are measured directly; ``q_block`` from the per-layer build times in ``choices.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

GB = 1e9
REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


class HostPeak:
    """Peak resident memory of this process while the block runs (sampled; /proc, no extra package)."""

    def __init__(self, every_s: float = 0.05):
        self.every, self.peak, self._stop = every_s, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        return False


def _bytes_under(*dirs: Path) -> int:
    return sum(p.stat().st_size for d in dirs if Path(d).exists() for p in Path(d).rglob("*") if p.is_file())


def measure(fn: Callable[[], Any], dirs: tuple[Path, ...]) -> tuple[Any, dict]:
    """Run ``fn``; its seconds, GPU peak, host RSS peak and the bytes it added under ``dirs``."""
    before = _bytes_under(*dirs)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with HostPeak() as host:
        out = fn()
        if cuda:
            torch.cuda.synchronize()
    return out, {"seconds": round(time.perf_counter() - start, 3),
                 "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
                 "host_peak_bytes": int(host.peak), "bytes_written": _bytes_under(*dirs) - before}


def compose_run(overrides: list[str]):
    """The run config of ``python -m wanexp OVERRIDES`` (conf/), also from inside the bench's own Hydra
    app (bench_conf/), whose global state is set aside and put back."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    held = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO_CONF), version_base=None):
            return compose("config", overrides=overrides)
    finally:
        if held is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(held)


def one_setting(setting: dict, common: list[str], work: Path, log: Callable[[str], None], quantize: bool) -> dict:
    """Calibrate (and quantize) one setting through the runner's stages; one BF16 video beside it."""
    from wanexp.run import Run, validate
    from wanexp.stages.calibrate import calibrate
    from wanexp.stages.quantize import quantize as quantize_stage

    name = setting["name"]
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    overrides = [*common, f"++model.num_layers={setting['num_layers']}",
                 f"++quant.store_hessians={str(bool(setting.get('store_hessians', False))).lower()}",
                 *([f"model.calib.offload={setting['calib_offload']}"] if setting.get("calib_offload") else []),
                 f"model.generation.num_inference_steps={setting['steps']}",
                 f"data.calib.num_samples={setting['samples']}", f"paths.output_root={root}"]
    cfg = compose_run(overrides)
    validate(cfg)
    run_dir = root / "run"
    state = Run(cfg, run_dir)
    out: dict[str, Any] = {"setting": setting, "overrides": overrides}
    _, out["build"] = measure(state.bf16_pipe, (root,))
    if setting.get("video", True):
        bf16_video(state, cfg, out, log)
    info, out["calibrate"] = measure(lambda: calibrate(state), (root,))
    out["calibrate_info"] = {k: info[k] for k in ("parts", "pass_seconds", "step_times", "hessians", "step_gpu_peaks")
                             if k in info}
    # calibrate resets the GPU peak at every step end (recording each step's): the stage's peak is the max of
    # those and what measure() saw after the last step (building the GPTQ layers, saving)
    phases = gpu_phases(out["calibrate_info"].get("step_gpu_peaks") or {}, out["calibrate"]["gpu_peak_bytes"])
    out["calibrate"]["gpu_phases"] = phases
    out["calibrate"]["gpu_peak_bytes"] = max(phases.values())
    log(f"{name}: calibrate {out['calibrate']['seconds']:.1f} s, GPU peak {out['calibrate']['gpu_peak_bytes'] / GB:.1f} GB, "
        f"host peak {out['calibrate']['host_peak_bytes'] / GB:.1f} GB, wrote {out['calibrate']['bytes_written'] / GB:.2f} GB")
    if quantize:
        _, out["quantize"] = measure(lambda: quantize_stage(state), (root,))
        out["layer_seconds"] = json.loads((run_dir / "artifact" / "layer_seconds.json").read_text())
        log(f"{name}: quantize {out['quantize']['seconds']:.1f} s, GPU peak {out['quantize']['gpu_peak_bytes'] / GB:.1f} GB")
    del state
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bf16_video(state, cfg, out: dict, log: Callable[[str], None]) -> None:
    """One BF16 video at the setting, timed step by step, into ``out["bf16_video"]``."""
    from omegaconf import OmegaConf

    from wanexp.generate import generate_one
    gen = OmegaConf.to_container(cfg.model.generation, resolve=True)
    sample = state.splits.eval[0]
    marks: list[float] = []
    name, root = out["setting"]["name"], Path(str(cfg.paths.output_root))

    def step_mark():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    t0 = time.perf_counter()
    _, out["bf16_video"] = measure(lambda: generate_one(state.bf16_pipe(), sample, gen, int(cfg.seed), on_step=step_mark),
                                   (root,))
    steps = [b - a for a, b in zip(marks, marks[1:])]
    out["bf16_video"].update(video_seconds=out["bf16_video"]["seconds"], step_marks=[m - t0 for m in marks],
                             step_s=sum(steps) / len(steps) if steps else float("nan"))
    out["bf16_video"]["overhead_s"] = out["bf16_video"]["seconds"] - len(marks) * out["bf16_video"]["step_s"]
    log(f"{name}: BF16 video {out['bf16_video']['seconds']:.1f} s, {out['bf16_video']['step_s']:.2f} s a step "
        f"(peak {out['bf16_video']['gpu_peak_bytes'] / GB:.1f} GB)")


def gpu_phases(step_peaks: dict[str, list[list[int]]], after_last_step: int) -> dict[str, int]:
    """Calibrate's GPU peak by phase: ``encode`` (each sample's text and image encoding and first step),
    ``denoise`` (the other steps: the expert's weights, the Hessians and one step's activations) and
    ``after`` (after the last step: building the GPTQ layers from transient Hessians, saving)."""
    first = [p[0] for per_pass in step_peaks.values() for p in per_pass if p]
    rest = [x for per_pass in step_peaks.values() for p in per_pass for x in p[1:]]
    return {"encode": max(first, default=0), "denoise": max(rest, default=0), "after": int(after_last_step)}


def step_costs(result: dict) -> dict:
    """From the marks calibrate records per pass and sample ([start, end of each step, end]): the mean
    seconds of one denoising step (both CFG passes), the per-sample overhead (text and image encoding,
    the skipped high-noise stand-in steps, the first step's warm-up), and the seconds of calibrate
    spent outside the trajectories (building the GPTQ layers from transient Hessians, saving)."""
    diffs, traj, n_steps = [], 0.0, 0
    for marks_list in result["calibrate_info"]["step_times"].values():
        for marks in marks_list:
            inner = marks[1:-1]
            diffs += [b - a for a, b in zip(inner, inner[1:])]
            traj += marks[-1] - marks[0]
            n_steps += len(inner)
    step = sum(diffs) / len(diffs) if diffs else float("nan")
    samples = result["setting"]["samples"]
    return {"step_s": step, "trajectory_s": traj, "overhead_per_sample_s": (traj - step * n_steps) / samples,
            "outside_trajectories_s": result["calibrate"]["seconds"] - traj}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b·x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


PAPER_TOKENS = 57_600  # one expert forward at 720x1280x61 (45 x 80 x 16 latent patches; the CFG passes are separate forwards)


def _stage_peak(r: dict, key: str) -> int:
    """The peak of calibrate and (when run) quantize: the default builds the GPTQ layers inside calibrate."""
    return max(r["calibrate"][key], r.get("quantize", {}).get(key, 0))


def project(results: list[dict], paper: dict) -> dict:
    """The cost model of the module docstring, fitted on the settings marked ``fit``."""
    fit = [r for r in results if r["setting"].get("fit", True)]
    costs = {r["setting"]["name"]: step_costs(r) for r in results}
    a_cal, b_cal = fit_line([(r["setting"]["num_layers"], costs[r["setting"]["name"]]["step_s"]) for r in fit])
    o_cal = sum(costs[r["setting"]["name"]]["overhead_per_sample_s"] for r in fit) / len(fit)
    # building GPTQ layers inside calibrate (transient Hessians) is counted with quantize below
    outside_per_block = [costs[r["setting"]["name"]]["outside_trajectories_s"] / r["setting"]["num_layers"] for r in fit]
    # generation: one video per setting, timed step by step: o_gen (encoders, VAE decode) + S·(a_gen + b_gen·L)
    videos = [r for r in fit if "bf16_video" in r]
    a_gen, b_gen = fit_line([(r["setting"]["num_layers"], r["bf16_video"]["step_s"]) for r in videos])
    o_gen = sum(r["bf16_video"]["overhead_s"] for r in videos) / len(videos)
    L, S, N = paper["num_layers"], paper["steps"], paper["samples"]
    step = a_cal + b_cal * L
    cal = N * (o_cal + S * step)
    gen = o_gen + S * (a_gen + b_gen * L)
    out = {"a_cal": a_cal, "b_cal": b_cal, "o_cal": o_cal, "o_gen": o_gen, "a_gen": a_gen, "b_gen": b_gen,
           "calibration_s": cal, "bf16_generation_s_per_video": gen, "calibration_vs_bf16_generation": cal / (N * gen)}
    qs = [r for r in results if "quantize" in r]
    if qs:
        r = qs[0]
        per_block = sum(v for e in r["layer_seconds"].values() for v in e.values() if v) / (2 * r["setting"]["num_layers"])
        out["quantize_s"] = 2 * L * per_block
        out["quantize_per_block_s"] = per_block
    # memory and disk of the default path (transient Hessians, calibration placed as the model's default),
    # grown by what one more block adds, the slope over the fit settings on that same path
    default = [r for r in fit if not r["setting"].get("store_hessians") and not r["setting"].get("calib_offload")] or fit
    base = max(default, key=lambda r: r["setting"]["num_layers"])
    L0 = base["setting"]["num_layers"]
    out["memory_base_setting"] = base["setting"]["name"]
    slope = (lambda key: fit_line([(r["setting"]["num_layers"], _stage_peak(r, key)) for r in default])[1]
             if len({r["setting"]["num_layers"] for r in default}) >= 2 else float("nan"))
    out["gpu_peak_per_block_bytes"], out["host_peak_per_block_bytes"] = slope("gpu_peak_bytes"), slope("host_peak_bytes")
    out["calibrate_gpu_peak_bytes"] = _stage_peak(base, "gpu_peak_bytes") + (L - L0) * out["gpu_peak_per_block_bytes"]
    # by phase (encoders, denoising steps, after the steps): each grown by its own per-block slope; the peak
    # at L blocks is the largest of them (at few blocks the encoders' phase can hide the others' slopes)
    phased = [r for r in default if r["calibrate"].get("gpu_phases", {}).get("denoise")]
    if len({r["setting"]["num_layers"] for r in phased}) >= 2:
        by_phase = {}
        for ph in ("encode", "denoise", "after"):
            pts = [(r["setting"]["num_layers"], max(r["calibrate"]["gpu_phases"][ph],
                                                     r.get("quantize", {}).get("gpu_peak_bytes", 0) if ph == "after" else 0))
                   for r in phased]
            a, b = fit_line(pts)
            by_phase[ph] = {"at_L0_bytes": a + b * L0, "per_block_bytes": b, "projected_bytes": a + b * L}
        out["gpu_peak_by_phase"] = by_phase
        out["calibrate_gpu_peak_bytes"] = max(v["projected_bytes"] for v in by_phase.values())
    out["calibrate_host_peak_bytes"] = _stage_peak(base, "host_peak_bytes") + (L - L0) * out["host_peak_per_block_bytes"]
    written = base["calibrate"]["bytes_written"] + base.get("quantize", {}).get("bytes_written", 0)
    out["calibrate_bytes_written"] = written * L / L0  # all of it scales with the blocks (an upper bound)
    def predicted_gpu(n: int) -> float:
        if "gpu_peak_by_phase" in out:
            return max(v["at_L0_bytes"] + (n - L0) * v["per_block_bytes"] for v in out["gpu_peak_by_phase"].values())
        return _stage_peak(base, "gpu_peak_bytes") + (n - L0) * out["gpu_peak_per_block_bytes"]
    out["memory_checks"] = {r["setting"]["name"]: {
        "predicted_gpu_bytes": predicted_gpu(r["setting"]["num_layers"]),
        "measured_gpu_bytes": r["calibrate"]["gpu_peak_bytes"]} for r in results if not r["setting"].get("fit", True)}
    # the largest temporary of the collector's per-channel statistics, at the papers' resolution
    from wanexp.calib.collect import observe_transient_bytes
    out["observe_transient_bytes"] = observe_transient_bytes(PAPER_TOKENS, 13824)
    out["outside_trajectories_per_block_s"] = sum(outside_per_block) / len(outside_per_block)
    checks = {}
    for r in results:
        if r["setting"].get("fit", True):
            continue
        s = r["setting"]
        predicted = s["samples"] * (o_cal + s["steps"] * (a_cal + b_cal * s["num_layers"]))
        measured = costs[s["name"]]["trajectory_s"]
        checks[s["name"]] = {"predicted_s": predicted, "measured_s": measured, "error": predicted / measured - 1,
                             "calib_offload": s.get("calib_offload") or "default"}
    out["checks"] = checks
    return out


def run_calib_bench(cfg: dict, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    import datetime

    import diffusers
    import triton
    work = Path(cfg.get("work_dir") or "/tmp/wanexp_calib_bench")
    common = list(cfg["overrides"])
    result: dict[str, Any] = {"name": cfg["name"], "date": str(datetime.date.today()),
                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "triton": triton.__version__,
                              "diffusers": diffusers.__version__, "overrides": common, "settings": []}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        (out_dir / f"{cfg['name']}.json").write_text(json.dumps(result, indent=1, default=str))

    for i, setting in enumerate(cfg["settings"]):
        result["settings"].append(one_setting(setting, common, work, log, quantize=bool(setting.get("quantize"))))
        save()
    result["projection"] = project(result["settings"], cfg["paper"])
    save()
    md = to_markdown(result, cfg)
    (out_dir / f"{cfg['name']}.md").write_text(md)
    log(md)
    return result


def _peak_of(r: dict, name: str, key: str) -> int:
    return _stage_peak(next(x for x in r["settings"] if x["setting"]["name"] == name), key)


def to_markdown(r: dict, cfg: dict) -> str:
    p = r["projection"]
    paper = cfg["paper"]
    lines = [f"# Calibration at A14B size ({r['gpu']}, {r['date']}; torch {r['torch']}, diffusers {r['diffusers']})", "",
             "The runner's calibrate and quantize stages, in process; common overrides: "
             f"`{' '.join(r['overrides'])}`.", "",
             "| setting | blocks | steps | samples | Hessians | calib offload | BF16 video s | calibrate s | step s | GPU peak GB | host peak GB | written GB | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["settings"]:
        st = s["setting"]
        c = s["calibrate"]
        q = s.get("quantize", {})
        video = s.get("bf16_video", {}).get("video_seconds", float("nan"))
        lines.append(f"| {st['name']}{'' if st.get('fit', True) else ' (not fitted)'} | {st['num_layers']} | {st['steps']} | "
                     f"{st['samples']} | {'stored' if st.get('store_hessians') else 'transient'} | "
                     f"{st.get('calib_offload') or 'default'} | {video:.1f} | {c['seconds']:.1f} | "
                     f"{step_costs(s)['step_s']:.2f} | {c['gpu_peak_bytes'] / GB:.1f} | {c['host_peak_bytes'] / GB:.1f} | "
                     f"{c['bytes_written'] / GB:.2f} | {q.get('seconds', float('nan')):.1f} |")
    lines += ["", "Calibrate's seconds include building the GPTQ layers from the transient Hessians (the A14B default); "
              "the trajectories alone are the step times' sum (`stages/calibrate.json` step_times).", "",
              f"Fit: one calibration step (both CFG passes) = {p['a_cal']:.3f} + {p['b_cal']:.4f}·L s; per-sample "
              f"overhead {p['o_cal']:.1f} s; BF16 video = {p['o_gen']:.1f} + S·({p['a_gen']:.3f} + {p['b_gen']:.4f}·L) s "
              "(its steps timed the same way; o: text and image encoding, VAE decode).", ""]
    base = p["memory_base_setting"]
    L0 = next(x["setting"]["num_layers"] for x in r["settings"] if x["setting"]["name"] == base)
    lines += [f"Memory (the default path: transient Hessians, calibration placed by the model's default): GPU peak = "
              f"{_peak_of(r, base, 'gpu_peak_bytes') / GB:.1f} GB at {L0} blocks ({base}) + (L − {L0}) × "
              f"{p['gpu_peak_per_block_bytes'] / GB:.3f} GB a block; host peak = {_peak_of(r, base, 'host_peak_bytes') / GB:.1f} GB "
              f"+ (L − {L0}) × {p['host_peak_per_block_bytes'] / GB:.3f} GB a block (slopes over the fitted settings on that "
              f"path; peaks of calibrate and quantize). The collector's largest temporary at 720p: "
              f"{p['observe_transient_bytes'] / GB:.2f} GB (ffn.net.2, {PAPER_TOKENS} tokens, 8192 rows at a time).", ""]
    if p.get("gpu_peak_by_phase"):
        lines.append("GPU peak by phase of calibrate, each grown by its own slope (the projection takes the largest): "
                     + "; ".join(f"{ph} {v['at_L0_bytes'] / GB:.1f} GB at {L0} blocks + (L − {L0}) × "
                                 f"{v['per_block_bytes'] / GB:.3f} GB → {v['projected_bytes'] / GB:.1f} GB"
                                 for ph, v in p["gpu_peak_by_phase"].items()) + ".")
    for name, c in p.get("memory_checks", {}).items():
        lines.append(f"GPU peak at {name}: by the formula {c['predicted_gpu_bytes'] / GB:.1f} GB, measured "
                     f"{c['measured_gpu_bytes'] / GB:.1f} GB (a stored-Hessian or group-offloaded setting: no GPTQ "
                     "layers built inside calibrate, or blocks offloaded).")
    for name, c in p["checks"].items():
        lines.append(f"Check at {name} (calibration offload {c.get('calib_offload', 'default')}): trajectories predicted "
                     f"{c['predicted_s']:.1f} s by the fit on the default, measured {c['measured_s']:.1f} s ({c['error']:+.1%}).")
    lines += ["", f"## Projected to the papers' setting ({paper['samples']} samples, {paper['steps']} steps, CFG, "
              f"{paper['num_layers']} blocks)", "",
              "| quantity | projected | target |", "|---|---|---|",
              f"| calibration, both experts | {p['calibration_s'] / 3600:.2f} h | |",
              f"| calibration ÷ BF16 generation of the same videos | {p['calibration_vs_bf16_generation']:.2f}× | ≤ 1.5× |",
              f"| BF16 generation, one video | {p['bf16_generation_s_per_video']:.0f} s | |",
              f"| calibration GPU peak | {p['calibrate_gpu_peak_bytes'] / GB:.1f} GB | ≤ 75 GB |",
              f"| calibration host peak | {p['calibrate_host_peak_bytes'] / GB:.1f} GB | ≤ 100 GB |",
              f"| calibration disk written | {p['calibrate_bytes_written'] / GB:.1f} GB | ≤ 30 GB |"]
    if "quantize_s" in p:
        lines.append(f"| smoothing, SVD, GPTQ, TS-clip of all 800 layers | {p['quantize_s'] / 60:.1f} min | ≤ 30 min |")
    return "\n".join(lines) + "\n"
