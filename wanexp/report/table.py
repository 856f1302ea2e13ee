"""The ablation table of many runs: rows gathered from run directories, deltas against BF16, written
as CSV, Markdown and LaTeX (and logged to W&B as a table by the caller). Runs that failed are listed
under the table, with the stage and the error, so one broken sweep point never hides the others."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wanexp.io import atomic_path

# What tells the runs of an ablation apart (columns present in the rows, in this order).
KEYS = ["method", "format", "recipe", "expert_policy", "bins", "clip_candidates", "rank", "kept"]
VBENCH = ["vbench_avg", "imaging_quality", "aesthetic_quality", "subject_consistency", "motion_smoothness",
          "overall_consistency"]
METRICS = VBENCH + ["psnr", "ssim", "latent_rel_err", "model_size_gb", "pipeline_size_gb", "peak_memory_gb",
                    "sec_per_video", "fps"]
# Fidelity is measured against the BF16 twin already: its delta needs a BF16 run among the rows.
OWN_REFERENCE = {"psnr", "ssim", "latent_rel_err"}
# Runs are compared with the BF16 row of the same model, data and seed.
CONTEXT = ["model", "data", "seed"]
LADDER = ["bf16", "w4a16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "tsclip_keep_sensitive",
          "hif4_conservative", "hif4_tailaware"]


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run, key columns first, each metric followed by its delta to BF16: the BF16 run of
    the same model, data and seed when the rows hold one, else the BF16 twin the run measured itself."""
    df = rows.copy().reset_index(drop=True)
    metrics = [m for m in METRICS if m in df and df[m].notna().any()]
    ref = pd.DataFrame(index=df.index, columns=metrics, dtype=float)
    bf16 = df[df["method"] == "bf16"].drop_duplicates(CONTEXT, keep="last")[CONTEXT + metrics]
    if not bf16.empty:
        ref = df[CONTEXT].merge(bf16, on=CONTEXT, how="left")[metrics].set_index(df.index)
    for m in metrics:
        if f"{m}_bf16" in df and m not in OWN_REFERENCE:
            ref[m] = ref[m].fillna(df[f"{m}_bf16"])
    keys = [c for c in KEYS if c in df and (c in KEYS[:2] or df[c].notna().any())]
    out = df[keys + [c for c in CONTEXT if c in df]].copy()
    for m in metrics:
        out[m] = df[m]
        out[f"Δ{m}"] = df[m] - ref[m].astype(float)
    out["_order"] = out["method"].map({m: i for i, m in enumerate(LADDER)}).fillna(len(LADDER))
    sort = ["_order"] + [k for k in keys if k != "method"]
    out = out.sort_values(sort, na_position="first", kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)


def write_tables(table: pd.DataFrame, out_dir: Path, stem: str = "ablation",
                 failures: pd.DataFrame | None = None) -> dict[str, Path]:
    """CSV (exact), Markdown and LaTeX (4 decimals) side by side in ``out_dir``; failed runs in
    ``<stem>_failed.csv`` and under the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "tex": out_dir / f"{stem}.tex"}
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    md = to_markdown(table) + "\n" if not table.empty else "(no finished runs)\n"
    if failures is not None and not failures.empty:
        paths["failed"] = out_dir / f"{stem}_failed.csv"
        with atomic_path(paths["failed"]) as tmp:
            failures.to_csv(tmp, index=False)
        md += f"\n**{len(failures)} run(s) without results:**\n\n" + failures.to_markdown(index=False) + "\n"
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(md)
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(table.to_latex(index=False, float_format="%.4f", na_rep="--"))
    return paths


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown with 4 decimals and ``–`` for what a run did not measure."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="–")


def report_dirs(dirs, out_dir: Path, papers=()) -> dict:
    """Write the ablation table (and paper tables) of the runs under ``dirs`` into ``out_dir``; returns
    the tables, the written paths, the failed runs and a printable text."""
    from wanexp.report.paper import paper_table, write_paper_table
    from wanexp.report.results import gather

    rows, failures = gather(dirs)
    table = ablation_table(rows) if not rows.empty else rows
    paths = write_tables(table, out_dir, failures=failures)
    tables, paper_md = {"ablation": table}, {}
    text = [to_markdown(table) if not table.empty else "(no finished runs)"]
    for name in papers:
        if rows.empty:
            break
        long = paper_table(rows, name)
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
