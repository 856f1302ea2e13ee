"""The whole-pipeline memory bench's logic, dry-run on the CPU with the tiny architecture (the GPU
run at full A14B size is `python -m wanexp.bench bench=pipeline_h100`)."""

import torch

from wanexp.bench.pipeline import run_pipeline_memory, to_markdown


def test_pipeline_memory_dry_run_builds_quantizes_and_generates_under_each_policy():
    saved = []
    r = run_pipeline_memory({"arch": "tiny", "height": 64, "width": 64, "frames": 5, "steps": 2,
                             "policies": ["model", "none"], "rank": 4}, torch.device("cpu"), log=lambda m: None,
                            save=lambda res: saved.append(len(res["runs"])))
    assert list(r["runs"]) == ["bf16/model", "bf16/none", "w4a4/model", "w4a4/none"]
    assert saved == [1, 2, 3, 4]  # written after every measurement
    assert r["quantized_linears"] == 2 * 4 * 10  # both experts, 4 blocks, 10 targeted linears a block
    bf16, w4a4 = r["runs"]["bf16/none"], r["runs"]["w4a4/none"]
    assert w4a4["pipeline_bytes"] < bf16["pipeline_bytes"]
    assert all(run["frames"] == 5 and "peak_bytes" not in run for run in r["runs"].values())  # no GPU: no peak
    assert "| w4a4 | model |" in "\n".join(to_markdown(r))
