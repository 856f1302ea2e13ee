"""The data behind the seed paper's diagnostic figures, computed from what a run already recorded.

No drawing here (that is :mod:`wanexp.report.plots`) and no model: every function reads the run
directory (calibration statistics, ``artifact/choices.json``, the artifact header, results rows) and
returns pandas DataFrames / numpy arrays that tests can check.

| figure | function | recorded by |
|---|---|---|
| activation non-stationarity (paper Fig. 1) | :func:`activation_trace`, :func:`trace_groups` | calibrate: per-step traces of ``analysis.layers`` |
| clip-ratio distribution (paper Fig. 3)    | :func:`clip_distribution` | quantize: ``clip`` per layer in choices.json |
| sensitivity map (paper Fig. 4)             | :func:`sensitivity_table`, :func:`sensitivity_ranking`, :func:`keep_policy` | quantize: ``cos_err`` / ``w_cos_err`` per layer |
| quality vs memory                          | :func:`quality_memory` | report: results rows |
| qualitative comparison (frames side by side) | :func:`run_videos`, :func:`pick_samples`, :func:`qualitative_grid` | generate: the mp4s; evaluate: latent errors |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from wanexp.calib.collect import load_traces
from wanexp.errors import WanexpError
from wanexp.generate import done_records
from wanexp.video import read_mp4
from wanexp.io import read_jsonl
from wanexp.quant.artifact import read_header
from wanexp.quant.targets import BLOCK_RE
from wanexp.rundir import RunDir
from wanexp.schema import EXPERTS, PERCENTILE

# The rows of the sensitivity map, in the paper's order (self-attention, cross-attention, FFN).
MODULE_TYPES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2")


class NotRecorded(WanexpError):
    """What a figure needs was not recorded by this run (the message says why and what would).

    ``missing``: a short noun phrase for what is absent (``"no quantized artifact"``); ``stage``: the
    stage that records it, when running that stage would (None when no stage of this run would)."""

    def __init__(self, message: str, missing: str | None = None, stage: str | None = None):
        super().__init__(message)
        self.missing, self.stage = missing or message, stage


class NothingToAnalyze(NotRecorded):
    """No figure at all can be drawn: ``reasons`` maps each figure to its :class:`NotRecorded`."""

    def __init__(self, run_dir: Path, reasons: Mapping[str, NotRecorded]):
        self.reasons = dict(reasons)
        missing = list(dict.fromkeys(r.missing for r in self.reasons.values()))
        super().__init__(f"nothing to analyze in {run_dir}: {', '.join(missing)}", ", ".join(missing),
                         next((r.stage for r in self.reasons.values() if r.stage), None))

    @property
    def stages(self) -> list[str]:
        """The stages that would record what is missing (each once)."""
        return list(dict.fromkeys(r.stage for r in self.reasons.values() if r.stage))


# ---------------------------------------------------------------------------------------------
# what calibration traces (config → layer names)
# ---------------------------------------------------------------------------------------------
def trace_spec(analysis_cfg: Mapping[str, Any] | None, layer_names: Sequence[str]) -> dict:
    """``{"layers": [...], "percentile": p, "tokens": n}``: the layers whose per-step statistics
    calibration records, resolved against the model's targeted linears.

    ``analysis.layers: auto`` is the FFN down projection of the middle block (``blocks.20.ffn.net.2``
    on the 40-block A14B, ``blocks.2.ffn.net.2`` on the 4-block tiny model); ``[]`` records none."""
    cfg = dict(analysis_cfg or {})
    layers = cfg.get("layers", "auto")
    names = list(layer_names)
    if layers in (None, "auto"):
        blocks = sorted({int(m.group(1)) for m in map(BLOCK_RE.match, names) if m})
        layers = [f"blocks.{(blocks[-1] + 1) // 2}.ffn.net.2"] if blocks else []
        layers = [n for n in layers if n in names]
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(str(n) for n in layers))
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise WanexpError(f"analysis.layers names {unknown}, which are not targeted linears of this model "
                          f"(e.g. {', '.join(names[:3])}, …)")
    if not layers:
        return {}
    return {"layers": layers, "percentile": float(cfg.get("percentile", PERCENTILE)),
            "tokens": int(cfg.get("trace_tokens", 16384))}


# ---------------------------------------------------------------------------------------------
# where a run keeps things
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def run_config(run_dir: Path) -> dict:
    path = RunDir(run_dir).config
    return _read_json(path) if path.is_file() else {}


def stats_dir(run_dir: Path) -> Path | None:
    """The calibration statistics of the run (the content-addressed cache dir or ``calib/``), or None."""
    marker = RunDir(run_dir).marker("calibrate")
    if not marker.is_file():
        return None
    info = _read_json(marker)
    if "skipped" in info:
        return None
    return Path(info.get("stats_dir", RunDir(run_dir).calib))


def artifact_file(run_dir: Path) -> Path:
    """The run's artifact, or the one it reused (``quant.load``)."""
    load = (run_config(run_dir).get("quant") or {}).get("load")
    return Path(str(load)).expanduser() if load else RunDir(run_dir).artifact


