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


def test_forward_bench_dry_run_times_each_path_and_further_formats_and_keeps_json_after_each(tmp_path):
    """The forward bench's logic on the CPU at a small width (the GPU run is
    ``python -m wanexp.bench bench=fp8_a14b``): every path timed, a further format built and
    quantized afresh, ratios to BF16 from the same process, the JSON rewritten after each measurement."""
    import json

    from wanexp.bench.core import run_bench, to_markdown
    seen = []

    def log(msg):
        if (tmp_path / "smoke.json").is_file():
            seen.append(len(json.loads((tmp_path / "smoke.json").read_text())["resolutions"].get("tiny", {})))
    cfg = {"name": "smoke", "device": "cpu", "num_layers": 1, "warmup": 0, "repeats": 1,
           "spec": {"num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256},
           "resolutions": [{"name": "tiny", "height": 32, "width": 32, "frames": 5}],
           "paths": ["bf16", "reference", "fused"], "extra_formats": ["mxfp4", "int4"], "extra_format_paths": ["fused"],
           "quant": {"rank": 4}, "profile": {"enabled": False}}
    r = run_bench(cfg, tmp_path, log=log)
    e = r["resolutions"]["tiny"]
    assert r["paths"] == ["bf16", "reference", "fused", "fused_int4"]   # mxfp4 is the bench's own format
    assert all(e[p]["time_ratio"] == e[p]["seconds"] / e["bf16"]["seconds"] for p in r["paths"][1:])
    assert r["bytes_by_path"]["fused_int4"] < r["bytes_bf16"] and r["targeted_linears"] == 10
    assert 0 < e["fused_int4_vs_bf16_rel_err"] < 1 and e["fused_vs_reference_rel_err"] == 0  # no GPU: one path
    assert max(seen) >= 3 and json.loads((tmp_path / "smoke.json").read_text())["paths"] == r["paths"]
    assert "W4A4 INT4 fused" in to_markdown(r)
