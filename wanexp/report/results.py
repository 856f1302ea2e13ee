"""One results row per run, written as CSV and parquet into the run directory; and the gathering of
many runs' rows (with the runs that failed or never finished listed apart, never silently dropped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from omegaconf import OmegaConf

from wanexp.errors import WanexpError
from wanexp.io import atomic_path
from wanexp.rundir import CONFIG_FILE, ERROR_FILE, RESULTS_CSV, RunDir


def write_row(run_dir: Path, row: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame([row])
    with atomic_path(RunDir(run_dir).results_csv) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(RunDir(run_dir).results_parquet) as tmp:
        df.to_parquet(tmp, index=False)
    return df


def run_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """Run directories given directly or found under multirun roots (any depth)."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise WanexpError(f"{d} does not exist")
        if is_run(d):
            found.append(d)
            continue
        marks = {p.parent for name in (CONFIG_FILE, RESULTS_CSV, ERROR_FILE) for p in d.rglob(name)}
        found += sorted(m for m in marks if is_run(m))
    return found


def is_run(d: Path) -> bool:
    """A run directory: it holds our config record, a results row or an error record."""
    return RunDir(d).is_run()


def gather(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the finished runs, one line per failed or unfinished run with its stage and error)."""
    dirs = list(dirs)
    rows, failures = [], []
    for run in run_dirs(dirs):
        rd = RunDir(run)
        if rd.error.is_file():
            err = _read(rd.error)
            failures.append(dict(_identity(run), stage=err.get("stage"), error=err.get("error"), run_dir=str(run)))
        elif rd.results_csv.is_file():
            rows.append(pd.read_csv(rd.results_csv))
        else:
            done = rd.finished_stages()
            failures.append(dict(_identity(run), stage="unfinished",
                                 error=f"no results yet (finished stages: {', '.join(done) or 'none'})",
                                 run_dir=str(run)))
    if not rows and not failures:
        raise WanexpError(f"no {RESULTS_CSV} found under {', '.join(map(str, dirs))}")
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return table, pd.DataFrame(failures, columns=["method", "format", "stage", "error", "run_dir"])


def read_rows(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every finished run's row under the given directories (run dirs or multirun roots)."""
    rows, _ = gather(dirs)
    if rows.empty:
        raise WanexpError(f"no {RESULTS_CSV} found under {', '.join(map(str, dirs))}")
    return rows


def _identity(run: Path) -> dict[str, Any]:
    """Method and format of a run, from our config record or (a run that failed before writing it) Hydra's."""
    rd = RunDir(run)
    if rd.config.is_file():
        cfg = _read(rd.config)
    elif rd.hydra_config.is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(rd.hydra_config), resolve=False)
    else:
        cfg = {}
    return {"method": (cfg.get("quant") or {}).get("name"), "format": (cfg.get("format") or {}).get("name")}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"error": f"unreadable {path.name}"}