def artifact_header(run_dir: Path) -> dict:
    path = artifact_file(run_dir)
    if not path.is_file():
        if _method(run_dir) == "bf16":
            raise NotRecorded("quant=bf16 quantizes nothing: the run has no quantized artifact", "no quantized artifact")
        raise NotRecorded(f"{run_dir} has no quantized artifact ({path}); run stage=quantize first",
                          "no quantized artifact", "quantize")
    return read_header(path)


def _method(run_dir: Path) -> str:
    return str((run_config(run_dir).get("quant") or {}).get("name", "?"))


def choices(run_dir: Path) -> dict:
    path = RunDir(run_dir).choices
    if not path.is_file():
        cfg = run_config(run_dir)
        if (cfg.get("quant") or {}).get("name") == "bf16":
            raise NotRecorded("quant=bf16 quantizes nothing: the run has no per-layer choices", "no quantized artifact")
        if (cfg.get("quant") or {}).get("load"):
            raise NotRecorded(f"{run_dir} has no artifact/choices.json: quant.load reused an artifact (its choices "
                              "stay with the run that made it)", "no per-layer choices")
        raise NotRecorded(f"{run_dir} has no artifact/choices.json: run stage=quantize first",
                          "no quantized artifact", "quantize")
    return _read_json(path)


# ---------------------------------------------------------------------------------------------
# Fig. 1: activation non-stationarity
# ---------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One layer's per-step, per-channel input statistics over the BF16 calibration trajectories."""

    layer: str
    timestep: np.ndarray            # [S], descending: steps in the order denoising visits them
    expert: np.ndarray              # [S], the expert that ran each step
    absmax: np.ndarray              # [S, C] max |x| over every token of the step's forwards
    pct: np.ndarray                 # [S, C] the percentile of |x| (mean over the step's forwards)
    percentile: float
    count: np.ndarray               # [S] forwards folded into each step (CFG passes × samples)
    boundary: float | None = None   # the expert switch timestep (None when no artifact says it)
    bins: dict = field(default_factory=dict)  # expert → TS-clip bin edges (timesteps)

    @property
    def steps(self) -> int:
        return len(self.timestep)

    @property
    def channels(self) -> int:
        return self.absmax.shape[1]

    @property
    def switch_step(self) -> int | None:
        """Index of the first low-noise step (None when one expert ran every step)."""
        low = np.nonzero(self.expert == "low_noise")[0]
        high = np.nonzero(self.expert == "high_noise")[0]
        return int(low[0]) if len(low) and len(high) else None


def trace_layers(run_dir: Path) -> list[str]:
    """The layers whose per-step trace this run's calibration recorded."""
    return sorted({layer for _, layer in _load_traces(run_dir)})


def _load_traces(run_dir: Path) -> dict:
    where = stats_dir(run_dir)
    if where is None:
        raise _no_calibration(Path(run_dir))
    parts = sorted(where.glob("stats-*part*-of*.safetensors"))
    if not parts:
        raise NotRecorded(f"calibration of quant={_method(run_dir)} ran but its statistics are gone from {where} "
                          "(re-run stage=calibrate)", "no calibration statistics", "calibrate")
    traces = load_traces(parts)
    if not traces:
        raise NotRecorded(f"calibration of quant={_method(run_dir)} ran, but its statistics in {where} hold no "
                          "per-step trace (analysis.layers was empty when they were recorded)", "no calibration trace")
    return traces


