"""``python -m wanexp.bench [bench=a14b_h100] [bench.key=value ...]``: the GPU-efficiency benchmark.

Composes ``bench_conf/bench.yaml`` (the ``bench`` group: ``default`` = a quick 2-block check,
``a14b_h100`` = the full A14B expert at 480p and 720p; a config tree of its own, so that
``python -m wanexp --help`` lists no ``bench`` group it would reject) and writes ``<bench.name>.json`` and
``.md`` into ``bench.out_dir`` (default: the Hydra run directory).
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench_conf")


@hydra.main(version_base="1.3", config_path=_CONF, config_name="bench")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from wanexp.bench.core import run_bench

    bench = OmegaConf.to_container(cfg.bench, resolve=True)
    out_dir = bench.get("out_dir") or HydraConfig.get().runtime.output_dir
    run_bench(bench, out_dir)


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _main()


if __name__ == "__main__":
    main()
