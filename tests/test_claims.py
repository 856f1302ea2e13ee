"""Claims let parallel jobs share one video directory (the BF16 reference cache) without generating a
video twice, and let a job take over the video of one that died."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from wanexp.data import Sample
from wanexp.generate import CLAIMS, _claim, generate_videos


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_is_exclusive_while_its_process_lives(tmp_path):
    path = tmp_path / CLAIMS / "s1"
    assert _claim(path, stale_s=60) == path
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert _claim(path, stale_s=60) is None  # held by a live process (this one)


def test_a_claim_of_a_dead_or_silent_process_is_taken_over(tmp_path):
    dead = tmp_path / CLAIMS / "dead"
    dead.parent.mkdir(parents=True)
    dead.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    assert _claim(dead, stale_s=3600) == dead and json.loads(dead.read_text())["pid"] == os.getpid()
    remote = tmp_path / CLAIMS / "remote"
    remote.write_text(json.dumps({"host": "another-node", "pid": 1}))
    assert _claim(remote, stale_s=3600) is None          # another host, recently touched: alive
    old = time.time() - 7200
    os.utime(remote, (old, old))
    assert _claim(remote, stale_s=3600) == remote         # silent for two hours: taken over


def test_a_sample_claimed_by_another_job_is_waited_for_not_generated(tmp_path):
    sample = Sample(id="singleobj_1", category="single object", prompt="a cup", image_path=Path("x.png"))
    claim = tmp_path / CLAIMS / sample.id
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"host": "another-node", "pid": 1}))
    record = {"id": sample.id, "category": sample.category, "video": "videos/singleobj_1.mp4",
              "latents": "latents/singleobj_1.safetensors", "seconds": 1.0, "frames": 5}

    def other_job_finishes():
        time.sleep(0.3)
        for rel in (record["video"], record["latents"]):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(b"done")
        (tmp_path / "manifest.jsonl").write_text(json.dumps(record) + "\n")
        claim.unlink()

    pipe = SimpleNamespace(_execution_device=torch.device("cpu"))  # generating would fail: it must not
    worker = threading.Thread(target=other_job_finishes)
    worker.start()
    start = time.perf_counter()
    out = generate_videos(pipe, [sample], tmp_path, {}, 42, "bf16", poll_s=0.05)
    worker.join()
    assert out == [record] and 0.25 < time.perf_counter() - start < 5
    assert not (tmp_path / CLAIMS).exists()