def _no_calibration(run_dir: Path) -> NotRecorded:
    """Why a run has no BF16 calibration trajectory: calibration has not run yet, or it was skipped."""
    method = _method(run_dir)
    marker = RunDir(run_dir).marker("calibrate")
    if not marker.is_file():
        return NotRecorded(f"calibration has not run in {run_dir} (quant={method}): the per-step traces are "
                           "recorded while calibrating; run stage=calibrate first", "no calibration trace", "calibrate")
    why = str(_read_json(marker).get("skipped", ""))
    if "quant.load" in why:
        return NotRecorded(f"calibration was skipped for quant={method} ({why}): the per-step traces are with "
                           "the run that calibrated that artifact", "no calibration trace")
    return NotRecorded(f"calibration was skipped: {why or f'quant={method} calibrates nothing'}, so no BF16 "
                       "trajectory was traced (the per-step traces are recorded while calibrating a method that "
                       "needs statistics: smoothing, GPTQ or clip search)", "no calibration trace")


def activation_trace(run_dir: Path, layer: str | None = None) -> Trace:
    """The per-step trace of ``layer`` (default: the first traced layer), both experts joined in
    denoising order, with the expert boundary and the TS-clip bins of the run when known."""
    run_dir = Path(run_dir)
    traces = _load_traces(run_dir)
    layers = sorted({l for _, l in traces})
    layer = layer or layers[0]
    if layer not in layers:
        raise NotRecorded(f"{layer} was not traced during calibration (traced: {', '.join(layers)}; "
                          "set analysis.layers before calibrating)")
    ts, ex, amax, pct, count, p = [], [], [], [], [], None
    for expert in EXPERTS:
        d = traces.get((expert, layer))
        if d is None:
            continue
        ts.append(d["timestep"].double().numpy())
        ex += [expert] * len(d["timestep"])
        amax.append(d["absmax"].float().numpy())
        pct.append(d["pct"].float().numpy())
        count.append(d["count"].numpy())
        p = float(d["percentile"]) if "percentile" in d else p
    t = np.concatenate(ts)
    order = np.argsort(-t, kind="stable")
    boundary, bins = None, {}
    try:
        header = artifact_header(run_dir)
        boundary = header.get("boundary")
        bins = {k: list(v["edges"]) for k, v in (header.get("bins") or {}).items()}
    except (NotRecorded, WanexpError):
        key = (stats_dir(run_dir) or run_dir) / "key.json"
        if key.is_file():
            bins = {k: list(v["edges"]) for k, v in (_read_json(key).get("bins") or {}).items()}
    return Trace(layer=layer, timestep=t[order], expert=np.asarray(ex)[order], absmax=np.concatenate(amax)[order],
                 pct=np.concatenate(pct)[order], percentile=p if p is not None else float("nan"),
                 count=np.concatenate(count)[order], boundary=boundary, bins=bins)


def trace_groups(trace: Trace, groups: int = 8) -> pd.DataFrame:
    """Fig. 1's curves: one per contiguous group of channels, the group's max of each statistic per step.

    Columns: step, timestep, expert, group, channels (``lo-hi``), absmax, pct."""
    c = trace.channels
    groups = max(1, min(int(groups), c))
    edges = np.linspace(0, c, groups + 1).round().astype(int)
    rows = []
    for g in range(groups):
        lo, hi = edges[g], edges[g + 1]
        amax = trace.absmax[:, lo:hi].max(axis=1)
        pct = trace.pct[:, lo:hi].max(axis=1)
        for s in range(trace.steps):
            rows.append({"step": s, "timestep": float(trace.timestep[s]), "expert": str(trace.expert[s]),
                         "group": g, "channels": f"{lo}-{hi - 1}", "absmax": float(amax[s]), "pct": float(pct[s])})
    return pd.DataFrame(rows)


