"""Data-parallel calibration on the CPU (issue 20): two gloo ranks give the statistics one process
gives, and a rank lost after finishing its share is resumed without redoing the other rank's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wanexp.calib import CalibStats
from wanexp.calib.collect import ALL_BINS
from wanexp.calib.reduce import hypergeometric_counts, merge_reservoirs

# tsclip records every statistic (max, Hessian, token samples) and, with analysis, per-step traces
ARGS = ("quant=tsclip", "+experiment=smoke", "data.calib.num_samples=2", "stage=calibrate", "progress=false",
        "logger=none", "paths.calib_cache=null")


def _calibrate(tmp_path: Path, cache_dir, name: str, ranks: int, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT=str(tmp_path / "out"), OMP_NUM_THREADS="1",
               **(env_extra or {}))
    env.pop("WANDB_MODE", None)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run([sys.executable, *launcher, "-m", "wanexp", *ARGS, f"hydra.run.dir={tmp_path / name}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)


def _stats(run_dir: Path) -> CalibStats:
    from wanexp.calib.store import load_calib_stats
    return load_calib_stats(run_dir)


def test_hypergeometric_counts_and_merged_reservoirs_are_uniform_over_the_union():
    g = torch.Generator().manual_seed(0)
    assert sum(hypergeometric_counts([5, 3], 100, g)) == 8  # fewer rows than k: all of them
    sizes, k, trials = [1000, 3000], 100, 400
    hits = torch.zeros(sum(sizes))
    for t in range(trials):
        gen = torch.Generator().manual_seed(t)
        ids = [torch.arange(sizes[0]), sizes[0] + torch.arange(sizes[1])]
        reservoirs = [i[torch.randperm(len(i), generator=gen)[:k]] for i in ids]  # each a uniform sample
        merged = merge_reservoirs([r[:, None].float() for r in reservoirs], sizes, k, seed=t)
        assert merged.shape == (k, 1) and len(set(merged[:, 0].tolist())) == k  # no row twice
        hits[merged[:, 0].long()] += 1
    # every row of the union equally likely: k/N = 0.025 per trial, both ranks alike
    p = hits / trials
    assert abs(float(p[:1000].mean()) - 0.025) < 0.002 and abs(float(p[1000:].mean()) - 0.025) < 0.002
    assert torch.equal(merge_reservoirs([torch.ones(3, 2)], [3], 8, seed=1), torch.ones(3, 2))


@pytest.mark.slow
def test_two_ranks_reduce_to_the_statistics_of_one_process_and_resume_a_lost_rank(cache_dir, tmp_path):
    one = _calibrate(tmp_path, cache_dir, "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    lost = _calibrate(tmp_path, cache_dir, "two", 2, {"WANEXP_FAULT_DIE_AFTER_SHARE": "1"})
    assert lost.returncode != 0  # rank 1 died after writing its share of the first pass
    calib_dir = tmp_path / "two" / "calib"
    shares = sorted(p.name for p in calib_dir.glob("*.rank*-of2.safetensors"))
    assert shares == ["stats-high_noise-part000-of001.rank0-of2.safetensors",
                      "stats-high_noise-part000-of001.rank1-of2.safetensors"]
    kept = {p.name: p.stat().st_mtime_ns for p in calib_dir.glob("*.rank*")}
    two = _calibrate(tmp_path, cache_dir, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "stages" / "calibrate.json").read_text())
    # rank 0 took its share of the high-noise pass from disk instead of denoising again (rank 1's
    # share survived too and was reused by rank 1); the low-noise pass ran; the shares are dropped
    assert info["ranks"] == 2 and info["rank_shares_reused"] == 1
    assert not list(calib_dir.glob("*.rank*")) and len(kept) == 2

    a, b = _stats(tmp_path / "one"), _stats(tmp_path / "two")
    assert a.data.keys() == b.data.keys() and a.aliases == b.aliases
    for key, da in a.data.items():
        db = b.data[key]
        assert da.keys() == db.keys(), key
        if "count" in da:
            assert torch.equal(da["count"], db["count"])              # sums of counts: exact
        if "absmax" in da:
            assert torch.equal(da["absmax"], db["absmax"])            # maxima: bit for bit
        if "tokens" in da:  # a uniform sample of the same size (the union's rows, not the same rows)
            assert da["tokens"].shape == db["tokens"].shape and torch.isfinite(db["tokens"].float()).all()
        if key[2] == ALL_BINS and "hessian" in da:  # sums: up to float rounding (stated: 1e-6 of the largest entry)
            ha, hb = a.get(*key)["hessian"], b.get(*key)["hessian"]
            assert float((ha - hb).abs().max()) <= 1e-6 * float(ha.abs().max()), key
    assert a.trace.keys() == b.trace.keys() and a.trace
    for k in a.trace:
        assert torch.equal(a.trace[k]["absmax"], b.trace[k]["absmax"])
        assert torch.allclose(a.trace[k]["pct"], b.trace[k]["pct"], rtol=1e-6)
