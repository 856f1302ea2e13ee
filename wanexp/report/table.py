"""The ablation table of many runs: rows gathered from run directories, deltas against BF16, written
as CSV, Markdown and LaTeX (and logged to W&B as a table by the caller). Runs that failed are listed
under the table, with the stage and the error, so one broken sweep point never hides the others.
Every row names its run directory; the LaTeX compiles with pdflatex and booktabs.

Where the runs kept their per-sample metrics (``eval/per_sample.csv``), every delta gets a paired
bootstrap interval over samples and a significance mark, every per-sample metric an interval of its
mean, and ``ablation_stats.{csv,md}`` lists each comparison with its spread and the samples a
difference of its size would need (:mod:`wanexp.report.stats`)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from wanexp.evaluate.vbench import HIF4_DIMENSIONS as ALL_DIMENSIONS
from wanexp.io import atomic_path
from wanexp.quant.recipes import table_rank
from wanexp.report.latex import latex_table
from wanexp.report.paper import paper_table, write_paper_table
from wanexp.report.results import gather
from wanexp.report.stats import Bootstrap, compare, interval, paired_differences, read_per_sample

# What tells the runs of an ablation apart (columns present in the rows, in this order).
KEYS = ["method", "format", "recipe", "attention", "expert_policy", "bins", "clip_candidates", "rank", "kept"]
VBENCH = ["vbench_avg", *ALL_DIMENSIONS]
METRICS = VBENCH + ["psnr", "ssim", "latent_rel_err", "model_size_gb", "pipeline_size_gb", "peak_memory_gb",
                    "sec_per_video", "fps"]
# Fidelity is each run's comparison with its own BF16 twin (same sample, same seed) already; the BF16
# row's fidelity is BF16 against itself (PSNR capped at 100 dB, SSIM 1, error 0), so a delta to it
# says nothing: these metrics get no Δ column.
NO_DELTA = ("psnr", "ssim", "latent_rel_err")
NO_DELTA_NOTE = ("PSNR, SSIM and latent rel. err are each run's fidelity to its own BF16 twin (same samples "
                 "and seeds), so they carry no delta column.")
# Runs are compared with the BF16 row of the same model, data and seed.
CONTEXT = ["model", "data", "seed"]
# Metrics scored per video (eval/per_sample.csv): these get bootstrap intervals.
PER_SAMPLE = VBENCH + list(NO_DELTA)
CI_SUFFIXES = ("_ci_low", "_ci_high", "_sig")


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run, key columns first, each metric followed by its delta to BF16 (none for the
    fidelity metrics: ``NO_DELTA``): the BF16 run of the same model, data and seed when the rows hold
    one, else the BF16 twin the run measured itself; the run directory last."""
    df = rows.copy().reset_index(drop=True)
    metrics = [m for m in METRICS if m in df and df[m].notna().any()]
    ref = pd.DataFrame(index=df.index, columns=metrics, dtype=float)
    bf16 = df[df["method"] == "bf16"].drop_duplicates(CONTEXT, keep="last")[CONTEXT + metrics]
    if not bf16.empty:
        ref = df[CONTEXT].merge(bf16, on=CONTEXT, how="left")[metrics].set_index(df.index)
    for m in metrics:
        if f"{m}_bf16" in df:
            ref[m] = ref[m].fillna(df[f"{m}_bf16"])
    keys = [c for c in KEYS if c in df and (c in KEYS[:2] or df[c].notna().any())]
    out = df[keys + [c for c in CONTEXT if c in df]].copy()
    for m in metrics:
        out[m] = df[m]
        if m not in NO_DELTA:
            out[f"Δ{m}"] = df[m] - ref[m].astype(float)
    if "run_dir" in df:
        out["run_dir"] = df["run_dir"]
    out["_order"] = out["method"].map(table_rank)  # the registry's order (wanexp.quant.recipes)
    sort = ["_order"] + [k for k in keys if k != "method"]
    out = out.sort_values(sort, na_position="first", kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# intervals over samples
# ---------------------------------------------------------------------------------------------
def add_intervals(table: pd.DataFrame, boot: Bootstrap) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table with ``<m>_ci_low/_ci_high`` beside every per-sample metric (the interval of the run's
    mean), ``Δ<m>_ci_low/_ci_high/_sig`` beside every delta of one (paired with the BF16 run of the same
    model, data and seed, else with the run's own BF16 twin's per-sample scores), and the long table of
    every comparison: those deltas, and each run against ``boot.baseline`` on every per-sample metric
    (the fidelity metrics included: paired differences between two runs' fidelity to BF16)."""
    stats_cols = ["method", "format", "run", "metric", "versus", "n", "delta", "ci_low", "ci_high", "significant",
                  "sd_diff", "mde", "n_needed"]
    if table.empty or "run_dir" not in table:
        return table, pd.DataFrame(columns=stats_cols)
    samples = {i: read_per_sample(table.at[i, "run_dir"]) for i in table.index}
    bf16 = _reference_rows(table, table["method"] == "bf16", keep="last")
    base_method = _baseline_method(table, boot.baseline)
    base = _reference_rows(table, table["method"] == base_method, keep="first") if base_method else {}
    out, stats = table.copy(), []
    for i, ps in samples.items():
        if ps is None:
            continue
        quantized = table.at[i, "method"] != "bf16"
        for m in (m for m in PER_SAMPLE if m in table and m in ps):
            if quantized or m not in NO_DELTA:  # BF16's fidelity is to itself (100 dB, 1, 0): no spread to show
                out.loc[i, f"{m}_ci_low"], out.loc[i, f"{m}_ci_high"] = interval(ps[m], boot)
            ref = _reference_values(samples, bf16.get(i), ps, m)
            if f"Δ{m}" in table and quantized and ref is not None:
                c = compare(paired_differences(ps[m], ref), boot)
                out.loc[i, f"Δ{m}_ci_low"], out.loc[i, f"Δ{m}_ci_high"] = c["ci_low"], c["ci_high"]
                out.loc[i, f"Δ{m}_sig"] = c["significant"]
                stats.append(_comparison(table, i, m, "bf16", c))
            j = base.get(i)
            if quantized and j is not None and j != i and samples.get(j) is not None and m in samples[j]:
                stats.append(_comparison(table, i, m, _label(table, j), compare(paired_differences(ps[m], samples[j][m]), boot)))
    order = [x for c in table.columns for x in (c, *(c + k for k in CI_SUFFIXES)) if x in out]
    for c in (c for c in out if c.endswith("_sig")):  # True / False, None where no interval was made
        out[c] = pd.Series([None if pd.isna(v) else bool(v) for v in out[c]], index=out.index, dtype=object)
    stats = pd.DataFrame(stats, columns=stats_cols)
    for c in ("n", "n_needed"):  # counts: integers, empty where there is no estimate (no difference to detect)
        stats[c] = pd.array([int(v) if pd.notna(v) and v < 2**53 else None for v in stats[c]], dtype="Int64")
    return out[order], stats


def _reference_rows(table: pd.DataFrame, mask: pd.Series, keep: str) -> dict:
    """Row index → the index of a row in ``mask`` with the same model, data and seed (its first or last)."""
    ctx = [c for c in CONTEXT if c in table]
    key = lambda i: tuple(str(table.at[i, c]) for c in ctx)  # noqa: E731
    refs: dict = {}
    for j in table.index[mask.fillna(False).astype(bool)]:
        if keep == "last" or key(j) not in refs:
            refs[key(j)] = j
    return {i: refs[key(i)] for i in table.index if key(i) in refs}


def _baseline_method(table: pd.DataFrame, baseline) -> str | None:
    """``auto``: the first quantized method of the (ladder-ordered) table; ``null``/``none``: no baseline."""
    if baseline is None or str(baseline).lower() in ("none", "null", ""):
        return None
    if str(baseline) == "auto":
        quantized = table.loc[table["method"] != "bf16", "method"]
        return None if quantized.empty else str(quantized.iloc[0])
    return str(baseline)


def _reference_values(samples: dict, j, ps: pd.DataFrame, m: str) -> pd.Series | None:
    """BF16's per-sample ``m``: the BF16 run's (row ``j``), else the run's own twin's (``<m>_bf16``)."""
    ref = samples.get(j) if j is not None else None
    if ref is not None and m in ref:
        return ref[m]
    return ps[f"{m}_bf16"] if f"{m}_bf16" in ps else None


def _label(table: pd.DataFrame, i) -> str:
    run = table.at[i, "run_dir"]
    return f"{table.at[i, 'method']} {table.at[i, 'format']}" + (f" ({Path(run).name})" if isinstance(run, str) else "")


def _comparison(table: pd.DataFrame, i, metric: str, versus: str, c: dict) -> dict:
    run = table.at[i, "run_dir"]
    return {"method": table.at[i, "method"], "format": table.at[i, "format"],
            "run": Path(run).name if isinstance(run, str) else None, "metric": metric, "versus": versus, **c}


def interval_note(boot: Bootstrap) -> str:
    return (f"[low, high]: {boot.describe()}; for a delta, of the mean of the per-sample differences, paired by "
            "sample id (same samples and seeds); for PSNR, SSIM and latent rel. err, of the run's mean. "
            "* the delta's interval excludes 0. Few samples (< ~20) make the intervals too narrow; they are "
            "not corrected for the table's many comparisons. Sample sizes: ablation_stats.md.")


def write_stats(stats: pd.DataFrame, out_dir: Path, boot: Bootstrap, stem: str = "ablation") -> dict[str, Path]:
    """``<stem>_stats.csv`` (exact) and ``.md`` (with what each column means)."""
    paths = {"stats_csv": out_dir / f"{stem}_stats.csv", "stats_md": out_dir / f"{stem}_stats.md"}
    with atomic_path(paths["stats_csv"]) as tmp:
        stats.to_csv(tmp, index=False)
    z = boot.z
    head = (f"Paired comparisons over samples: delta = mean of (run − versus) over the n sample ids both scored; "
            f"[ci_low, ci_high]: {boot.describe()}; significant: the interval excludes 0. sd_diff: the standard "
            f"deviation of the per-sample differences. mde: the smallest true difference n samples detect at "
            f"{boot.power:.0%} power, two-sided {1 - boot.confidence:.0%} level ({z:.2f} · sd_diff / √n, normal "
            f"approximation). n_needed: the samples a difference of the observed size needs at that power "
            f"(({z:.2f} · sd_diff / delta)², rounded up; empty: no difference to detect); for any other size δ, "
            f"n = n_needed · (delta / δ)².\n\n")
    body = to_markdown(stats) if not stats.empty else "(no run has per-sample metrics: eval/per_sample.csv)"
    with atomic_path(paths["stats_md"]) as tmp:
        tmp.write_text(head + body + "\n")
    return paths


def fold_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """For display: each value with an interval beside it as ``value [low, high]`` (``*`` when significant),
    the bound and mark columns folded in."""
    shown = table.copy()
    for c in [c for c in table.columns if f"{c}_ci_low" in table and f"{c}_ci_high" in table]:
        lo, hi, sig = table[f"{c}_ci_low"], table[f"{c}_ci_high"], table.get(f"{c}_sig")

        def text(i, c=c, lo=lo, hi=hi, sig=sig):
            v = table.at[i, c]
            if pd.isna(v):
                return None
            out = f"{v:.4f}"
            if pd.notna(lo[i]) and pd.notna(hi[i]):
                out += f" [{lo[i]:.4f}, {hi[i]:.4f}]"
            return out + ("*" if sig is not None and pd.notna(sig[i]) and bool(sig[i]) else "")
        shown[c] = [text(i) for i in table.index]
    return shown.drop(columns=[c for c in table.columns if _interval_of(c) in table])


def _interval_of(column: str) -> str | None:
    """``m`` for ``m_ci_low``, ``m_ci_high`` and ``m_sig``; None for any other column."""
    return next((column[: -len(k)] for k in CI_SUFFIXES if column.endswith(k)), None)


def write_tables(table: pd.DataFrame, out_dir: Path, stem: str = "ablation",
                 failures: pd.DataFrame | None = None, boot: Bootstrap | None = None) -> dict[str, Path]:
    """CSV (exact, absolute run directories), Markdown and LaTeX (4 decimals, run directories relative
    to ``out_dir`` when inside it) side by side in ``out_dir``; failed runs in ``<stem>_failed.csv``
    and under the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "tex": out_dir / f"{stem}.tex"}
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    shown = fold_intervals(relative_runs(table, out_dir))  # the LaTeX's cells; the Markdown folds them too
    note = f"\n{NO_DELTA_NOTE}\n" if any(m in table for m in NO_DELTA) else ""
    if boot is not None and any(c.endswith("_ci_low") for c in table):
        note += f"\n{interval_note(boot)}\n"
    md = to_markdown(shown) + "\n" + note if not table.empty else "(no finished runs)\n"
    if failures is not None and not failures.empty:
        paths["failed"] = out_dir / f"{stem}_failed.csv"
        with atomic_path(paths["failed"]) as tmp:
            failures.to_csv(tmp, index=False)
        md += f"\n**{len(failures)} run(s) without results:**\n\n" + failures.to_markdown(index=False) + "\n"
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(md)
    with atomic_path(paths["tex"]) as tmp:
        caption = " ".join(f"{stem} ({out_dir.name}). {note}".split())  # one paragraph: LaTeX captions take no blank line
        tmp.write_text(latex_table(shown, caption=caption))
    return paths


def relative_runs(table: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """The table with ``run_dir`` relative to ``out_dir`` where the run lies inside it."""
    if "run_dir" not in table:
        return table
    base = Path(out_dir).resolve()

    def rel(p):
        if not isinstance(p, str):
            return p
        path = Path(p).resolve()
        return os.path.relpath(path, base) if base in path.parents else str(path)
    return table.assign(run_dir=table["run_dir"].map(rel))


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown with 4 decimals and ``–`` for what a run did not measure; intervals folded into their
    values' cells (:func:`fold_intervals`)."""
    table = fold_intervals(table)
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="–")


def report_dirs(dirs, out_dir: Path, papers=(), boot: Bootstrap | None = None) -> dict:
    """Write the ablation table (and paper tables) of the runs under ``dirs`` into ``out_dir``, with
    bootstrap intervals over samples (``boot``: ``report.bootstrap``'s settings; defaults when None);
    returns the tables, the written paths, the failed runs and a printable text."""

    boot = boot or Bootstrap()
    rows, failures = gather(dirs)
    table, stats = add_intervals(ablation_table(rows), boot) if not rows.empty else (rows, pd.DataFrame())
    paths = write_tables(table, out_dir, failures=failures, boot=boot)
    paths.update(write_stats(stats, out_dir, boot))
    tables, paper_md = {"ablation": table, "ablation_stats": stats}, {}
    text = [to_markdown(relative_runs(table, out_dir)) if not table.empty else "(no finished runs)"]
    significant = stats[stats["significant"].astype(bool)] if not stats.empty else stats
    if not stats.empty:
        text.append(f"{len(significant)} of {len(stats)} paired comparisons significant ({boot.describe()}): "
                    f"{paths['stats_md']}")
    for name in papers:
        if rows.empty:
            break
        long = paper_table(rows, name, boot)
        written, paper_md[name] = write_paper_table(long, name, out_dir)
        paths.update({f"paper_{name}_{k}": p for k, p in written.items()})
        tables[f"paper_{name}"] = long
        text.append(paper_md[name])
    if not failures.empty:
        text.append(f"{len(failures)} run(s) without results (kept out of the table):\n"
                    + failures.to_markdown(index=False))
    text.append("\n".join(f"{k}: {p}" for k, p in paths.items()))
    return {"table": table, "failures": failures, "paths": paths, "tables": tables, "paper_md": paper_md,
            "text": "\n\n".join(text)}
