"""The ablation table of many runs: rows gathered from run directories, deltas against BF16, written
as CSV, Markdown and LaTeX (and logged to W&B as a table by the caller)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from wanexp.io import atomic_path
from wanexp.report.results import read_rows

KEYS = ["method", "format", "expert_policy", "bins", "rank"]
METRICS = ["psnr", "ssim", "latent_rel_err", "model_size_gb", "peak_memory_gb", "sec_per_video"]
# Runs are compared with the BF16 row of the same model, data and seed.
CONTEXT = ["model", "data", "seed"]


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run, key columns first, each metric followed by its delta to the matching BF16 run."""
    df = rows.copy()
    metrics = [m for m in METRICS if m in df]
    bf16 = (df[df["method"] == "bf16"].drop_duplicates(CONTEXT, keep="last")[CONTEXT + metrics]
            .rename(columns={m: f"{m}_bf16" for m in metrics}))
    joined = df.merge(bf16, on=CONTEXT, how="left")
    out = df[[c for c in KEYS + CONTEXT if c in df]].copy()
    for m in metrics:
        out[m] = df[m]
        out[f"Δ{m}"] = joined[m] - joined[f"{m}_bf16"]
    order = {m: i for i, m in enumerate(["bf16", "w4a16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip",
                                          "tsclip_keep_sensitive", "hif4_tailaware"])}
    out["_order"] = out["method"].map(order).fillna(len(order))
    out = out.sort_values(["_order", "format", "expert_policy", "bins", "rank"]).drop(columns="_order")
    return out.reset_index(drop=True)


def write_tables(table: pd.DataFrame, out_dir: Path, stem: str = "ablation") -> dict[str, Path]:
    """CSV (exact), Markdown and LaTeX (4 significant decimals) side by side in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "tex": out_dir / f"{stem}.tex"}
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(table.to_latex(index=False, float_format="%.4f", na_rep="--"))
    return paths


def build(dirs: Iterable[str | Path], out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    table = ablation_table(read_rows(dirs))
    return table, write_tables(table, Path(out_dir))
