"""The whole-pipeline memory bench's logic, dry-run on the CPU with the tiny architecture (the GPU
run at full A14B size is `python -m wanexp.bench bench=pipeline_h100`)."""

import pytest
import torch

from wanexp.bench.pipeline import run_pipeline_memory, run_whole_video, to_markdown, video_fit, video_markdown


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


def test_video_fit_takes_the_median_step_and_leaves_the_rest_as_overhead():
    fit = video_fit({"steps": 4, "seconds": 50.0, "step_seconds": [10.0, 9.0, 30.0]})
    assert fit == {"step_s": 10.0, "overhead_s": 10.0}
    assert video_fit({"steps": 3, "seconds": 25.0, "step_seconds": [6.0, 8.0]}) == {"step_s": 7.0, "overhead_s": 4.0}


def test_whole_video_dry_run_times_steps_projects_and_checks_the_projection():
    saved = []
    cfg = {"arch": "tiny", "height": 32, "width": 32, "frames": 5, "compile": False, "warmup_steps": 1,
           "fit_steps": 3, "check_steps": 4, "check": ["bf16", "w4a4"], "paper_steps": 40, "rank": 4}
    r = run_whole_video(cfg, torch.device("cpu"), log=lambda m: None, save=lambda res: saved.append(dict(res["runs"])))
    assert list(r["runs"]) == ["bf16", "w4a4"] and r["quantized_linears"] == 2 * 4 * 10
    for run in r["runs"].values():
        fit3, fit4 = run["steps_3"], run["steps_4"]
        assert len(fit3["step_marks"]) == 3 and len(fit3["step_seconds"]) == 2 and len(fit4["step_seconds"]) == 3
        assert run["projected_s"] == run["overhead_s"] + 40 * run["step_s"]
        assert run["check"]["measured_s"] == fit4["seconds"]
        assert abs(run["check"]["predicted_s"] - (run["overhead_s"] + 4 * run["step_s"])) < 1e-9
    assert r["w4a4_vs_bf16"] == r["runs"]["w4a4"]["projected_s"] / r["runs"]["bf16"]["projected_s"]
    assert len(saved) >= 4  # written after every video
    md = "\n".join(video_markdown(r))
    assert "| w4a4 |" in md and "955.1" in md


def test_whole_video_runs_a_quantized_attention_precision_on_the_already_quantized_experts(monkeypatch):
    """"w4a4+attn_<name>": the same quantized experts (quantized once), every SDPA call under AttentionMode."""
    from wanexp.quant import attention as attn
    calls = []
    real = attn.attention
    monkeypatch.setattr(attn, "attention", lambda config, *a, **k: calls.append(config.name) or real(config, *a, **k))
    cfg = {"arch": "tiny", "height": 32, "width": 32, "frames": 5, "compile": False, "warmup_steps": 1,
           "fit_steps": 2, "check": [], "paper_steps": 40, "rank": 4, "precisions": ["w4a4", "w4a4+attn_int8_sage"]}
    r = run_whole_video(cfg, torch.device("cpu"), log=lambda m: None)
    assert list(r["runs"]) == ["w4a4", "w4a4+attn_int8_sage"] and r["quantized_linears"] == 2 * 4 * 10
    assert calls and set(calls) == {"int8_sage"}   # only the second precision's calls, each quantized
    assert "| w4a4+attn_int8_sage |" in "\n".join(video_markdown(r))


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
           "paths": ["bf16", "reference", "fused"], "extra_formats": ["mxfp4", "int4", "nvfp4"],
           "extra_format_paths": {"int4": ["fused", "fused_cublas"], "nvfp4": ["fused"]},
           "quant": {"rank": 4}, "profile": {"enabled": False}}
    r = run_bench(cfg, tmp_path, log=log)
    e = r["resolutions"]["tiny"]
    assert r["paths"] == ["bf16", "reference", "fused", "fused_int4", "fused_int4_cublas", "fused_nvfp4"]  # mxfp4: own
    assert all(e[p]["time_ratio"] == e[p]["seconds"] / e["bf16"]["seconds"] for p in r["paths"][1:])
    assert r["bytes_by_path"]["fused_int4"] < r["bytes_bf16"] and r["targeted_linears"] == 10
    assert 0 < e["fused_int4_vs_bf16_rel_err"] < 1 and e["fused_vs_reference_rel_err"] == 0  # no GPU: one path
    assert max(seen) >= 3 and json.loads((tmp_path / "smoke.json").read_text())["paths"] == r["paths"]
    assert "W4A4 INT4 fused (Triton act-quant; GEMM auto" in to_markdown(r)
    assert "W4A4 INT4 fused (Triton act-quant; upcast weight + cuBLAS)" in to_markdown(r)


def test_forward_bench_rejects_an_unknown_path_before_building_anything(tmp_path):
    from wanexp.bench.core import run_bench
    with pytest.raises(ValueError, match=r"bench.paths: unknown \['fused_fp9'\]"):
        run_bench({"device": "cpu", "paths": ["bf16", "fused_fp9"], "resolutions": []}, tmp_path)
    assert not any(tmp_path.iterdir())
