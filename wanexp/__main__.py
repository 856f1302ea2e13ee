"""``python -m wanexp``: compose the Hydra config and run it. Nothing else lives here."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from wanexp.errors import WanexpError

_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=_CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from wanexp.config import check_settings
    from wanexp.console import resume_command, say, shout
    from wanexp.rundir import RunDir

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        try:
            check_settings(cfg)  # the settings' ranges first: seconds, before torch is imported
        except WanexpError as err:
            RunDir(run_dir).record_error("setup", err)
            raise
        from wanexp.run import run
        from wanexp.stages.report import format_summary
        summary = run(cfg, run_dir)
    except WanexpError as err:
        if in_sweep:  # one failed point must not stop the sweep; run() left error.json for the report
            shout(f"wanexp: error in sweep job {hydra_cfg.job.num} ({run_dir}): {err}")
            return None
        shout(f"wanexp: error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:  # finished stages and videos are on disk; say the one command that resumes
        shout(f"wanexp: interrupted; resume with: {resume_command(None if in_sweep else run_dir)}")
        sys.exit(130)
    except Exception as err:  # a bug or an environment failure (e.g. out of memory): traceback in error.json
        if in_sweep:
            shout(f"wanexp: job {hydra_cfg.job.num} failed ({run_dir}): {type(err).__name__}: {err} "
                  f"(traceback in {RunDir(run_dir).error})")
            return None
        raise
    if summary:
        say(format_summary(summary))
    # The return value is what Hydra's optimising sweepers (Optuna, Nevergrad) minimise: -PSNR.
    psnr = summary.get("psnr") if summary else None
    return None if psnr is None else -float(psnr)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices would precede our output
    # A config that does not compose (an unknown key, a wrong type, a missing option) reaches us as the
    # exception itself, for one line and exit status 2, instead of Hydra's multi-line report; a user
    # who sets HYDRA_FULL_ERROR gets Hydra's full trace as before.
    ours = "HYDRA_FULL_ERROR" not in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        _hydra_main()  # ${wanexp_sweep:} (the sweep directory) is registered by importing wanexp
    except (ConfigCompositionException, OverrideParseException) as err:
        if not ours:
            raise
        from wanexp.config import schema_error
        # no run directory (nor its log) exists yet: plain stderr, not a multirun's Hydra log format
        print(f"wanexp: error: {schema_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
