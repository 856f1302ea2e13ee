"""``python -m wanexp``: compose the Hydra config and run it. Nothing else lives here."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from wanexp.errors import WanexpError

_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=_CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from wanexp.run import format_summary, run

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, run_dir)
    except WanexpError as err:
        print(f"wanexp: error: {err}", file=sys.stderr)
        sys.exit(2)
    if summary:
        print(format_summary(summary))
    # The return value is what Hydra's optimising sweepers (Optuna, Nevergrad) minimise: -PSNR.
    psnr = summary.get("psnr") if summary else None
    return None if psnr is None else -float(psnr)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices would precede our output
    _hydra_main()


if __name__ == "__main__":
    main()
