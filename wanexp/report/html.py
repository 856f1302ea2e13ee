"""``report.html``: a run's or a sweep's results to look at, for clusters without W&B.

One HTML file and one folder of assets beside it (``report_assets/``: the figures and the videos it
plays, hard-linked where the filesystem allows, else copied), opened straight from the filesystem:
no server, no network, nothing fetched from elsewhere. Copy both to take the report along.

A run's report holds its results row (each metric with the BF16 twin and the delta, a confidence
interval where the row has ``<metric>_ci_low``/``_ci_high``), the per-category and per-video
metrics, the qualitative grids and diagnostic figures ``stage=analyze`` drew, the BF16 and quantized
videos side by side with their prompt and metrics, the config and the software versions. A sweep's
report holds the ablation table and paper tables as :mod:`wanexp.report.table` wrote them, the
failed runs, the sweep's grids and figures, the videos of every method side by side, and a link to
each run's own report.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from wanexp import analysis as A
from wanexp.evaluate.vbench import HIF4_DIMENSIONS as ALL_DIMENSIONS
from wanexp.io import atomic_path, read_json, write_json, write_text
from wanexp.report.plots import analyze_sweep
from wanexp.report.results import run_dirs
from wanexp.report.table import METRICS, ablation_table
from wanexp.rundir import REPORT_HTML, RunDir
from wanexp.version import __version__

ASSETS = "report_assets"
DEFAULT_VIDEOS = 8  # samples shown as players when report.html_videos is not set
_KEY_COLUMNS = ("method", "format", "expert_policy", "bins", "clip_candidates", "rank", "kept", "model", "data",
                "seed", "num_videos", "overrides")
_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "hydra-core", "omegaconf", "numpy", "pandas",
             "safetensors", "imageio-ffmpeg", "torchmetrics", "matplotlib", "wandb", "vbench", "pyiqa")


# ---------------------------------------------------------------------------------------------
# cells and tables
# ---------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """How a number reads in the report: 4 decimals, 4 significant digits for the very small or large."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or 0.01 <= abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


@dataclass
class Cell:
    text: str
    column: str | None = None     # data-col: the table column (metric) the cell holds
    value: Any = None             # data-value: the exact number, for anyone checking the report
    href: str | None = None
    numeric: bool = False


