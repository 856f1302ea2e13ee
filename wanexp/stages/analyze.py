"""The analyze stage (opt-in): the seed paper's diagnostic figures and the qualitative grids of one
run, drawn by wanexp.report.plots from the data wanexp.analysis reads out of the run directory."""

from __future__ import annotations

from omegaconf import OmegaConf

from wanexp.analysis import NothingToAnalyze
from wanexp.errors import WanexpError
from wanexp.report.html import write_run_report
from wanexp.report.plots import analyze_run
from wanexp.report.wandb_log import sweep_group
from wanexp.stages import STAGES
from wanexp.stages.state import Run


def analyze(state: Run) -> dict:
    """The seed paper's diagnostic figures and the qualitative grids of this run from what it recorded
    (``analysis/*.png|pdf|json``), logged to W&B as images unless ``logger=none``; report.html redrawn
    with them. A figure whose data the run lacks is skipped, one printed line each saying why; a run
    with the data of no figure fails, naming what is missing and the stage to run first."""
    cfg = state.cfg
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    if not logger.get("group"):
        logger["group"] = sweep_group(state.run_dir)
    analysis = cfg.get("analysis")
    analysis = OmegaConf.to_container(analysis, resolve=True) if analysis is not None else {}
    try:
        info = analyze_run(state.run_dir, analysis, logger=logger, config=OmegaConf.to_container(cfg, resolve=True))
    except NothingToAnalyze as err:
        first = next((s for s in STAGES if s in err.stages), None)
        raise WanexpError(f"{err}; run stage={first} first (stage=all runs every stage)" if first else str(err)) from None
    for name, why in info["skipped"].items():
        print(f"wanexp: analyze: skipped {name}: {why}")
    info["report"] = str(write_run_report(state.run_dir, OmegaConf.to_container(cfg.report, resolve=True)))
    print(f"wanexp: analyze: {len(info['figures'])} figures in {state.dir.analysis}; report: {info['report']}")
    return info
