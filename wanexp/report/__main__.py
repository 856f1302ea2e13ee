"""``python -m wanexp.report DIR [DIR ...]``: gather the results rows of many runs (run dirs or
multirun roots) into one ablation table (CSV, Markdown, LaTeX; deltas against BF16). Runs that
failed or have not finished are listed with their stage and error; the others are kept.
``--paper table1|table2|hif4`` also renders a paper's table beside the paper's own figures. Deltas get
paired bootstrap intervals over samples (``--resamples``, ``--seed``, ``--baseline``). The
qualitative grids of the runs (``analysis/``) and ``report.html`` are written beside the tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wanexp.errors import WanexpError
from wanexp.report.table import report_dirs


def main(argv: list[str] | None = None) -> int:
    from wanexp.report.paper import TABLES
    from wanexp.report.stats import Bootstrap
    ap = argparse.ArgumentParser(prog="python -m wanexp.report", description=__doc__)
    ap.add_argument("dirs", nargs="+", help="run directories or multirun roots holding results.csv files")
    ap.add_argument("--out", help="where to write ablation.{csv,md,tex} (default: the first DIR)")
    ap.add_argument("--paper", action="append", choices=sorted(TABLES), default=[],
                    help="also write paper_<NAME>.{md,csv,tex}: the paper's table with our numbers and the gap")
    defaults = Bootstrap()
    ap.add_argument("--resamples", type=int, default=defaults.resamples,
                    help=f"bootstrap draws per interval (default {defaults.resamples}, as report.bootstrap.resamples)")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="seed of the bootstrap resampling (default 0)")
    ap.add_argument("--baseline", default=defaults.baseline,
                    help="method every run is also compared with in ablation_stats (auto: the first quantized one; none)")
    ap.add_argument("--wandb-project", default=None, help="also log the table to this W&B project (offline unless logged in)")
    args = ap.parse_args(argv)
    out = Path(args.out or args.dirs[0])
    try:
        boot = Bootstrap.from_cfg({"resamples": args.resamples, "seed": args.seed, "baseline": args.baseline})
    except ValueError as err:
        print(f"wanexp.report: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = report_dirs(args.dirs, out, args.paper, boot)
    except WanexpError as err:
        print(f"wanexp.report: error: {err}", file=sys.stderr)
        return 2
    from wanexp.report.html import sweep_outputs
    from wanexp.report.results import is_run
    print(summary["text"])
    pictures = {"images": {}}
    if is_run(out):  # its own analysis/ and report.html are the run's: not overwritten by the comparison's
        print(f"report: not written ({out} is a run directory with its own report.html; pass --out DIR)")
    else:
        pictures = sweep_outputs(out, args.dirs)
        print(f"report: {pictures['report']}")
    if args.wandb_project:
        from wanexp.report.wandb_log import log_run
        log_run({"name": "wandb", "project": args.wandb_project, "job_type": "report"}, out,
                {"dirs": [str(d) for d in args.dirs]}, {"runs": len(summary["table"])}, summary["tables"],
                images=pictures["images"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