def cell(value: Any, column: str | None = None, low: Any = None, high: Any = None) -> Cell:
    """A table cell; with ``low``/``high`` the confidence interval reads ``value [low, high]``."""
    if isinstance(value, float) and not math.isnan(value):
        text = fmt(value)
        if not _missing(low) and not _missing(high):
            text += f" [{fmt(float(low))}, {fmt(float(high))}]"
        return Cell(text, column, repr(value), numeric=True)
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return Cell(str(value), column, str(value), numeric=True)
    return Cell(fmt(None if _missing(value) else value), column)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    name: str = ""   # data-table="<name>"
    title: str = ""


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (pandas hands them out of its frames)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def ci_columns(columns: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``metric → (metric_ci_low, metric_ci_high)`` for every column that has both bounds beside it."""
    cols = set(columns)
    return {c: (f"{c}_ci_low", f"{c}_ci_high") for c in cols if f"{c}_ci_low" in cols and f"{c}_ci_high" in cols}


def frame_table(df: pd.DataFrame, name: str, title: str) -> Table:
    """Every column of ``df`` as written, the CI bounds of a metric folded into its cell."""
    ci = ci_columns(df.columns)
    hidden = {b for pair in ci.values() for b in pair}
    shown = [c for c in df.columns if c not in hidden]
    table = Table([f"{c} [95% CI]" if c in ci else str(c) for c in shown], name=name, title=title)
    for rec in df.to_dict("records"):
        table.rows.append([cell(_plain(rec[c]), str(c), *(_plain(rec.get(b)) for b in ci.get(c, (None, None))))
                           for c in shown])
    return table


def results_table(row: Mapping[str, Any]) -> Table:
    """A run's metrics, one line each: value, the BF16 twin measured in the same run, the delta to it
    (fidelity is already against BF16: no delta of it), and a confidence interval where the row has one."""
    deltas = ablation_table(pd.DataFrame([dict(row)])).iloc[0].to_dict()
    ci = ci_columns(row.keys())
    metrics = [m for m in METRICS if m in row and not _missing(row[m])]
    columns = ["metric", "value", "BF16 (twin)", "Δ vs BF16"] + (["95% CI"] if ci else [])
    table = Table(columns, name="results", title="Metrics (Δ against the BF16 twin measured in the same run)")
    for m in metrics:
        line = [Cell(m), cell(_plain(row[m]), m), cell(_plain(row.get(f"{m}_bf16")), f"{m}_bf16"),
                cell(_plain(deltas.get(f"Δ{m}")), f"Δ{m}")]
        if ci:
            lo, hi = ci.get(m, (None, None))
            line.append(Cell(f"[{fmt(row[lo])}, {fmt(row[hi])}]" if lo else "–", f"{m}_ci"))
        table.rows.append(line)
    return table


def paper_wide(long: pd.DataFrame, name: str) -> Table:
    """A paper table's long form (``paper_<name>.csv``) in the paper's layout: ours / paper (gap)."""
    metrics = list(dict.fromkeys(long["metric"]))
    table = Table(["row", *metrics, "runs"], name=f"paper_{name}", title=f"Paper table {name}: ours / paper (gap)")
    for label, sub in long.groupby("row", sort=False):
        by = sub.set_index("metric")
        line = [Cell(str(label))]
        for m in metrics:
            ours, paper, gap = (_plain(by.loc[m, k]) for k in ("ours", "paper", "gap"))
            low, high, sig = (_plain(by.loc[m, k]) if k in by else None
                              for k in ("ours_ci_low", "ours_ci_high", "gap_significant"))
            text = "n/a" if _missing(ours) else fmt(float(ours))
            if not _missing(ours) and not _missing(low) and not _missing(high):  # bootstrap interval over samples
                text += f" [{fmt(float(low))}, {fmt(float(high))}]"
            if not _missing(paper):
                mark = "*" if not _missing(sig) and str(sig) == "True" else ""
                text += f" / {float(paper):g}" + ("" if _missing(gap) else f" ({float(gap):+.4g}{mark})")
            line.append(Cell(text, m, None if _missing(ours) else repr(float(ours)), numeric=True))
        line.append(Cell(str(int(sub["runs"].iloc[0])), "runs"))
        table.rows.append(line)
    return table


# ---------------------------------------------------------------------------------------------
# assets: files the report shows, beside it
# ---------------------------------------------------------------------------------------------
class Assets:
    """``report_assets/`` of one report: each file hard-linked (else copied) in, named relative to it;
    files an earlier report put there and this one does not use are removed."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.root = Path(out_dir), Path(out_dir) / ASSETS
        self.used: set[Path] = set()

    def add(self, src: Path, rel: str) -> str:
        dst = self.root / rel
        self.used.add(dst)
        if not (dst.exists() and os.path.samefile(src, dst)):
            with atomic_path(dst) as tmp:
                tmp.unlink()
                try:
                    os.link(src, tmp)
                except OSError:  # another filesystem, or links not allowed: a copy
                    shutil.copyfile(src, tmp)
        return f"{ASSETS}/{rel}"

    def prune(self) -> None:
        if self.root.is_dir():
            for path in sorted(self.root.rglob("*"), reverse=True):
                if path.is_file() and path not in self.used:
                    path.unlink()
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()


# ---------------------------------------------------------------------------------------------
# what the report shows
# ---------------------------------------------------------------------------------------------
@dataclass
class Figure:
    name: str
    src: str
    caption: str


def _figures(analysis_dir: Path, assets: Assets) -> tuple[list[Figure], list[Figure], dict]:
    """(qualitative grids, diagnostic figures, skipped name → reason) from ``analysis/index.json``."""
    index_file = analysis_dir / "index.json"
    if not index_file.is_file():
        return [], [], {}
    index = read_json(index_file)
    grids, others = [], []
    for name, paths in index.get("figures", {}).items():
        png = Path(paths["png"])
        png = png if png.is_file() else analysis_dir / png.name  # a moved run directory
        if not png.is_file():
            continue
        data_file = analysis_dir / f"{name}.json"
        data = read_json(data_file) if data_file.is_file() else {}
        src = assets.add(png, f"figures/{name}.png")
        if name.startswith("qualitative_"):
            grids.append(Figure(name, src, f"{data.get('sample', '')} ({data.get('category', '')}), "
                                           f"{data.get('picked', '')}: “{data.get('prompt', '')}”"))
        else:
            others.append(Figure(name, src, name))
    return grids, others, dict(index.get("skipped", {}))


@dataclass
class Player:
    label: str
    src: str
    metrics: list[tuple[str, str]]


@dataclass
class Sample:
    id: str
    prompt: str
    category: str
    players: list[Player]


_VIDEO_METRICS = ("psnr", "ssim", "latent_rel_err", "vbench_avg", *ALL_DIMENSIONS)


def _per_video(run_dir: Path) -> dict[str, dict]:
    """id → the run's per-video metrics (``eval/per_sample.csv``, else the fidelity lines)."""
    path = RunDir(run_dir).per_sample
    if path.is_file():
        table = pd.read_csv(path)
    else:
        table = A.sample_errors([run_dir]).drop(columns="run_dir")
    return {str(r["id"]): r for r in table.to_dict("records")}


def _metric_line(rec: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not rec:
        return []
    return [(m, fmt(_plain(rec[m]))) for m in _VIDEO_METRICS if m in rec and not _missing(rec[m])]


def _samples(reference: A.Videos, variants: Sequence[tuple[A.Videos, dict]], first: Sequence[str], limit: int,
             assets: Assets, prefix: str, only: Iterable[str] | None = None) -> list[Sample]:
    """The videos to play: the samples of ``first`` (the qualitative picks), then evaluation order, up to
    ``limit``; BF16 beside each variant (videos, per-video metrics by id). ``only``: the ids the runs
    evaluated (the shared reference directory may hold other runs' samples too)."""
    only = set(only) if only is not None else None
    common = [i for i in reference.records if all(i in v.records for v, _ in variants) and (only is None or i in only)]
    order = [i for i in dict.fromkeys([*first, *common]) if i in common][:max(0, limit)]
    out = []
    for sid in order:
        rec = reference.records[sid]
        players = [Player("BF16", assets.add(reference.path(sid), f"{prefix}videos/bf16/{sid}.mp4"), [])]
        for k, (v, metrics) in enumerate(variants):
            players.append(Player(v.label, assets.add(v.path(sid), f"{prefix}videos/{k}/{sid}.mp4"),
                                  _metric_line(metrics.get(sid))))
        out.append(Sample(sid, str(rec.get("prompt", "")), str(rec.get("category", "")), players))
    return out


def _picked(analysis_dir: Path) -> list[str]:
    """The samples of the qualitative grids drawn, in their order."""
    index_file = analysis_dir / "index.json"
    if not index_file.is_file():
        return []
    ids = []
    for name in read_json(index_file).get("figures", {}):
        data_file = analysis_dir / f"{name}.json"
        if name.startswith("qualitative_") and data_file.is_file():
            ids.append(str(read_json(data_file).get("sample")))
    return ids


def software_versions() -> dict[str, str]:
    """Python, the platform, wanexp (and its git commit when run from a checkout), the key packages, the GPU."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "wanexp": __version__}
    source = Path(__file__).resolve().parents[2]  # the checkout wanexp/ is in
    try:
        commit = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            out["wanexp git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    try:
        import torch
        if torch.cuda.is_available():
            out["gpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return out


def _yaml(obj: Any) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(obj)) if obj else "(not recorded)\n"


def _report_cfg(cfg: Mapping[str, Any] | None) -> dict:
    cfg = dict(cfg or {})
    videos = cfg.get("html_videos", DEFAULT_VIDEOS)
    return {"videos": DEFAULT_VIDEOS if videos is None else int(videos)}


def _render(out_dir: Path, assets: Assets, **page) -> Path:
    from jinja2 import Environment
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.from_string(_TEMPLATE).render(generated=datetime.datetime.now().isoformat(timespec="seconds"), **page)
    path = Path(out_dir) / REPORT_HTML  # a sweep's report sits in its directory as a run's does
    write_text(path, html)
    assets.prune()
    return path


# ---------------------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------------------
def record_versions(run_dir: Path) -> dict:
    """Write ``versions.json`` (the software of the process that reported the run) and return it."""
    versions = software_versions()
    write_json(RunDir(run_dir).versions, versions)
    return versions


def write_run_report(run_dir: str | Path, report_cfg: Mapping[str, Any] | None = None) -> Path:
    """``<run>/report.html`` (and ``report_assets/``) from what the run wrote so far."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    opts, assets = _report_cfg(report_cfg), Assets(run_dir)
    row = pd.read_csv(rd.results_csv).iloc[0].to_dict() if rd.results_csv.is_file() else None
    config = A.run_config(run_dir)
    title = A.method_label(run_dir)
    notes = []
    keys = Table(["key", "value"], name="run", title="Run")
    for k in _KEY_COLUMNS:
        value = _plain(row.get(k)) if row else None
        if row and not _missing(value):
            keys.rows.append([Cell(k), cell(value, k)])
    tables = [keys] if keys.rows else []
    if row:
        tables.append(results_table(row))
    else:
        notes.append("No results row yet: run stage=report.")
    summary_file = rd.eval_summary
    per_category = (read_json(summary_file).get("fidelity") or {}).get("per_category") if summary_file.is_file() else None
    if per_category:
        df = pd.DataFrame([{"category": c, **v} for c, v in per_category.items()])
        tables.append(frame_table(df, "per_category", "Per category (fidelity to BF16)"))
    grids, figures, skipped = _figures(rd.analysis, assets)
    if not (rd.analysis / "index.json").is_file():
        notes.append("No figures yet: stage=analyze draws the diagnostic figures and the qualitative grids "
                     f"(python -m wanexp <the run's overrides> hydra.run.dir={run_dir} stage=analyze).")
    samples, per_video = [], None
    try:
        reference, method = A.run_videos(run_dir)
        metrics = _per_video(run_dir)
        variants = [(method, metrics)] if method is not None else []  # quant=bf16: its videos are the reference
        samples = _samples(reference, variants, _picked(rd.analysis), opts["videos"], assets, "",
                           only=metrics or None)
        if metrics:
            per_video = frame_table(pd.DataFrame(list(metrics.values())), "per_video", "Per-video metrics")
    except A.NotRecorded as err:
        notes.append(f"No videos: {err}")
    versions_file = rd.versions
    versions = read_json(versions_file) if versions_file.is_file() else software_versions()
    launch = rd.hydra_config
    return _render(run_dir, assets, kind="run", title=f"wanexp run: {title}", where=str(run_dir), notes=notes,
                   tables=tables, grids=grids, figures=figures, skipped=skipped, samples=samples,
                   per_video=per_video, config=_yaml(config), overrides=(row or {}).get("overrides"),
                   launch_config=launch.read_text() if launch.is_file() else None, versions=versions, runs=None,
                   versions_note="recorded by the report stage" if versions_file.is_file() else "at report time")


# ---------------------------------------------------------------------------------------------
# a sweep
# ---------------------------------------------------------------------------------------------
def _sweep_config(out_dir: Path) -> tuple[str, str | None]:
    """(the sweep's config as YAML without Hydra's own keys, its command-line overrides) from multirun.yaml."""
    path = Path(out_dir) / "multirun.yaml"
    if not path.is_file():
        return "(not a Hydra sweep directory: no multirun.yaml)\n", None
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(path)
    task = OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []
    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    return _yaml(body), " ".join(map(str, task)) or None


def write_sweep_report(out_dir: str | Path, dirs: Sequence[str | Path], report_cfg: Mapping[str, Any] | None = None) -> Path:
    """``<out_dir>/report.html`` of the runs under ``dirs``: the tables ``report_dirs`` wrote into
    ``out_dir``, the figures ``analyze_sweep`` drew there, every method's videos beside BF16."""
    out_dir = Path(out_dir)
    opts, assets = _report_cfg(report_cfg), Assets(out_dir)
    tables, notes = [], []
    runs = run_dirs(dirs)
    listing = Table(["run", "method", "status", "report"], name="runs", title="Runs")
    for run in runs:
        rd = RunDir(run)
        status = ("failed: " + str(read_json(rd.error).get("error", ""))[:200]
                  if rd.error.is_file() else "finished" if rd.results_csv.is_file() else "unfinished")
        link = rd.report
        listing.rows.append([Cell(str(run.relative_to(out_dir)) if run.is_relative_to(out_dir) else str(run)),
                             Cell(A.method_label(run)), Cell(status),
                             Cell("report.html", href=os.path.relpath(link, out_dir)) if link.is_file() else Cell("–")])
    if (out_dir / "ablation.csv").is_file() and (out_dir / "ablation.csv").stat().st_size > 1:
        tables.append(frame_table(pd.read_csv(out_dir / "ablation.csv"), "ablation", "Ablation table (Δ against BF16)"))
    else:
        notes.append("No ablation table: no run of the sweep finished.")
    if (out_dir / "ablation_failed.csv").is_file():
        tables.append(frame_table(pd.read_csv(out_dir / "ablation_failed.csv"), "failed", "Runs without results"))
    for path in sorted(out_dir.glob("paper_*.csv")):
        tables.append(paper_wide(pd.read_csv(path), path.stem.removeprefix("paper_")))
    tables.append(listing)
    grids, figures, skipped = _figures(out_dir / "analysis", assets)
    samples = []
    finished = [r for r in runs if RunDir(r).finished()]
    groups: dict[str, tuple[A.Videos, list]] = {}
    for run in finished:
        try:
            reference, method = A.run_videos(run)
        except A.NotRecorded:
            continue
        group = groups.setdefault(str(reference.root), (reference, []))
        if method is not None:
            group[1].append(method)
    for k, (reference, variants) in enumerate(groups.values()):
        variants = A.distinct_labels(variants)
        pairs = [(v, _per_video(Path(v.run_dir))) for v in variants]
        samples += _samples(reference, pairs, _picked(out_dir / "analysis"), opts["videos"], assets, f"set{k + 1}/")
    config, overrides = _sweep_config(out_dir)
    return _render(out_dir, assets, kind="sweep", title=f"wanexp sweep: {out_dir.name}", where=str(out_dir),
                   notes=notes, tables=tables, grids=grids, figures=figures, skipped=skipped, samples=samples,
                   per_video=None, config=config, overrides=overrides, launch_config=None, versions=software_versions(),
                   versions_note="at report time", runs=len(runs))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
         padding: 1em 2em 4em; color: #1d1d1f; }
  h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
  .where { color: #666; font-family: ui-monospace, monospace; font-size: 12px; }
  nav a { margin-right: 1em; }
  .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .5em 0; }
  .scroll { overflow-x: auto; margin: .8em 0; }
  table { border-collapse: collapse; font-size: 12.5px; }
  th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; white-space: nowrap; }
  th { background: #f4f4f6; position: sticky; top: 0; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  caption { text-align: left; font-weight: 600; padding: .3em 0; }
  figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
  figure.diagnostic img { max-width: min(100%, 1000px); }
  figcaption { color: #444; font-size: 12.5px; }
  .sample { border: 1px solid #e3e3e3; border-radius: 6px; padding: .6em .9em; margin: 1em 0; }
  .prompt { font-style: italic; }
  .players { display: flex; flex-wrap: wrap; gap: 12px; }
  .player { flex: 0 1 320px; }
  .player video { width: 100%; min-width: 160px; image-rendering: pixelated; background: #000; }
  .player .label { font-weight: 600; overflow-wrap: anywhere; }
  .metrics { font-size: 12px; color: #333; font-variant-numeric: tabular-nums; }
  pre { background: #f7f7f9; padding: .8em; overflow-x: auto; font-size: 12px; }
  ul.skipped li { color: #555; }
</style>
</head>
<body>
{% macro render_table(t) %}
<div class="scroll"><table data-table="{{ t.name }}">
  <thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
  <tbody>
  {% for row in t.rows %}
    <tr>{% for c in row %}<td{% if c.column %} data-col="{{ c.column }}"{% endif %}{% if c.value is not none %} data-value="{{ c.value }}"{% endif %}{% if c.numeric %} class="num"{% endif %}>{% if c.href %}<a href="{{ c.href }}">{{ c.text }}</a>{% else %}{{ c.text }}{% endif %}</td>{% endfor %}</tr>
  {% endfor %}
  </tbody>
</table></div>
{% endmacro %}
<h1>{{ title }}</h1>
<div class="where">{{ where }} · written {{ generated }}{% if runs is not none %} · {{ runs }} runs{% endif %}</div>
{% if overrides %}<div class="where">overrides: {{ overrides }}</div>{% endif %}
<nav><a href="#results">Results</a><a href="#qualitative">Qualitative</a><a href="#figures">Figures</a><a href="#videos">Videos</a>{% if per_video %}<a href="#per-video">Per-video metrics</a>{% endif %}<a href="#config">Config</a><a href="#versions">Versions</a></nav>
{% for n in notes %}<div class="note">{{ n }}</div>{% endfor %}

<h2 id="results">Results</h2>
{% for t in tables %}
<h3>{{ t.title }}</h3>
{{ render_table(t) }}
{% endfor %}

<h2 id="qualitative">Qualitative comparison</h2>
{% if grids %}
<p>Rows: BF16, then each method; columns: the frames at the first, ¼, ½, ¾ and last position of the video, decoded from the written mp4s; right: |frame − BF16 frame| (mean of R, G, B) on one colour scale per figure.</p>
{% for f in grids %}<figure><img src="{{ f.src }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% else %}<p>No qualitative grid was drawn{% if skipped.get("qualitative") %}: {{ skipped["qualitative"] }}{% endif %}.</p>{% endif %}

<h2 id="figures">Figures</h2>
{% for f in figures %}<figure class="diagnostic"><img src="{{ f.src }}" alt="{{ f.name }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
{% if not figures %}<p>No diagnostic figure was drawn.</p>{% endif %}
{% if skipped %}<p>Skipped:</p><ul class="skipped">{% for name, why in skipped.items() %}<li><b>{{ name }}</b>: {{ why }}</li>{% endfor %}</ul>{% endif %}

<h2 id="videos">Videos</h2>
{% if samples %}<p>BF16 beside {{ "the quantized model" if kind == "run" else "each method" }}, same sample and seed; metrics are against the BF16 video.</p>{% endif %}
{% for s in samples %}
<div class="sample" data-sample="{{ s.id }}">
  <div><b>{{ s.id }}</b> ({{ s.category }}) <button type="button" onclick="playAll(this)">play all</button></div>
  <div class="prompt">“{{ s.prompt }}”</div>
  <div class="players">
  {% for p in s.players %}
    <div class="player"><div class="label">{{ p.label }}</div>
      <video src="{{ p.src }}" controls muted loop playsinline preload="auto"></video>
      <div class="metrics">{% for k, v in p.metrics %}{{ k }} {{ v }}{% if not loop.last %} · {% endif %}{% endfor %}</div>
    </div>
  {% endfor %}
  </div>
</div>
{% endfor %}
{% if not samples %}<p>No videos.</p>{% endif %}

{% if per_video %}<h2 id="per-video">{{ per_video.title }}</h2>{{ render_table(per_video) }}{% endif %}

<h2 id="config">Config</h2>
<p>{{ "What identifies the run (wanexp_config.json; logging, paths, evaluation and analysis settings may change between launches)" if kind == "run" else "The sweep's base config (multirun.yaml, before each run's sweep overrides, listed at the top; Hydra's own keys left out)" }}:</p>
<pre>{{ config }}</pre>
{% if launch_config %}<details><summary>The last launch's full config (.hydra/config.yaml)</summary><pre>{{ launch_config }}</pre></details>{% endif %}

<h2 id="versions">Versions</h2>
<p>Software {{ versions_note }}.</p>
<div class="scroll"><table data-table="versions">{% for k, v in versions.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table></div>

<script>
function playAll(button) {
  const videos = button.closest(".sample").querySelectorAll("video");
  videos.forEach(v => { v.currentTime = 0; v.play(); });
}
</script>
</body>
</html>
"""


def sweep_outputs(out_dir: str | Path, dirs: Sequence[str | Path], config: Any = None) -> dict:
    """What a sweep's end writes beside its tables (and ``python -m wanexp.report``): the sweep's figures
    (``analysis/``: the qualitative grids of every method, quality vs memory) and ``report.html``.
    ``config``: the sweep's config (DictConfig or dict) for ``analysis.*`` and ``report.*``.
    Returns the report's path, the figures, the skipped ones and their PNGs as W&B image keys."""
    section = _sections(config)
    info = analyze_sweep(dirs, out_dir, section["analysis"])
    for name, why in info["skipped"].items():
        print(f"wanexp: sweep figures: skipped {name}: {why}")
    path = write_sweep_report(out_dir, dirs, section["report"])
    images = {f"analysis/{name.replace('.', '_')}": Path(p["png"]) for name, p in info["figures"].items()}
    return {"report": path, **info, "images": images}


def _sections(config: Any) -> dict[str, dict]:
    if config is None:
        return {"analysis": {}, "report": {}}
    from omegaconf import DictConfig, OmegaConf
    out = {}
    for key in ("analysis", "report"):
        part = OmegaConf.select(config, key, default=None) if isinstance(config, DictConfig) else config.get(key)
        out[key] = (OmegaConf.to_container(part, resolve=True) if isinstance(part, DictConfig) else dict(part or {}))
    return out