def nonstationarity(trace: Trace) -> pd.DataFrame:
    """Per channel group summary of how much the statistic moves over the trajectory: max/min over
    steps of the per-step value, per expert and over the whole trajectory (the paper's argument for
    timestep-aware activation scales)."""
    df = trace_groups(trace)
    out = []
    for (g, ch), sub in df.groupby(["group", "channels"]):
        row = {"group": g, "channels": ch}
        for stat in ("absmax", "pct"):
            v = sub[stat].to_numpy()
            row[f"{stat}_range"] = float(v.max() / max(v.min(), 1e-30))
            for expert in EXPERTS:
                e = sub[sub["expert"] == expert][stat].to_numpy()
                row[f"{stat}_mean_{expert}"] = float(e.mean()) if len(e) else float("nan")
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# Fig. 3: clip-ratio distribution
# ---------------------------------------------------------------------------------------------
def bin_ranges(edges: Sequence[float], low: float, high: float) -> list[tuple[float, float]]:
    """``[(t_lo, t_hi)]`` per bin, bin 0 the noisiest (largest t), as TimestepBins numbers them."""
    cuts = [low, *sorted(float(e) for e in edges), high]
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)][::-1]


def expert_range(expert: str, header: Mapping[str, Any], total: float = 1000.0) -> tuple[float, float]:
    boundary = header.get("boundary")
    if header.get("expert_policy") == "shared" or boundary is None:
        return 0.0, total
    return (float(boundary), total) if expert == "high_noise" else (0.0, float(boundary))


def clip_distribution(run_dir: Path) -> pd.DataFrame:
    """Share of layers choosing each candidate clip ratio, per expert and timestep bin.

    Columns: expert, bin, t_lo, t_hi, bin_label, ratio, layers, share (sums to 1 per expert and bin).
    ``attrs``: candidates, clip_search (False: the method does not search, every ratio is 1)."""
    header = artifact_header(run_dir)
    chosen = choices(run_dir)
    quant = header.get("quant") or {}
    candidates = sorted(float(c) for c in quant.get("clip_candidates") or (1.0,))
    rows = []
    for expert in [e for e in EXPERTS if e in chosen]:
        layers = chosen[expert]
        edges = (header.get("bins") or {}).get(expert, {}).get("edges", [])
        ranges = bin_ranges(edges, *expert_range(expert, header))
        n_bins = len(ranges)
        for b in range(n_bins):
            picks = [float(c["clip"][min(b, len(c["clip"]) - 1)]) for c in layers.values() if c.get("clip")]
            ratios = sorted(set(candidates) | set(picks))
            lo, hi = ranges[b]
            for r in ratios:
                n = sum(1 for p in picks if math.isclose(p, r, abs_tol=1e-6))
                rows.append({"expert": expert, "bin": b, "t_lo": lo, "t_hi": hi, "bin_label": f"{lo:g}–{hi:g}",
                             "ratio": r, "layers": n, "share": n / len(picks) if picks else float("nan")})
    df = pd.DataFrame(rows)
    df.attrs.update(candidates=candidates, clip_search=bool(quant.get("clip_search")))
    return df


# ---------------------------------------------------------------------------------------------
# Fig. 4: sensitivity map and the keep policy it implies
# ---------------------------------------------------------------------------------------------
def split_name(layer: str) -> tuple[int | None, str]:
    m = BLOCK_RE.match(layer)
    return (int(m.group(1)), m.group(2)) if m else (None, layer)


def sensitivity_table(run_dir_or_choices: Path | Mapping[str, Any]) -> pd.DataFrame:
    """One line per quantized layer: expert, layer, block, module, cos_err (output cosine error on
    the layer's calibration tokens; NaN without tokens), rel_err, w_cos_err (weight-only), and
    ``error``: cos_err where recorded, else w_cos_err (``attrs["metric"]`` says which)."""
    chosen = (choices(Path(run_dir_or_choices)) if isinstance(run_dir_or_choices, (str, Path))
              else run_dir_or_choices)
    rows = []
    for expert in [e for e in EXPERTS if e in chosen]:
        for layer, c in chosen[expert].items():
            block, module = split_name(layer)
            rows.append({"expert": expert, "layer": layer, "block": block, "module": module,
                         "cos_err": c.get("cos_err", float("nan")), "rel_err": c.get("rel_err", float("nan")),
                         "w_cos_err": c.get("w_cos_err", float("nan"))})
    df = pd.DataFrame(rows, columns=["expert", "layer", "block", "module", "cos_err", "rel_err", "w_cos_err"])
    if df.empty or (df["cos_err"].isna().all() and df["w_cos_err"].isna().all()):
        raise NotRecorded("the artifact's choices carry no reconstruction errors (quantized before wanexp "
                          "recorded them; re-run stage=quantize)")
    metric = "cos_err" if df["cos_err"].notna().any() else "w_cos_err"
    df["error"] = df[metric].astype(float)
    df.attrs["metric"] = metric
    return df


