"""Scale-out on the CPU: one run's generation sharded over torchrun ranks (gloo), a rank killed and
the run resumed, and a sweep through Hydra's submitit launcher (local processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
# One thread per process in every run compared here: a matmul's summation order may depend on it.
SMOKE = ("+experiment=smoke", "data.eval.num_samples=3", "progress=false")


def _env(cache_dir, root: Path) -> dict:
    env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT=str(root), OMP_NUM_THREADS="1")
    env.pop("WANDB_MODE", None)
    return env


def _wanexp(args, env, cwd, ranks: int = 1) -> subprocess.Popen:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.Popen([sys.executable, *launcher, "-m", "wanexp", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: int = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _manifest_ids(d: Path) -> Counter:
    return Counter(json.loads(l)["id"] for shard in d.glob("manifest*.jsonl") for l in shard.read_text().splitlines() if l)


def test_two_ranks_make_exactly_the_videos_one_rank_makes(cache_dir, tmp_path):
    from wanexp.generate import read_mp4
    one = _wanexp([*SMOKE, f"hydra.run.dir={tmp_path / 'one'}"], _env(cache_dir, tmp_path / "out1"), tmp_path)
    rc, _, err = _finish(one)
    assert rc == 0, err[-3000:]
    # no hydra.run.dir: the ranks must agree on one run directory by themselves
    two = _wanexp(list(SMOKE), _env(cache_dir, tmp_path / "out2"), tmp_path, ranks=2)
    rc, out, err = _finish(two)
    assert rc == 0, err[-3000:]
    runs = [d for d in (tmp_path / "out2" / "runs").glob("*/*") if d.is_dir()]
    assert len(runs) == 1, runs
    a, b = tmp_path / "one", runs[0]
    assert sorted(p.name for p in b.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    per_shard = {p.name: len(p.read_text().splitlines()) for p in b.glob("manifest*.jsonl")}
    assert per_shard == {"manifest.rank0.jsonl": 2, "manifest.rank1.jsonl": 1}  # samples 0, 2 | 1
    assert _manifest_ids(a) == _manifest_ids(b) == Counter(dict.fromkeys(_manifest_ids(a), 1))
    for sid in _manifest_ids(a):
        assert (a / "latents" / f"{sid}.safetensors").read_bytes() == (b / "latents" / f"{sid}.safetensors").read_bytes()
        assert (read_mp4(a / "videos" / f"{sid}.mp4") == read_mp4(b / "videos" / f"{sid}.mp4")).all()
    ra, rb = pd.read_csv(a / "results.csv").iloc[0], pd.read_csv(b / "results.csv").iloc[0]
    assert rb["num_videos"] == 3 and rb["latent_rel_err"] == ra["latent_rel_err"] and rb["psnr"] == ra["psnr"]
    assert out.count("wanexp  method=rtn") == 1  # rank 0 alone evaluates and reports


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of torchrun's worker ``rank`` whose environment holds ``marker``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and f"WANEXP_OUTPUT_ROOT={marker}".encode() in env:
            return int(proc.name)
    return None


def test_a_killed_rank_loses_only_its_video_in_flight(cache_dir, tmp_path):
    root, run_dir = tmp_path / "out", tmp_path / "run"
    args = ["+experiment=smoke", "data.eval.num_samples=6", "progress=false", f"hydra.run.dir={run_dir}"]
    job = _wanexp(args, _env(cache_dir, root), tmp_path, ranks=2)
    shard, deadline = None, time.time() + 600
    while time.time() < deadline and job.poll() is None:  # wait for rank 1's first finished video
        shard = next(root.glob("reference_cache/*/manifest.rank1.jsonl"), None)
        if shard is not None and shard.read_text().count("\n") >= 1:
            break
        time.sleep(0.1)
    pid = _rank_pid(1, str(root))
    assert pid is not None and job.poll() is None, "rank 1 should be mid-generation"
    os.kill(pid, signal.SIGKILL)
    rc, _, _ = _finish(job)
    assert rc != 0
    refs = shard.parent
    assert 1 <= sum(_manifest_ids(refs).values()) < 6  # killed half way
    rc, _, err = _finish(_wanexp(args, _env(cache_dir, root), tmp_path, ranks=2))
    assert rc == 0, err[-3000:]
    ids = set(pd.read_csv(run_dir / "eval" / "per_sample.csv")["id"])
    assert len(ids) == 6
    assert _manifest_ids(refs) == Counter(dict.fromkeys(ids, 1))      # no BF16 video made twice
    assert _manifest_ids(run_dir) == Counter(dict.fromkeys(ids, 1))   # nor a quantized one
    assert not (run_dir / "error.json").exists()


def test_submitit_local_launcher_runs_a_sweep_and_the_report_gathers_it(cache_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["-m", "quant=bf16,rtn", "hydra/launcher=submitit_local", "+experiment=smoke", "data.eval.num_samples=1",
            "progress=false"]
    rc, out, err = _finish(_wanexp(args, _env(cache_dir, tmp_path / "out"), tmp_path))
    assert rc == 0, (out + err)[-3000:]
    sweep = next((tmp_path / "out" / "multirun").glob("*/*"))
    assert list((sweep / ".submitit").iterdir()), "jobs went through submitit"
    table = pd.read_csv(sweep / "ablation.csv")
    assert list(table["method"]) == ["bf16", "rtn"]
    assert table.set_index("method").loc["rtn", "Δmodel_size_gb"] < 0
