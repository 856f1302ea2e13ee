"""One results row per run, written as CSV and parquet into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from wanexp.errors import WanexpError
from wanexp.io import atomic_path

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"


def write_row(run_dir: Path, row: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame([row])
    with atomic_path(run_dir / RESULTS_CSV) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(run_dir / RESULTS_PARQUET) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def read_rows(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every ``results.csv`` under the given directories (run dirs or multirun roots), one row each."""
    paths = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise WanexpError(f"{d} does not exist")
        paths += [d / RESULTS_CSV] if (d / RESULTS_CSV).is_file() else sorted(d.rglob(RESULTS_CSV))
    if not paths:
        raise WanexpError(f"no {RESULTS_CSV} found under {', '.join(map(str, dirs))}")
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