def module_order(modules: Iterable[str]) -> list[str]:
    modules = set(modules)
    return [m for m in MODULE_TYPES if m in modules] + sorted(modules - set(MODULE_TYPES))


def sensitivity_map(table: pd.DataFrame, expert: str, value: str = "error") -> pd.DataFrame:
    """Rows: module type (paper order), columns: every block index; NaN where the layer stayed in BF16."""
    sub = table[table["expert"] == expert]
    grid = sub.pivot_table(index="module", columns="block", values=value, aggfunc="first")
    known = table["block"].dropna().astype(int)
    blocks = list(range(int(known.max()) + 1)) if len(known) else []  # a block kept whole shows as a NaN column
    return grid.reindex(index=module_order(table["module"]), columns=blocks)


def sensitivity_ranking(table: pd.DataFrame, by: str = "module", expert: str | None = None) -> pd.DataFrame:
    """Module types (``by="module"``) or blocks (``by="block"``) sorted by mean error, most sensitive
    first, for one expert or both pooled. Ties are broken by name, so the order is stable."""
    sub = table if expert is None else table[table["expert"] == expert]
    g = sub.groupby(by)["error"].agg(["mean", "max", "count"]).reset_index()
    g = g.sort_values(["mean", by], ascending=[False, True], kind="stable").reset_index(drop=True)
    g["rank"] = np.arange(1, len(g) + 1)
    return g


def keep_policy(table: pd.DataFrame, modules: int = 2, blocks: int = 0, per_expert: bool = False) -> dict:
    """The keep-in-BF16 policy the sensitivity ranking implies: the ``modules`` most sensitive module
    types in every block (``blocks.*.<type>``, as ``expert=keep_sensitive``) and the ``blocks`` most
    sensitive blocks, pooled over both experts or per expert. Returns the lists and the overrides
    (``expert.keep_modules=[…]`` / ``expert.keep_blocks=[…]``, or ``expert.high_noise.…`` per expert)."""
    def pick(expert):
        mods = [f"blocks.*.{m}" for m in sensitivity_ranking(table, "module", expert)["module"][:modules]]
        blks = [int(b) for b in sensitivity_ranking(table, "block", expert)["block"][:blocks]] if blocks else []
        return {"keep_modules": mods, "keep_blocks": sorted(blks)}

    def overrides(prefix, p):
        out = []
        if p["keep_modules"]:
            out.append(f"{prefix}keep_modules=[{','.join(p['keep_modules'])}]")
        if p["keep_blocks"]:
            out.append(f"{prefix}keep_blocks=[{','.join(map(str, p['keep_blocks']))}]")
        return out

    if not per_expert:
        p = pick(None)
        return dict(p, overrides=overrides("expert.", p))
    per = {e: pick(e) for e in EXPERTS if e in set(table["expert"])}
    return {"per_expert": per, "overrides": [o for e, p in per.items() for o in overrides(f"expert.{e}.", p)]}


# ---------------------------------------------------------------------------------------------
# quality vs memory
# ---------------------------------------------------------------------------------------------
LOWER_IS_BETTER = {"latent_rel_err"}


