"""The papers' tables, rebuilt from wanexp runs and set beside the numbers the papers report.

Each table lists the paper's rows (which wanexp method reproduces which row) and columns (which of
our metrics is which of theirs), with the paper's figure per cell (../shared/spec/PAPERS.md). A cell
reads ``ours / paper (gap)``; a metric the run did not compute (VBench without ``evaluate=vbench``,
peak GPU memory on a CPU) shows ``n/a``. Our extra columns (fidelity against BF16) have no paper
figure. Runs of the same method (several seeds) are averaged.

Where the runs kept per-sample metrics, ``ours`` gets a bootstrap interval over samples
(:mod:`wanexp.report.stats`; a method's runs averaged sample by sample first) and so does the gap,
``ours − paper`` (the paper's figure is a constant: the interval is our sampling noise only);
``gap_significant`` marks a gap whose interval excludes 0, ``*`` in the Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wanexp.errors import WanexpError
from wanexp.evaluate.vbench import HIF4_DIMENSIONS
from wanexp.io import atomic_path
from wanexp.report.latex import latex_table
from wanexp.report.stats import interval, read_per_sample

GIB = 1e9 / 2**30  # our sizes are in GB (1e9 bytes); the papers' size and memory figures match GiB


@dataclass(frozen=True)
class PaperRow:
    label: str
    method: str
    fixed: dict[str, str]             # descriptive columns of the paper (W, A, TS-clip)
    paper: dict[str, float]           # metric -> the paper's figure


@dataclass(frozen=True)
class PaperTable:
    title: str
    source: str
    rows: tuple[PaperRow, ...]
    columns: tuple[tuple[str, str], ...]          # (our metric, the paper's column header)
    extra: tuple[tuple[str, str], ...] = ()       # our metrics without a paper figure
    scale: dict[str, float] = field(default_factory=dict)  # our value × scale is in the paper's unit
    note: str = ""


def _row(label, method, fixed, **paper):
    return PaperRow(label, method, fixed, paper)


def _wa(w, a, ts):
    return {"W": w, "A": a, "TS-clip": ts}


TABLES: dict[str, PaperTable] = {
    "table1": PaperTable(
        title="Table I: W4A4 Wan2.2-I2V-A14B on OpenS2V-Eval, all 4-bit MXFP4",
        source="arXiv 2605.27003, Table I",
        rows=(
            _row("BF16 baseline", "bf16", _wa("BF16", "BF16", "–"), vbench_avg=0.806, imaging_quality=0.705,
                 subject_consistency=0.739, motion_smoothness=0.975),
            _row("RTN", "rtn", _wa("4", "4", "no"), vbench_avg=0.733, imaging_quality=0.389,
                 subject_consistency=0.861, motion_smoothness=0.949),
            _row("SVDQuant + RTN", "svdquant_rtn", _wa("4", "4", "no"), vbench_avg=0.783, imaging_quality=0.671,
                 subject_consistency=0.705, motion_smoothness=0.974),
            _row("SVDQuant + GPTQ", "svdquant_gptq", _wa("4", "4", "no"), vbench_avg=0.793,
                 imaging_quality=0.684, subject_consistency=0.722, motion_smoothness=0.974),
            _row("Ours (SVDQuant + GPTQ + TS-clip)", "tsclip", _wa("4", "4", "yes"), vbench_avg=0.799,
                 imaging_quality=0.689, subject_consistency=0.733, motion_smoothness=0.975),
            _row("Ours† (+ self_attn.o, ffn.2 in BF16)", "tsclip_keep_sensitive", _wa("4", "4", "–"),
                 vbench_avg=0.803, imaging_quality=0.696, subject_consistency=0.738, motion_smoothness=0.975),
        ),
        columns=(("vbench_avg", "VBench avg"), ("imaging_quality", "Imaging"),
                 ("subject_consistency", "Subject cons."), ("motion_smoothness", "Motion smooth.")),
        extra=(("aesthetic_quality", "Aesthetic"), ("latent_rel_err", "latent rel. err"), ("psnr", "PSNR (dB)")),
        note="VBench avg is the mean of imaging, aesthetic, subject consistency and motion smoothness.",
    ),
    "table2": PaperTable(
        title="Table II: efficiency on one H100, same generation setting",
        source="arXiv 2605.27003, Table II",
        rows=(
            _row("BF16", "bf16", {}, pipeline_size_gb=64.0, peak_memory_gb=64.4, sec_per_video=520.7, fps=0.117),
            _row("W4A16", "w4a16", {}, pipeline_size_gb=26.4, peak_memory_gb=26.8, sec_per_video=534.5, fps=0.114),
            _row("Ours (W4A4)", "tsclip", {}, pipeline_size_gb=25.9, peak_memory_gb=26.2, sec_per_video=955.1,
                 fps=0.064),
        ),
        columns=(("pipeline_size_gb", "model size (GB)"), ("peak_memory_gb", "peak memory (GB)"),
                 ("sec_per_video", "latency (s)"), ("fps", "throughput (FPS)")),
        extra=(("model_size_gb", "experts (GB)"),),
        scale={"pipeline_size_gb": GIB, "peak_memory_gb": GIB, "model_size_gb": GIB},
        note="Sizes in GiB (the paper's figures match GiB). Model size = every weight the pipeline holds "
             "(both experts, text encoder, VAE); peak memory = the costliest video's GPU peak (n/a on a CPU). "
             "Compare ratios to the BF16 row, not absolute figures, off the paper's H100 setting.",
    ),
    "hif4": PaperTable(
        title="Tail-aware HiFloat4: W4A4 Wan2.2-I2V-A14B (T2V with a blank image), HiFloat4 track",
        source="arXiv 2605.26628",
        rows=(
            _row("BF16", "bf16", _wa("BF16", "BF16", "–"), vbench5_avg=0.680),
            _row("W4A4 HiF4, RTN (no balancing)", "rtn", _wa("HiF4", "HiF4", "–")),
            _row("W4A4 HiF4, max balancing (conservative)", "hif4_conservative", _wa("HiF4", "HiF4", "–")),
            _row("W4A4 HiF4, tail-aware balancing", "hif4_tailaware", _wa("HiF4", "HiF4", "–"), vbench5_avg=0.588),
        ),
        columns=(("vbench5_avg", "mean of 5"),),
        extra=(("imaging_quality", "Imaging"), ("aesthetic_quality", "Aesthetic"),
               ("overall_consistency", "Overall cons."), ("subject_consistency", "Subject cons."),
               ("motion_smoothness", "Motion smooth."), ("latent_rel_err", "latent rel. err"), ("psnr", "PSNR (dB)")),
        note="mean of 5 = unweighted mean of imaging, aesthetic, overall consistency, subject consistency and "
             "motion smoothness (evaluate=vbench_hif4).",
    ),
}
VBENCH5 = list(HIF4_DIMENSIONS)   # the HiFloat4 paper's five (its headline: their mean)


def paper_table(rows: pd.DataFrame, name: str, boot=None) -> pd.DataFrame:
    """Long form: one line per (paper row, metric) with ours, the paper's figure and the gap; with
    ``boot`` (a :class:`wanexp.report.stats.Bootstrap`) their intervals over samples where the runs have
    per-sample metrics."""
    if name not in TABLES:
        raise WanexpError(f"unknown paper table {name!r}; known: {', '.join(TABLES)}")
    spec = TABLES[name]
    df = rows.copy()
    if all(c in df for c in VBENCH5):
        df["vbench5_avg"] = df[VBENCH5].mean(axis=1, skipna=False)
    out = []
    for prow in spec.rows:
        runs = df[df["method"] == prow.method] if "method" in df else df.iloc[0:0]
        for metric, header in spec.columns + spec.extra:
            ours = None
            if metric in runs and runs[metric].notna().any():
                ours = float(runs[metric].mean()) * spec.scale.get(metric, 1.0)
            paper = prow.paper.get(metric)
            line = {"row": prow.label, "method": prow.method, **prow.fixed, "metric": header, "ours": ours,
                    "paper": paper, "gap": None if ours is None or paper is None else ours - paper,
                    "runs": len(runs), "formats": ",".join(sorted(set(map(str, runs.get("format", []))))) or None}
            if boot is not None and ours is not None:
                line.update(_intervals(runs, metric, paper, spec.scale.get(metric, 1.0), boot))
            out.append(line)
    return pd.DataFrame(out)


def _intervals(runs: pd.DataFrame, metric: str, paper: float | None, scale: float, boot) -> dict:
    """``ours_ci_low/_high`` (and the gap's, when the paper has a figure) from the runs' per-sample values."""
    per_run = []
    for run_dir in runs.get("run_dir", []):
        ps = read_per_sample(run_dir)
        if ps is None:
            continue
        if metric == "vbench5_avg" and all(c in ps for c in VBENCH5):
            per_run.append(ps[VBENCH5].mean(axis=1, skipna=False))
        elif metric in ps:
            per_run.append(ps[metric].astype(float))
    if not per_run:
        return {}
    values = pd.concat(per_run).groupby(level=0).mean()  # a method's runs, sample by sample
    low, high = (v * scale for v in interval(values, boot))
    out = {"ours_ci_low": low, "ours_ci_high": high}
    if paper is not None:
        out.update(gap_ci_low=low - paper, gap_ci_high=high - paper,
                   gap_significant=bool(low - paper > 0 or high - paper < 0))
    return out


def render_markdown(long: pd.DataFrame, name: str) -> str:
    """The paper's layout: one line per paper row, one column per metric, ``ours / paper (gap)``."""
    spec = TABLES[name]
    headers = [h for _, h in spec.columns + spec.extra]
    fixed = list(spec.rows[0].fixed)
    ci = "ours_ci_low" in long and long["ours_ci_low"].notna().any()
    how = (" ours [bootstrap interval over samples] / paper (gap; * beyond our sampling noise: the gap's interval "
           "excludes 0)" if ci else "")
    lines = [f"### {spec.title}", "", f"Paper: {spec.source}. Cell: ours / paper (gap).{how} {spec.note}", "",
             "| " + " | ".join(["method", *fixed, *headers, "runs"]) + " |",
             "|" + "---|" * (2 + len(fixed) + len(headers))]
    for prow in spec.rows:
        cells = long[long["row"] == prow.label].set_index("metric")
        vals = [_cell(cells.loc[h]) for h in headers]
        lines.append("| " + " | ".join([prow.label, *prow.fixed.values(), *vals, str(int(cells["runs"].iloc[0]))])
                     + " |")
    formats = sorted({f for f in long["formats"].dropna() for f in f.split(",")})
    if formats:
        lines += ["", f"Formats of the runs: {', '.join(formats)}."]
    return "\n".join(lines) + "\n"


def _cell(c) -> str:
    ours, paper, gap = c["ours"], c["paper"], c["gap"]
    num = "n/a" if pd.isna(ours) else f"{ours:.4g}" if abs(ours) >= 100 else f"{ours:.4f}"
    low, high = c.get("ours_ci_low"), c.get("ours_ci_high")
    if not pd.isna(ours) and low is not None and not pd.isna(low) and not pd.isna(high):
        num += f" [{low:.4g}, {high:.4g}]"
    if pd.isna(paper):
        return num
    sig = c.get("gap_significant")
    mark = "*" if sig is not None and not pd.isna(sig) and bool(sig) else ""
    return f"{num} / {paper:g}" + ("" if pd.isna(gap) else f" ({gap:+.4g}{mark})")


def write_paper_table(long: pd.DataFrame, name: str, out_dir: Path) -> tuple[dict[str, Path], str]:
    """Write :func:`paper_table`'s ``long`` form as ``paper_<name>.md`` (the paper's layout), ``.csv``
    (exact) and ``.tex``; returns the paths and the Markdown."""
    spec = TABLES[name]
    md = render_markdown(long, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"paper_{name}.{k}" for k in ("md", "csv", "tex")}
    with atomic_path(paths["csv"]) as tmp:
        long.to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(md)
    wide = long.pivot_table(index="row", columns="metric", values=["ours", "paper"], aggfunc="first", sort=False)
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(latex_table(wide, caption=f"{spec.title}. Paper: {spec.source}.", index=True))
    return paths, md
