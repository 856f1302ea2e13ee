"""``python -m wanexp.report DIR [DIR ...]``: gather the results rows of many runs (run dirs or
multirun roots) into one ablation table (CSV, Markdown, LaTeX; deltas against BF16)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wanexp.errors import WanexpError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wanexp.report", description=__doc__)
    ap.add_argument("dirs", nargs="+", help="run directories or multirun roots holding results.csv files")
    ap.add_argument("--out", help="where to write ablation.{csv,md,tex} (default: the first DIR)")
    ap.add_argument("--wandb-project", default=None, help="also log the table to this W&B project (offline unless logged in)")
    args = ap.parse_args(argv)
    from wanexp.report.table import build
    try:
        table, paths = build(args.dirs, args.out or args.dirs[0])
    except WanexpError as err:
        print(f"wanexp.report: error: {err}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".4f"))
    print("\n" + "\n".join(f"{k}: {p}" for k, p in paths.items()))
    if args.wandb_project:
        from wanexp.report.wandb_log import log_run
        log_run({"name": "wandb", "project": args.wandb_project, "job_type": "report"}, Path(paths["csv"]).parent,
                {"dirs": [str(d) for d in args.dirs]}, {"runs": len(table)}, {"ablation": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