def pareto_mask(x: Sequence[float], y: Sequence[float], y_lower_better: bool = False) -> np.ndarray:
    """True for points no other point dominates (x no larger, y no worse, one of them strictly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not y_lower_better:
        y = -y
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep & np.isfinite(x) & np.isfinite(y)


def _pick(df: pd.DataFrame, choice: str, options: Sequence[str], what: str) -> str:
    if choice not in (None, "auto"):
        if choice not in df or df[choice].isna().all():
            raise NotRecorded(f"no run has {what} {choice!r}")
        return choice
    for c in options:
        if c in df and df[c].notna().any():
            return c
    raise NotRecorded(f"no run has any of {', '.join(options)} ({what})")


def run_label(row: Mapping[str, Any]) -> str:
    parts = [str(row.get("method"))]
    fmt = row.get("format")
    if isinstance(fmt, str) and fmt != "bf16":
        parts.append(fmt)
    kept = row.get("kept")
    if isinstance(kept, str) and kept:
        parts.append(f"kept {kept}")
    return " ".join(parts)


def quality_memory(rows: pd.DataFrame, x: str = "auto", y: str = "auto", bf16_twins: bool = True) -> pd.DataFrame:
    """One point per finished run's results row (quality against size or memory), the Pareto front marked
    (``wanexp.report.results.gather`` reads the rows of run or sweep directories).

    ``x``: ``peak_memory_gb`` when every run measured it (CUDA), else ``model_size_gb``; ``y``:
    ``vbench_avg`` when computed, else ``latent_rel_err`` (lower is better), else ``psnr``. Each run's
    BF16 twin (measured in the same run) is added as a point when no bf16 run is among them.
    Columns: label, method, x, y, pareto, twin, run_dir; ``attrs``: x, y, lower_is_better."""
    if rows.empty:
        raise NotRecorded("no finished run (results.csv) to plot: run stage=report first", "no results row", "report")
    if x in (None, "auto"):
        x = "peak_memory_gb" if "peak_memory_gb" in rows and rows["peak_memory_gb"].notna().all() else "model_size_gb"
    x = _pick(rows, x, ("model_size_gb",), "a size/memory column")
    y = _pick(rows, y, ("vbench_avg", "latent_rel_err", "psnr"), "a quality metric")
    lower = y in LOWER_IS_BETTER
    pts = [{"label": run_label(r), "method": r.get("method"), "x": r.get(x), "y": r.get(y), "twin": False,
            "run_dir": r.get("run_dir")} for r in rows.to_dict("records")]
    if bf16_twins and not (rows["method"] == "bf16").any():
        twin_y = {"latent_rel_err": 0.0}.get(y)  # the reference of fidelity metrics is exact by definition
        seen = set()
        for r in rows.to_dict("records"):
            tx, ty = r.get(f"{x}_bf16"), r.get(f"{y}_bf16")
            ty = twin_y if ty is None or pd.isna(ty) else ty
            key = (r.get("model"), r.get("data"), r.get("seed"))
            if tx is None or ty is None or pd.isna(tx) or pd.isna(ty) or key in seen:
                continue
            seen.add(key)
            pts.append({"label": "bf16 (twin)", "method": "bf16", "x": tx, "y": ty, "twin": True,
                        "run_dir": r.get("run_dir")})
    df = pd.DataFrame(pts)
    df["x"], df["y"] = df["x"].astype(float), df["y"].astype(float)
    df = df[np.isfinite(df["x"]) & np.isfinite(df["y"])].reset_index(drop=True)
    df["pareto"] = pareto_mask(df["x"], df["y"], lower)
    df.attrs.update(x=x, y=y, lower_is_better=lower)
    return df


# ---------------------------------------------------------------------------------------------
# qualitative comparison: frames of the written videos side by side (seed paper Fig. 5)
# ---------------------------------------------------------------------------------------------
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # first, 1/4, 1/2, 3/4, last frame


@dataclass
class Videos:
    """One variant's videos (BF16 reference or a method): a label, where they are, manifest records by id."""

    label: str
    root: Path
    records: dict[str, dict]
    run_dir: Path | None = None

    def path(self, sample: str) -> Path:
        return self.root / self.records[sample]["video"]


def method_label(run_dir: Path) -> str:
    """``tsclip mxfp4(scale_rule=ceil)``: the run's results row label, else its config's method and format."""
    results = RunDir(run_dir).results_csv
    if results.is_file():
        return run_label(pd.read_csv(results).iloc[0].to_dict())
    cfg = run_config(run_dir)
    return f"{(cfg.get('quant') or {}).get('name', '?')} {(cfg.get('format') or {}).get('name', '')}".strip()


