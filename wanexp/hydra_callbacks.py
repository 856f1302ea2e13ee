"""Hydra callbacks: checks that must happen before Hydra itself touches the disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot become a directory we write to (None if it can)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


class CheckOutputDir(Callback):
    """Refuse an unwritable run/sweep directory with one line, before Hydra's own mkdir tracebacks."""

    def _check(self, config: DictConfig, key: str) -> None:
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
        reason = _unwritable(path)
        if reason:
            print(f"wanexp: error: cannot create the output directory {path}: {reason} "
                  "(set paths.output_root, WANEXP_OUTPUT_ROOT or hydra.run.dir)", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


class SweepReport(Callback):
    """When a multirun ends, gather its runs into one ablation table in the sweep directory (and W&B),
    plus the paper's table when the experiment names one (``report.paper_table``). Failed sweep points
    are listed, the others kept; the process then exits with status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from wanexp.errors import WanexpError
        from wanexp.report.table import report_dirs
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        paper = OmegaConf.select(config, "report.paper_table", default=None)
        try:
            out = report_dirs([sweep_dir], sweep_dir, [paper] if paper else [])
        except WanexpError as err:  # e.g. nothing ran: nothing to tabulate, nothing lost
            print(f"wanexp: no ablation table for {sweep_dir}: {err}", file=sys.stderr)
            sys.exit(1)
        table, failures = out["table"], out["failures"]
        print(f"wanexp: ablation table of {len(table)} runs: {out['paths']['md']}")
        if paper in out["paper_md"]:
            print(out["paper_md"][paper] + f"wanexp: paper table: {out['paths'][f'paper_{paper}_md']}")
        from wanexp.report.html import sweep_outputs
        pictures = sweep_outputs(sweep_dir, [sweep_dir], config)  # the qualitative grids and report.html
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else {"name": "none"}
        if logger.get("name") != "none":
            from wanexp.report.wandb_log import log_run, sweep_group
            group = logger.get("group") or sweep_group(sweep_dir)
            log_run(dict(logger, group=group, job_type="ablation", run_name=f"ablation-{sweep_dir.name}"), sweep_dir,
                    {"sweep_dir": str(sweep_dir)}, {"runs": len(table), "failed": len(failures)}, out["tables"],
                    images=pictures["images"])
        print(f"wanexp: report: {pictures['report']}")
        if not failures.empty:
            print(f"wanexp: {len(failures)} of {len(table) + len(failures)} sweep runs failed "
                  f"(listed in {out['paths']['failed']}); re-run the same command to resume them", file=sys.stderr)
            sys.exit(1)
