"""The seed paper's diagnostic figures of any run, drawn with matplotlib (Agg, no pyplot state).

The data come from :mod:`wanexp.analysis` (DataFrames / arrays, tested); the functions here only
draw them and return a ``matplotlib.figure.Figure``. :func:`save_figure` writes PNG + PDF atomically;
:func:`analyze_run` (``stage=analyze``) writes every figure a run has the data for into
``<run>/analysis/`` with its data as JSON, and logs the PNGs to W&B.

    fig 1  activation_trace_<layer>  per-step per-channel max |x| and percentile, expert boundary marked
    fig 3  clip_distribution         share of layers per clip ratio, per bin, high- vs low-noise expert
    fig 4  sensitivity               cosine error per module type × block, one map per expert
           sensitivity_ranking       module types by mean error (what a keep policy should keep)
           quality_memory            quality vs model size / peak memory, Pareto front marked
    fig 5  qualitative_<sample>      BF16 and each method's frames side by side, |Δ| maps (report.qualitative)

:func:`analyze_sweep` draws quality vs memory and the qualitative grids of every run of a sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from wanexp import analysis as A
from wanexp.errors import WanexpError
from wanexp.io import atomic_path, write_json
from wanexp.report.qualitative import grid_builders
from wanexp.report.results import gather, run_dirs
from wanexp.report.wandb_log import log_run
from wanexp.rundir import RunDir

FORMATS = ("png", "pdf")
_EXPERT_LABEL = {"high_noise": "high-noise expert", "low_noise": "low-noise expert"}


def _figure(width: float, height: float, **kw):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained", **kw)


def save_figure(fig, stem: str | Path, formats: Sequence[str] = FORMATS, dpi: int = 150) -> dict[str, Path]:
    """``<stem>.png`` and ``<stem>.pdf``, each written to a temporary sibling and renamed into place."""
    stem = Path(stem)
    paths = {}
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        paths[fmt] = path
    return paths


# ---------------------------------------------------------------------------------------------
# Fig. 1
# ---------------------------------------------------------------------------------------------
def draw_activation_trace(trace: A.Trace, groups: int = 8, title: str | None = None):
    """Two panels (max |x|, percentile) over the denoising steps; one curve per channel group;
    the expert boundary as a solid line, TS-clip bin changes as dotted lines."""
    import matplotlib
    df = A.trace_groups(trace, groups)
    fig = _figure(8.5, 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    cmap = matplotlib.colormaps["viridis"]
    n = df["group"].nunique()
    for ax, stat, label in ((axes[0], "absmax", "max |x|"),
                            (axes[1], "pct", f"p{trace.percentile:g} |x|")):
        for g, sub in df.groupby("group"):
            ax.plot(sub["step"], sub[stat], marker="o", ms=3, lw=1.2, color=cmap(g / max(1, n - 1)),
                    label=f"ch {sub['channels'].iloc[0]}")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both", lw=0.5)
        _mark_trajectory(ax, trace)
    steps = np.arange(trace.steps)
    every = max(1, math.ceil(trace.steps / 16))
    axes[1].set_xticks(steps[::every], [f"{s}\n{t:.0f}" for s, t in zip(steps[::every], trace.timestep[::every])],
                       fontsize=8)
    axes[1].set_xlabel("denoising step / timestep")
    axes[0].legend(fontsize=7, ncol=min(4, n), loc="upper right", title="channel group", title_fontsize=7)
    fig.suptitle(title or f"{trace.layer}: input activations across the BF16 trajectory "
                          f"({trace.channels} channels, {int(trace.count.max())} forwards/step)", fontsize=10)
    return fig


def _mark_trajectory(ax, trace: A.Trace) -> None:
    switch = trace.switch_step
    if switch is not None:
        label = "expert boundary" + (f" (t={trace.boundary:g})" if trace.boundary is not None else "")
        ax.axvline(switch - 0.5, color="black", lw=1.5, label=label)
        ax.axvspan(-0.5, switch - 0.5, color="tab:red", alpha=0.05)
        ax.axvspan(switch - 0.5, trace.steps - 0.5, color="tab:blue", alpha=0.05)
    for expert, edges in (trace.bins or {}).items():
        if not edges:
            continue
        idx = np.nonzero(trace.expert == expert)[0]
        bins = [sum(1 for e in edges if trace.timestep[i] >= e) for i in idx]
        for a, b, i in zip(bins, bins[1:], idx[1:]):
            if a != b:
                ax.axvline(i - 0.5, color="gray", lw=0.8, ls=":")


# ---------------------------------------------------------------------------------------------
# Fig. 3
# ---------------------------------------------------------------------------------------------
def draw_clip_distribution(df: pd.DataFrame, title: str | None = None):
    """Stacked bars: per bin, the share of layers choosing each candidate ratio; one panel per expert."""
    import matplotlib
    experts = [e for e in A.EXPERTS if e in set(df["expert"])]
    ratios = sorted(df["ratio"].unique())
    cmap = matplotlib.colormaps["RdYlGn"]
    colors = {r: cmap(i / max(1, len(ratios) - 1)) for i, r in enumerate(ratios)}
    fig = _figure(4.2 * len(experts) + 1.2, 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(experts), sharey=True))
    for ax, expert in zip(axes, experts):
        sub = df[df["expert"] == expert]
        bins = sorted(sub["bin"].unique())
        bottom = np.zeros(len(bins))
        for r in ratios:
            share = np.array([float(sub[(sub["bin"] == b) & (sub["ratio"] == r)]["share"].sum()) for b in bins])
            bars = ax.bar(range(len(bins)), share, bottom=bottom, color=colors[r], edgecolor="white", lw=0.5,
                          label=f"ρ={r:g}")
            for rect, v in zip(bars, share):
                if v >= 0.08:
                    ax.text(rect.get_x() + rect.get_width() / 2, rect.get_y() + v / 2, f"{v:.0%}",
                            ha="center", va="center", fontsize=7)
            bottom += share
        labels = [sub[sub["bin"] == b]["bin_label"].iloc[0] for b in bins]
        ax.set_xticks(range(len(bins)), [f"bin {b}\nt {lab}" for b, lab in zip(bins, labels)], fontsize=8)
        ax.set_title(_EXPERT_LABEL.get(expert, expert), fontsize=10)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of layers")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), title="clip ratio")
    note = "" if df.attrs.get("clip_search", True) else " (no clip search: every ratio is 1)"
    fig.suptitle(title or f"TS-clip: clip ratio chosen per timestep bin{note}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Fig. 4
# ---------------------------------------------------------------------------------------------
_METRIC_LABEL = {"cos_err": "1 − cos(XWᵀ, Ŷ) on calibration tokens", "w_cos_err": "1 − cos(W, Ŵ) (weight only)"}


def draw_sensitivity(table: pd.DataFrame, title: str | None = None):
    """One heat map per expert (rows: module type, columns: block), one colour scale; gray = kept BF16."""
    import matplotlib
    from matplotlib.colors import LogNorm
    experts = [e for e in A.EXPERTS if e in set(table["expert"])]
    maps = {e: A.sensitivity_map(table, e) for e in experts}
    n_blocks = max(len(m.columns) for m in maps.values())
    n_mod = max(len(m.index) for m in maps.values())
    side = n_blocks <= 12  # few blocks (tiny): the experts side by side; many (A14B): one above the other
    cell_w = 0.32 if n_blocks > 12 else 0.45
    width = 2.2 + cell_w * n_blocks * (len(experts) if side else 1) + 1.2
    height = 1.0 + (0.28 * n_mod + 0.9) * (1 if side else len(experts))
    fig = _figure(min(24.0, max(6.0, width)), height)
    axes = np.atleast_1d(fig.subplots(1, len(experts), sharey=True) if side else fig.subplots(len(experts), 1))
    values = table["error"].to_numpy(float)
    values = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=values.min(), vmax=values.max()) if len(values) else None
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#d0d0d0")
    im = None
    for ax, expert in zip(axes, experts):
        grid = maps[expert]
        im = ax.imshow(np.ma.masked_invalid(grid.to_numpy(float)), aspect="auto", cmap=cmap, norm=norm,
                       interpolation="nearest")
        ax.set_yticks(range(len(grid.index)), grid.index, fontsize=8)
        every = max(1, math.ceil(len(grid.columns) / 40))
        ax.set_xticks(range(len(grid.columns))[::every], [str(c) for c in grid.columns][::every], fontsize=7)
        ax.set_title(_EXPERT_LABEL.get(expert, expert), fontsize=10)
    for ax in axes if side else axes[-1:]:
        ax.set_xlabel("block")
    if im is not None:
        fig.colorbar(im, ax=list(axes), label=_METRIC_LABEL.get(table.attrs.get("metric"), "error"),
                     shrink=0.9 if side else 0.6, fraction=0.05 if side else 0.03)
    fig.suptitle(title or "Sensitivity: reconstruction error per targeted linear", fontsize=10)
    return fig


def draw_sensitivity_ranking(table: pd.DataFrame, title: str | None = None):
    """Module types by mean error over blocks, both experts side by side (most sensitive on top)."""
    experts = [e for e in A.EXPERTS if e in set(table["expert"])]
    pooled = A.sensitivity_ranking(table, "module")
    order = list(pooled["module"])[::-1]
    fig = _figure(7.0, 1.0 + 0.32 * len(order))
    ax = fig.subplots()
    height = 0.8 / max(1, len(experts))
    colors = {"high_noise": "tab:red", "low_noise": "tab:blue"}
    for k, expert in enumerate(experts):
        r = A.sensitivity_ranking(table, "module", expert).set_index("module")["mean"]
        ax.barh(np.arange(len(order)) + (k - (len(experts) - 1) / 2) * height, [r.get(m, np.nan) for m in order],
                height=height, color=colors.get(expert), label=_EXPERT_LABEL.get(expert, expert))
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("mean over blocks of " + _METRIC_LABEL.get(table.attrs.get("metric"), "error"))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x", which="both", lw=0.5)
    fig.suptitle(title or "Module types ranked by reconstruction error", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# quality vs memory
# ---------------------------------------------------------------------------------------------
_AXIS_LABEL = {"model_size_gb": "model size (GB, both experts)", "peak_memory_gb": "peak GPU memory (GB)",
               "pipeline_size_gb": "pipeline size (GB)", "vbench_avg": "VBench avg (higher is better)",
               "latent_rel_err": "latent relative error vs BF16 (lower is better)",
               "psnr": "PSNR vs BF16 (dB, higher is better)"}


def draw_quality_memory(df: pd.DataFrame, title: str | None = None):
    """Each run as a point, labelled; the Pareto front (less memory, better quality) joined and ringed."""
    fig = _figure(7.0, 4.8)
    ax = fig.subplots()
    for twin, marker in ((False, "o"), (True, "s")):
        sub = df[df["twin"] == twin]
        ax.scatter(sub["x"], sub["y"], marker=marker, s=36, color="tab:gray" if twin else "tab:blue",
                   zorder=3, label="BF16 twin (measured in each run)" if twin else "runs")
    front = df[df["pareto"]].sort_values("x")
    if len(front):
        ax.step(front["x"], front["y"], where="post", color="tab:orange", lw=1.2, zorder=2)
        ax.scatter(front["x"], front["y"], s=140, facecolors="none", edgecolors="tab:orange", lw=1.5, zorder=4,
                   label="Pareto front")
    for _, r in df.iterrows():
        ax.annotate(r["label"], (r["x"], r["y"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel(_AXIS_LABEL.get(df.attrs.get("x"), df.attrs.get("x")))
    ax.set_ylabel(_AXIS_LABEL.get(df.attrs.get("y"), df.attrs.get("y")))
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    fig.suptitle(title or "Quality vs memory", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# a run's figures
# ---------------------------------------------------------------------------------------------
def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records"))


def _run_title(run_dir: Path) -> str:
    cfg = A.run_config(run_dir)
    fmt = cfg.get("format") or {}
    opts = {**(fmt.get("weight") or {})}
    f = fmt.get("name", "?") + ("(" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")" if opts else "")
    return f"{(cfg.get('quant') or {}).get('name', '?')} {f}, model={(cfg.get('model') or {}).get('name', '?')}"


def figure_builders(run_dir: Path, cfg: Mapping[str, Any] | None = None,
                    compare: Sequence[Path] | None = None) -> dict[str, Callable[[], tuple[Any, dict]]]:
    """name → a function returning (figure, its data as JSON-able dict); raising A.NotRecorded when the
    run lacks what the figure needs."""
    cfg, run_dir = dict(cfg or {}), Path(run_dir)
    title = _run_title(run_dir)
    builders: dict[str, Callable[[], tuple[Any, dict]]] = {}

    def trace_fig(layer):
        def build():
            tr = A.activation_trace(run_dir, layer)
            groups = int(cfg.get("channel_groups", 8))
            data = {"layer": tr.layer, "steps": tr.steps, "channels": tr.channels, "percentile": tr.percentile,
                    "boundary": tr.boundary, "switch_step": tr.switch_step, "bins": tr.bins,
                    "timestep": tr.timestep.tolist(), "expert": tr.expert.tolist(),
                    "groups": _records(A.trace_groups(tr, groups)), "nonstationarity": _records(A.nonstationarity(tr))}
            return draw_activation_trace(tr, groups, title=f"{tr.layer} ({title}): activations across the BF16 "
                                                           "trajectory"), data
        return build

    try:
        layers = A.trace_layers(run_dir)
    except A.NotRecorded:
        layers = [None]  # the builder raises the reason
    for layer in layers:
        builders["activation_trace" + (f"_{layer}" if layer else "")] = trace_fig(layer)

    def clip_fig():
        df = A.clip_distribution(run_dir)
        return draw_clip_distribution(df, title=f"Clip ratio per timestep bin ({title})"), \
            {"candidates": df.attrs["candidates"], "clip_search": df.attrs["clip_search"], "rows": _records(df)}
    builders["clip_distribution"] = clip_fig

    keep = dict(cfg.get("sensitivity_keep") or {})

    def sens_data():
        table = A.sensitivity_table(run_dir)
        data = {"metric": table.attrs["metric"], "rows": _records(table),
                "module_ranking": _records(A.sensitivity_ranking(table, "module")),
                "block_ranking": _records(A.sensitivity_ranking(table, "block")),
                "module_ranking_per_expert": {e: _records(A.sensitivity_ranking(table, "module", e))
                                              for e in A.EXPERTS if e in set(table["expert"])},
                "keep_policy": A.keep_policy(table, int(keep.get("modules", 2)), int(keep.get("blocks", 0))),
                "keep_policy_per_expert": A.keep_policy(table, int(keep.get("modules", 2)),
                                                        int(keep.get("blocks", 0)), per_expert=True)}
        return table, data

    def sens_fig():
        table, data = sens_data()
        return draw_sensitivity(table, title=f"Sensitivity map ({title})"), data

    def rank_fig():
        table, data = sens_data()
        return draw_sensitivity_ranking(table, title=f"Module types by error ({title})"), \
            {k: data[k] for k in ("metric", "module_ranking", "module_ranking_per_expert", "keep_policy")}
    builders["sensitivity"] = sens_fig
    builders["sensitivity_ranking"] = rank_fig

    builders["quality_memory"] = _quality_memory_builder(list(compare or [run_dir]), cfg)
    builders.update(_run_grid_builders(run_dir, cfg))
    return builders


def _quality_memory_builder(dirs: Sequence[Path], cfg: Mapping[str, Any]) -> Callable[[], tuple[Any, dict]]:
    def build():
        try:
            rows, _ = gather(dirs)
        except WanexpError:  # no run directory at all under dirs
            rows = pd.DataFrame()
        df = A.quality_memory(rows, x=cfg.get("x", "auto"), y=cfg.get("y", "auto"))
        return draw_quality_memory(df), {**df.attrs, "rows": _records(df)}
    return build


def _failing(err: A.NotRecorded) -> Callable[[], tuple[Any, dict]]:
    def build():
        raise err
    return build


def _run_grid_builders(run_dir: Path, cfg: Mapping[str, Any]) -> dict[str, Callable[[], tuple[Any, dict]]]:
    """The qualitative grids of one run (BF16 and the run's method), or one entry saying why there are none."""
    try:
        reference, method = A.run_videos(run_dir)
        return grid_builders(reference, [method] if method else [], cfg, A.sample_errors([run_dir]))
    except A.NotRecorded as err:
        return {"qualitative": _failing(err)}


def _sweep_grid_builders(runs: Sequence[Path], cfg: Mapping[str, Any]) -> dict[str, Callable[[], tuple[Any, dict]]]:
    """The qualitative grids of a sweep: BF16 and every method of the runs sharing one set of reference
    videos (one set of grids per set of references, suffixed ``_set<k>`` when the runs have several)."""
    groups: dict[str, tuple[A.Videos, list, list]] = {}
    reasons = []
    for run in runs:
        try:
            reference, method = A.run_videos(run)
        except A.NotRecorded as err:
            reasons.append(err)
            continue
        group = groups.setdefault(str(reference.root), (reference, [], []))
        if method is not None:  # a bf16 run's videos are the reference: neither a row nor a latent error
            group[1].append(method)
            group[2].append(run)
    if not groups:
        return {"qualitative": _failing(reasons[0] if reasons else A.NotRecorded(
            "no finished run with videos in the sweep", "no videos", "generate"))}
    builders = {}
    for k, (reference, variants, dirs) in enumerate(groups.values()):
        suffix = f"_set{k + 1}" if len(groups) > 1 else ""
        try:
            found = grid_builders(reference, variants, cfg, A.sample_errors(dirs))
        except WanexpError as err:  # e.g. ids no video of the sweep has: the tables stay, the grid is skipped
            found = {"qualitative": _failing(err if isinstance(err, A.NotRecorded) else A.NotRecorded(str(err)))}
        builders.update({name + suffix: build for name, build in found.items()})
    return builders


def sweep_root(run_dir: Path) -> Path | None:
    """The Hydra sweep directory holding ``run_dir`` (it has ``multirun.yaml``), if any."""
    for parent in Path(run_dir).resolve().parents:
        if (parent / "multirun.yaml").is_file():
            return parent
    return None


def write_figures(builders: Mapping[str, Callable[[], tuple[Any, dict]]], out: Path,
                  dpi: int = 150) -> tuple[dict, dict, dict]:
    """Draw each figure into ``out`` (``<name>.png|pdf|json``); returns (name → its paths, name → the
    :class:`A.NotRecorded` of each skipped figure, name → the data of each drawn one)."""
    figures, skipped, drawn = {}, {}, {}
    for name, build in builders.items():
        try:
            fig, data = build()
        except A.NotRecorded as err:
            skipped[name] = err
            continue
        paths = save_figure(fig, out / name, dpi=dpi)
        write_json(out / f"{name}.json", data)
        figures[name] = {**{k: str(v) for k, v in paths.items()}, "json": str(out / f"{name}.json")}
        drawn[name] = data
    return figures, skipped, drawn


def analyze_sweep(dirs: Sequence[str | Path], out_dir: str | Path, cfg: Mapping[str, Any] | None = None) -> dict:
    """The figures of a whole sweep into ``<out_dir>/analysis/``: quality vs memory over its runs and
    the qualitative grids (BF16 and every method); ``index.json`` lists them and why any was skipped."""
    cfg, out = dict(cfg or {}), RunDir(out_dir).analysis  # a sweep's figures: laid out as a run's
    runs = [d for d in run_dirs(dirs) if RunDir(d).finished()]
    builders = {"quality_memory": _quality_memory_builder(list(dirs), cfg), **_sweep_grid_builders(runs, cfg)}
    figures, skipped, _ = write_figures(builders, out, int(cfg.get("dpi", 150)))
    info = {"figures": figures, "skipped": {k: str(v) for k, v in skipped.items()}, "runs": [str(r) for r in runs]}
    write_json(out / "index.json", info)
    return info


def analyze_run(run_dir: str | Path, cfg: Mapping[str, Any] | None = None, logger: Mapping[str, Any] | None = None,
                config: Mapping[str, Any] | None = None, compare: Sequence[Path] | None = None) -> dict:
    """Write every figure the run has the data for into ``<run>/analysis/`` (``<name>.png``, ``.pdf``,
    ``.json``; ``index.json`` lists them and why any was skipped) and log the PNGs to W&B (``logger``,
    skipped for ``logger=none`` or None). ``compare``: run dirs for the quality-vs-memory scatter
    (default: the run's sweep directory, or the run alone). Raises :class:`A.NothingToAnalyze`, writing
    nothing, when the run has the data of no figure."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise WanexpError("the analysis figures need matplotlib (pip install matplotlib, or pip install -e .[test])") from err
    run_dir = Path(run_dir)
    cfg = dict(cfg or {})
    out = RunDir(run_dir).analysis
    if compare is None:
        root = sweep_root(run_dir)
        compare = [root] if root is not None else [run_dir]
    figures, skipped, drawn = write_figures(figure_builders(run_dir, cfg, compare), out, int(cfg.get("dpi", 150)))
    if not figures:
        raise A.NothingToAnalyze(run_dir, skipped)
    summary = {}
    if "sensitivity" in drawn:
        summary["keep_policy"] = drawn["sensitivity"]["keep_policy"]
        summary["most_sensitive_modules"] = [r["module"] for r in drawn["sensitivity"]["module_ranking"][:3]]
    info = {"figures": figures, "skipped": {k: str(v) for k, v in skipped.items()}, **summary}
    wandb_where = None
    if logger and logger.get("name", "wandb") != "none" and figures:
        lg = dict(logger, job_type="analysis", run_name=f"{logger.get('run_name') or run_dir.name}-analysis")
        flat_summary = {"analysis_figures": len(figures),
                        **{f"keep_{k}": ",".join(map(str, v)) for k, v in (summary.get("keep_policy") or {}).items()
                           if k != "overrides"}}
        tables = {}
        if "sensitivity" in figures:
            data = json.loads(Path(figures["sensitivity"]["json"]).read_text())
            tables["sensitivity_ranking"] = pd.DataFrame(data["module_ranking"])
        wandb_where = log_run(lg, run_dir, dict(config or {}), flat_summary, tables,
                              images={f"analysis/{n.replace('.', '_')}": Path(p["png"]) for n, p in figures.items()})
    info["wandb"] = wandb_where
    write_json(out / "index.json", info)
    return info