def run_videos(run_dir: Path) -> tuple[Videos, Videos | None]:
    """(the BF16 reference videos, this method's videos; None for quant=bf16, whose videos are the
    reference) of a run, from ``generate.json`` and the manifests."""
    run_dir = Path(run_dir)
    gen_file = RunDir(run_dir).generated
    if not gen_file.is_file():
        raise NotRecorded(f"{run_dir} has no generated videos (run stage=generate first)", "no videos", "generate")
    gen = _read_json(gen_file)
    ref_root, quant_root = Path(gen["reference_dir"]), Path(gen["quant_dir"])
    reference = Videos("BF16", ref_root, done_records(ref_root), run_dir)
    if not reference.records:
        raise NotRecorded(f"the BF16 reference videos of {run_dir} are gone from {ref_root} (re-run stage=generate)",
                          "no videos", "generate")
    if quant_root == ref_root:
        return reference, None
    return reference, Videos(method_label(run_dir), quant_root, done_records(quant_root), run_dir)


def sample_errors(run_dirs: Iterable[Path]) -> pd.DataFrame:
    """Per (run, video): id, category, psnr, ssim, latent_rel_err from ``eval/fidelity.jsonl``."""
    rows = [dict(r, run_dir=str(d)) for d in map(Path, run_dirs) for r in read_jsonl(RunDir(d).fidelity)]
    return pd.DataFrame(rows, columns=["id", "category", "psnr", "ssim", "latent_rel_err", "run_dir"])


SELECTIONS = ("worst_best", "per_category")


def qualitative_settings(analysis_cfg: Mapping[str, Any] | None) -> dict:
    """``analysis.qualitative`` checked, with its defaults: samples (worst_best | per_category | [ids]),
    count (≥ 1), fractions (each in [0, 1]). Called at setup, so a typo fails before any video is made."""
    q = dict((analysis_cfg or {}).get("qualitative") or {})
    samples = q.get("samples", "worst_best")
    if not (samples in SELECTIONS or (isinstance(samples, (list, tuple)) and samples)):
        raise WanexpError(f"analysis.qualitative.samples={samples!r} is not one of {', '.join(SELECTIONS)} "
                          "or a list of sample ids")
    fractions = [float(f) for f in q.get("fractions") or FRACTIONS]
    if not all(0.0 <= f <= 1.0 for f in fractions):
        raise WanexpError(f"analysis.qualitative.fractions={fractions}: each must lie in [0, 1] (0 = first frame)")
    count = int(q.get("count", 1))
    if count < 1:
        raise WanexpError(f"analysis.qualitative.count={count}: draw at least 1 worst and 1 best video")
    return {"samples": list(samples) if isinstance(samples, (list, tuple)) else samples, "count": count,
            "fractions": fractions}


