"""Calibration's GPU memory at A14B size (issue 13), on the CPU: the collector's per-channel
statistics read their input in row chunks with the results of the unchunked code, and the
calibration placement (``model.calib.offload``) changes where weights live, not what is recorded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from wanexp.calib import ActivationCollector, CalibStats
from wanexp.calib.collect import ALL_BINS, StepTrace, absmax_rows, observe_transient_bytes, sumsq_rows
from wanexp.quant.context import TimestepBins, TimestepContext

REPO = Path(__file__).resolve().parents[1]


def test_chunked_absmax_and_sumsq_equal_the_whole_input_formulas():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 24, generator=g) * torch.logspace(-2, 2, 24)).to(torch.bfloat16)
    x[17, 3] = -40.0  # the max |x| from a negative value
    whole_amax = x.abs().amax(dim=0).float()
    whole_sumsq = x.float().square().sum(dim=0).double()  # the collector's formula before chunking
    for chunk in (1, 7, 256, 1000, 4096):
        assert torch.equal(absmax_rows(x, chunk), whole_amax), chunk
    assert torch.equal(sumsq_rows(x, 1000), whole_sumsq) and torch.equal(sumsq_rows(x, 4096), whole_sumsq)
    exact = x.double().square().sum(dim=0)
    for chunk in (1, 7, 256):  # only the fp32 summation order changes: within fp32 rounding of the exact sum
        torch.testing.assert_close(sumsq_rows(x, chunk), exact, rtol=2e-6, atol=0)
    assert float(absmax_rows(x, 7)[3]) == 40.0
    # an fp32 input is not squared in place
    xf = x.float()
    before = xf.clone()
    sumsq_rows(xf, 7)
    assert torch.equal(xf, before)
    # NaN still reaches the maximum (the collector's non-finite check reads it)
    bad = x.clone()
    bad[999, 5] = float("nan")
    assert torch.isnan(absmax_rows(bad, 7)[5]) and not torch.isnan(absmax_rows(bad, 7)[4])


def test_the_step_trace_of_a_bf16_input_equals_that_of_its_fp32_copy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 40, generator=g).to(torch.bfloat16)
    a, b = StepTrace(99.0, max_tokens=512, chunk=16), StepTrace(99.0, max_tokens=512, chunk=16)
    a.observe(500.0, x)
    b.observe(500.0, x.float())
    ta, tb = a.tensors(), b.tensors()
    for key in ("absmax", "pct", "count", "timestep"):
        assert torch.equal(ta[key], tb[key]), key


def test_the_transient_bound_at_a14b_size():
    # ffn.net.2 at 720x1280x61: 57,600 tokens a forward (the CFG passes are separate forwards), 13,824 channels
    rows, channels = 57_600, 13_824
    assert observe_transient_bytes(rows, channels) == 8192 * channels * 4 + rows * 25  # 0.454 GB
    before = rows * channels * 4 * 2  # x.float() and its square, both alive: 6.37 GB
    assert before / observe_transient_bytes(rows, channels) > 14


@pytest.fixture
def collect(collect_block0, tiny_expert):
    def run(chunk_rows: int):
        return collect_block0(tiny_expert, ("absmax", "sumsq", "hessian", "tokens"), (900.0, 300.0, 300.0),
                              trace_layers=["blocks.0.ffn.net.2", "blocks.0.attn1.to_k"], trace_tokens=64,
                              chunk_rows=chunk_rows)
    return run


def test_the_collector_records_the_same_statistics_in_chunks_of_5_rows(collect):
    chunked, layers = collect(chunk_rows=5)   # 32 tokens a forward: 7 chunks
    whole, _ = collect(chunk_rows=1 << 30)
    for layer in layers:
        for b in (ALL_BINS, 0, 1):
            c, w = chunked.get("high_noise", layer, b), whole.get("high_noise", layer, b)
            assert c.keys() == w.keys()
            for key in c:
                if key == "sumsq":
                    torch.testing.assert_close(c[key], w[key], rtol=2e-6, atol=0)
                else:
                    assert torch.equal(c[key], w[key]), (layer, b, key)
    assert chunked.trace.keys() == whole.trace.keys() and len(chunked.trace) == 2
    for k in chunked.trace:
        tc, tw = chunked.trace[k].tensors(), whole.trace[k].tensors()
        assert all(torch.equal(tc[s], tw[s]) for s in tc), k
    with pytest.raises(ValueError, match="chunk_rows"):
        collect(chunk_rows=0)


def test_the_skipped_expert_still_offloads_the_component_before_it():
    """Under offload=model the high-noise expert's hook moves the text encoder off the GPU; in the
    low-noise pass that expert is a stand-in, which must do the same."""
    from wanexp.calib.trajectory import _skipped

    class Previous:
        offloads = 0

        def offload(self):
            self.offloads += 1

    class Hook:
        prev_module_hook = Previous()

    class Expert(torch.nn.Module):
        class config:
            out_channels = 2

        def forward(self, hidden_states, **kwargs):
            raise AssertionError("the skipped expert ran")

    module = Expert()
    module._hf_hook = Hook()
    with _skipped(module):
        out = module(torch.ones(1, 5, 3), return_dict=False)[0]
    assert Hook.prev_module_hook.offloads == 1 and out.shape == (1, 2, 3) and not out.any()
    plain = Expert()  # no accelerate hook (offload=none): the stand-in alone
    with _skipped(plain):
        assert plain(torch.ones(1, 5, 3)).sample.shape == (1, 2, 3)


def _pipe_stats(pipe, steps=2):
    from PIL import Image
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    stats = CalibStats()
    layers = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n]
    col = ActivationCollector("high_noise", pipe.transformer, layers, ctx, ["absmax", "sumsq", "hessian", "tokens"],
                              stats, max_tokens=8)
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: ctx.set_timestep(float(kw["timestep"].flatten()[0])), with_kwargs=True)
    try:
        pipe(image=Image.new("RGB", (32, 32), (90, 30, 200)), prompt="a cat", height=32, width=32, num_frames=5,
             num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
        col.remove()
    return stats, layers


def test_group_offloaded_calibration_records_what_the_placed_pipeline_records(tiny_pipe):
    from wanexp.models.offload import calib_offload_of, calibration_placement, group_offloaded
    from omegaconf import OmegaConf

    pipe = copy.deepcopy(tiny_pipe)
    plain, layers = _pipe_stats(pipe)
    with calibration_placement(pipe, "group", torch.device("cpu"), "none"):
        # diffusers' hooks on each expert's blocks and on the text encoder; the VAE is left alone
        for module in (pipe.transformer, pipe.transformer_2):
            assert group_offloaded(module)
            assert all(b._diffusers_hook.get_hook("group_offloading") is not None for b in module.blocks)
        assert group_offloaded(pipe.text_encoder) and not group_offloaded(pipe.vae)
        grouped, _ = _pipe_stats(pipe)
    assert not any(group_offloaded(m) for m in (pipe.transformer, pipe.transformer_2, pipe.text_encoder))
    again, _ = _pipe_stats(pipe)  # placed again: the later stages run as before
    for layer in layers:
        for b in (ALL_BINS, 0, 1):
            p = plain.get("high_noise", layer, b)
            for other in (grouped, again):
                o = other.get("high_noise", layer, b)
                assert p.keys() == o.keys() and all(torch.equal(p[k], o[k]) for k in p), (layer, b)
    assert "hessian" in plain.get("high_noise", layers[0], ALL_BINS)
    # the setting: parsed from model.calib, refused when unknown
    cfg = OmegaConf.create({"model": {"calib": {"offload": "group"}}})
    assert calib_offload_of(cfg) == "group" and calib_offload_of(OmegaConf.create({"model": {}})) == "pipeline"
    from wanexp.errors import WanexpError
    with pytest.raises(WanexpError, match="model.calib.offload"):
        calib_offload_of(OmegaConf.create({"model": {"calib": {"offload": "layer"}}}))
    from hydra import compose, initialize_config_dir

    from wanexp.run import validate
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        good = compose("config", overrides=["model=a14b_random", "model.calib.offload=group"])
        bad = compose("config", overrides=["model=a14b_random", "model.calib.offload=layer"])
    validate(good)
    with pytest.raises(WanexpError, match="model.calib.offload"):  # before any model is built
        validate(bad)


def _result(name, L, gpu, host, fit=True, **setting):
    step = 0.06 + 0.46 * L
    marks = [[0.0, 18.0, 18.0 + step, 18.0 + 2 * step, 20.0 + 2 * step]]
    out = {"setting": {"name": name, "num_layers": L, "steps": 4, "samples": 1, "fit": fit, **setting},
           "calibrate": {"seconds": 100.0, "gpu_peak_bytes": gpu, "host_peak_bytes": host, "bytes_written": 10**9},
           "calibrate_info": {"step_times": {"high_noise/0": marks, "low_noise/0": marks}}}
    if fit:
        out["bf16_video"] = {"video_seconds": 37.0, "step_s": 0.3 + 0.5 * L, "overhead_s": 31.0}
    return out


def test_the_bench_projects_memory_from_the_default_path_settings_and_checks_the_gpu_peak():
    from wanexp.bench.calib import GB, project, to_markdown
    results = [_result("L1", 1, 6 * 10**9, 19 * 10**9), _result("L2", 2, 7.5 * 10**9, 20.4 * 10**9),
               _result("L4_check", 4, 10.4 * 10**9, 30 * 10**9, fit=False, store_hessians=True)]
    p = project(results, {"num_layers": 40, "steps": 40, "samples": 16})
    assert p["memory_base_setting"] == "L2"
    assert p["gpu_peak_per_block_bytes"] == pytest.approx(1.5e9) and p["host_peak_per_block_bytes"] == pytest.approx(1.4e9)
    assert p["calibrate_gpu_peak_bytes"] == pytest.approx(7.5e9 + 38 * 1.5e9)  # 64.5 GB
    assert p["calibrate_host_peak_bytes"] == pytest.approx(20.4e9 + 38 * 1.4e9)
    assert p["memory_checks"]["L4_check"]["predicted_gpu_bytes"] == pytest.approx(10.5e9)
    md = to_markdown({"gpu": "cpu", "date": "d", "torch": "t", "diffusers": "x", "overrides": [], "settings": results,
                      "projection": p}, {"paper": {"num_layers": 40, "steps": 40, "samples": 16}})
    assert "GPU peak = 7.5 GB at 2 blocks (L2) + (L − 2) × 1.500 GB a block" in md
    assert f"{p['calibrate_gpu_peak_bytes'] / GB:.1f} GB | ≤ 75 GB" in md and "| 4 | 6 |" not in md


def test_the_calibration_bench_configs_compose():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "bench_conf"), version_base=None):
        main = compose("bench", overrides=["bench=calib_a14b"])
        group = compose("bench", overrides=["bench=calib_a14b_group"])
    names = [s.name for s in main.bench.calib.settings]
    assert names == ["L1", "L2", "L4_check"] and not any(s.get("store_hessians") for s in main.bench.calib.settings if s.fit)
    assert [s.get("calib_offload") for s in group.bench.calib.settings] == [None, None, "group"]
    assert group.bench.calib.overrides == main.bench.calib.overrides


def test_calibrates_gpu_peak_is_split_by_phase_and_each_phase_grows_by_its_own_slope():
    """At few blocks the encoders' phase (UMT5-XXL on the GPU) is the stage's peak, so one slope over the
    stage's peak would see only the Hessians grow; by phase, the denoising steps' slope (weights and
    Hessians) takes over at 40 blocks."""
    from wanexp.bench.calib import gpu_phases, project, to_markdown
    assert gpu_phases({"a/0": [[12, 5, 6]], "b/0": [[13, 7]]}, 4) == {"encode": 13, "denoise": 7, "after": 4}
    assert gpu_phases({}, 9) == {"encode": 0, "denoise": 0, "after": 9}
    results = []
    for L in (1, 2):
        r = _result(f"L{L}", L, 0, 20 * 10**9)
        r["calibrate"]["gpu_phases"] = {"encode": (12 + 0.77 * L) * 10**9, "denoise": (5 + 1.47 * L) * 10**9,
                                        "after": (3 + 0.8 * L) * 10**9}
        r["calibrate"]["gpu_peak_bytes"] = max(r["calibrate"]["gpu_phases"].values())
        results.append(r)
    p = project(results, {"num_layers": 40, "steps": 40, "samples": 16})
    assert p["gpu_peak_per_block_bytes"] == pytest.approx(0.77e9)  # the stage's peak alone: the encoders' slope
    phases = p["gpu_peak_by_phase"]
    assert phases["denoise"]["per_block_bytes"] == pytest.approx(1.47e9)
    assert p["calibrate_gpu_peak_bytes"] == pytest.approx((5 + 1.47 * 40) * 1e9)  # 63.8 GB, not 12 + 0.77·40
    md = to_markdown({"gpu": "cpu", "date": "d", "torch": "t", "diffusers": "x", "overrides": [], "settings": results,
                      "projection": p}, {"paper": {"num_layers": 40, "steps": 40, "samples": 16}})
    assert "denoise 7.9 GB at 2 blocks + (L − 2) × 1.470 GB → 63.8 GB" in md
