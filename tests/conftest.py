import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny checkpoint + fixture) for the whole session, shared with CLI subprocesses."""
    path = Path(os.environ.get("WANEXP_TEST_CACHE") or tmp_path_factory.mktemp("wanexp_cache"))
    os.environ["WANEXP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe(cache_dir):
    from wanexp.models import load_pipeline
    return load_pipeline({"name": "tiny", "dtype": "bf16"}, cache_dir)


@pytest.fixture
def cli(cache_dir, tmp_path):
    """Run ``python -m wanexp ARGS`` in a subprocess with outputs under tmp_path; returns CompletedProcess."""
    def run(*args, env=None, timeout=600):
        full_env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT=str(tmp_path / "outputs"),
                        WANDB_MODE=os.environ.get("WANDB_MODE", ""), **(env or {}))
        full_env.pop("WANDB_MODE") if not full_env["WANDB_MODE"] else None
        return subprocess.run([sys.executable, "-m", "wanexp", *args, "progress=false"], cwd=tmp_path,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
    return run