def pick_samples(records: Mapping[str, dict], select: Any = "worst_best", count: int = 1,
                 errors: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    """The samples to draw, each with why it was picked: ``select`` is a list of ids, ``worst_best``
    (the ``count`` videos with the largest and the ``count`` with the smallest latent error, averaged
    over the methods compared) or ``per_category`` (the first video of each category, in evaluation
    order). ``records``: the reference manifest records (id → record), in evaluation order."""
    if isinstance(select, (list, tuple)):
        ids = [str(i) for i in select]
        unknown = [i for i in ids if i not in records]
        if unknown:
            raise WanexpError(f"analysis.qualitative.samples names {', '.join(unknown)}, which have no video here "
                              f"(videos: {', '.join(list(records)[:8])}{' …' if len(records) > 8 else ''})")
        return [(i, "chosen") for i in dict.fromkeys(ids)]
    if select == "per_category":
        first: dict[str, str] = {}
        for sid, rec in records.items():
            first.setdefault(str(rec.get("category")), sid)
        return [(sid, f"category {cat}") for cat, sid in first.items()]
    if select != "worst_best":
        raise WanexpError(f"analysis.qualitative.samples={select!r} is not one of {', '.join(SELECTIONS)} "
                          "or a list of sample ids")
    if errors is None or errors.empty or errors["latent_rel_err"].isna().all():
        raise NotRecorded("the worst and best videos are chosen by latent error, and no video was scored yet "
                          "(run stage=evaluate first, or set analysis.qualitative.samples to ids or per_category)",
                          "no latent errors", "evaluate")
    mean = errors[errors["id"].isin(list(records))].groupby("id")["latent_rel_err"].mean()
    mean = mean.reindex([i for i in records if i in mean.index])  # ties keep the evaluation order
    n = max(1, int(count))
    worst = mean.sort_values(ascending=False, kind="stable").iloc[:n]
    best = mean.sort_values(ascending=True, kind="stable").iloc[:n]
    picks = [(sid, f"worst latent error ({v:.4g})") for sid, v in worst.items()]
    return picks + [(sid, f"best latent error ({v:.4g})") for sid, v in best.items() if sid not in worst.index]


def frame_indices(num_frames: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """The frame at each fraction of the video (0 = first, 1 = last), rounded to the nearest frame."""
    return [int(round(float(f) * (num_frames - 1))) for f in fractions]


@dataclass
class Grid:
    """One sample's frames, BF16 first, and each variant's per-pixel difference to BF16.

    ``frames``: uint8 [rows, columns, H, W, 3], read from the mp4s; ``diff``: float32 [rows - 1,
    columns, H, W], the mean over R, G, B of |frame − BF16 frame| in grey levels (0–255)."""

    sample: str
    prompt: str
    category: str
    labels: list[str]
    index: list[int]
    num_frames: int
    frames: np.ndarray
    diff: np.ndarray
    fractions: tuple[float, ...] = FRACTIONS

    @property
    def vmax(self) -> float:
        """The top of the one colour scale every difference map of the grid shares (at least 1 grey level)."""
        return float(max(1.0, self.diff.max())) if self.diff.size else 1.0

    def summary(self) -> dict:
        """JSON-able: which frames, and per variant and column the mean and max difference."""
        return {"sample": self.sample, "prompt": self.prompt, "category": self.category, "labels": self.labels,
                "frame_index": self.index, "num_frames": self.num_frames, "fractions": list(self.fractions),
                "vmax": self.vmax,
                "mean_abs_diff": {lab: self.diff[r].mean(axis=(1, 2)).round(4).tolist()
                                  for r, lab in enumerate(self.labels[1:])},
                "max_abs_diff": {lab: self.diff[r].max(axis=(1, 2)).round(4).tolist()
                                 for r, lab in enumerate(self.labels[1:])}}


def qualitative_grid(reference: Videos, variants: Sequence[Videos], sample: str,
                     fractions: Sequence[float] = FRACTIONS) -> Grid:
    """The frames at ``fractions`` of ``sample``'s video in the reference and each variant (decoded
    from the written mp4s: what was scored is what is shown) and their differences to the reference."""
    if not variants:
        raise NotRecorded("no quantized videos to set beside BF16 (quant=bf16's videos are the reference)",
                          "no quantized videos")
    missing = [v.label for v in variants if sample not in v.records]
    if sample not in reference.records or missing:
        raise NotRecorded(f"no video of {sample} for {', '.join(missing) or 'BF16'} (re-run stage=generate)",
                          "no videos", "generate")
    ref = read_mp4(reference.path(sample))
    index = frame_indices(len(ref), fractions)
    frames = [ref[index]]
    for v in variants:
        video = read_mp4(v.path(sample))
        if video.shape != ref.shape:
            raise WanexpError(f"{v.label}'s video of {sample} is {video.shape}, the BF16 one {ref.shape}: "
                              "were they generated with the same settings?")
        frames.append(video[index])
    stack = np.stack(frames)
    diff = np.abs(stack[1:].astype(np.int16) - stack[:1].astype(np.int16)).mean(axis=-1).astype(np.float32)
    rec = reference.records[sample]
    return Grid(sample=sample, prompt=str(rec.get("prompt", "")), category=str(rec.get("category", "")),
                labels=[reference.label] + [v.label for v in variants], index=index, num_frames=len(ref),
                frames=stack, diff=diff, fractions=tuple(float(f) for f in fractions))


def distinct_labels(videos: Sequence[Videos]) -> list[Videos]:
    """The same videos, labels made unique where runs share one (the run's overrides, else its directory)."""
    counts: dict[str, int] = {}
    for v in videos:
        counts[v.label] = counts.get(v.label, 0) + 1
    out = []
    for v in videos:
        label = v.label
        if counts[label] > 1 and v.run_dir is not None:
            results = RunDir(v.run_dir).results_csv
            over = pd.read_csv(results).iloc[0].get("overrides") if results.is_file() else None
            label = str(over) if isinstance(over, str) and over else Path(v.run_dir).name
        out.append(Videos(label, v.root, v.records, v.run_dir))
    return out
