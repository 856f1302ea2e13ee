"""Hydra hooks: the sweep directory's name, checks that must happen before Hydra touches the disk,
and the sweep's table at its end."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Command-line arguments that do not change what a sweep computes, so they do not change its directory.
_NOT_IDENTITY = ("hydra.", "hydra/", "progress=", "stage=", "+hydra.", "++hydra.")
_FLAGS_WITH_VALUE = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun")


def sweep_name(argv: Sequence[str] | None = None) -> str:
    """``<overrides>/<hash>``: a sweep's directory under ``multirun/`` as a function of its command
    line, so re-running the same command resumes the same sweep (each point where it stopped).
    Hydra settings (``hydra.*``, the launcher), ``progress`` and ``stage`` are left out; the order
    of the overrides counts (it numbers the jobs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            kept.append(a)
            skip = False
        elif a in _FLAGS_WITH_VALUE:
            kept.append(a)
            skip = True
        elif a.startswith("-") or "=" not in a or a.startswith(_NOT_IDENTITY):
            continue
        else:
            kept.append(a)
    parts = [_slug(a) for a in kept]
    slug = parts[0][:80] if parts else "default"
    for part in parts[1:]:  # whole overrides while they fit; the hash tells the rest apart
        if len(slug) + 2 + len(part) > 80:
            break
        slug += "__" + part
    return f"{slug}/{hashlib.sha256(repr(kept).encode()).hexdigest()[:8]}"


def _slug(arg: str) -> str:
    """``expert.keep_blocks=[0,1,2]`` → ``expert.keep_blocks-0+1+2``: only characters a Hydra override
    value takes unquoted, so a path inside the sweep (``quant.load=…/artifact/…``) needs no quoting."""
    arg = re.sub(r"[\[\]{}()'\" ]", "", arg.lstrip("+~"))
    arg = arg.replace("=", "-").replace(",", "+").replace("/", "-").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", arg)


class CheckOutputDir(Callback):
    """Refuse an unwritable run/sweep directory with one line, before Hydra's own mkdir tracebacks
    (probed by writing: as root ``os.access`` says yes even to ``/proc``)."""

    def _check(self, config: DictConfig, key: str) -> None:
        from wanexp.errors import WanexpError
        from wanexp.io import probe_writable
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
        try:
            probe_writable(path, "output directory", "set paths.output_root, WANEXP_OUTPUT_ROOT or " + key)
        except WanexpError as err:
            print(f"wanexp: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")


class SweepReport(Callback):
    """When a multirun ends, gather its runs into one ablation table in the sweep directory (and W&B),
    plus the paper's table when the experiment names one (``report.paper_table``), and print it.
    Failed sweep points are listed, the others kept; the process then exits with status 1, saying
    the command that resumes them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from wanexp.console import append_log, resume_command
        from wanexp.errors import WanexpError
        from wanexp.report.table import relative_runs, report_dirs, to_markdown
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).resolve()
        paper = OmegaConf.select(config, "report.paper_table", default=None)

        def say(message: str, err: bool = False) -> None:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)
            append_log(sweep_dir / "wanexp.log", message)
        from wanexp.report.stats import Bootstrap
        boot = Bootstrap.from_cfg(OmegaConf.to_container(config.report.bootstrap, resolve=True)
                                  if OmegaConf.select(config, "report.bootstrap") is not None else None)
        try:
            out = report_dirs([sweep_dir], sweep_dir, [paper] if paper else [], boot)
        except WanexpError as err:  # e.g. nothing ran: nothing to tabulate, nothing lost
            say(f"wanexp: no ablation table for {sweep_dir}: {err}", err=True)
            sys.exit(1)
        table, failures = out["table"], out["failures"]
        if not table.empty:
            say(to_markdown(relative_runs(table, sweep_dir)))
        say(f"wanexp: ablation table of {len(table)} runs: {out['paths']['md']}")
        if "stats_md" in out["paths"] and not out["tables"]["ablation_stats"].empty:
            say(f"wanexp: paired comparisons with intervals and sample sizes: {out['paths']['stats_md']}")
        if paper in out["paper_md"]:
            say(out["paper_md"][paper] + f"wanexp: paper table: {out['paths'][f'paper_{paper}_md']}")
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
            say(f"wanexp: {len(failures)} of {len(table) + len(failures)} sweep runs failed (listed in "
                f"{out['paths']['failed']}); after fixing them, resume the sweep in {sweep_dir} with: "
                f"{resume_command()}", err=True)
            sys.exit(1)
