"""The seed paper code's recipe (issue 15): its bins, its 15-candidate TS-clip search, its layer set,
its GPTQ Hessian input, its inference (freeze_condition_latent) and the presets that set them all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.formats import get_format
from wanexp.quant.clip_search import OutputErrorSearch, candidates, evenly_spaced_rows, ratio
from wanexp.quant.context import TimestepBins, TimestepContext, step_bin, step_fraction_bins
from wanexp.quant.linear import QuantLinear

CONF = Path(__file__).resolve().parents[1] / "conf"
CUTS = {"high_noise": [0.33, 0.66], "low_noise": [0.2, 0.7]}


def compose(*overrides: str, hydra_cfg: bool = False):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


# ----------------------------------------------------------------------------- bins


def a14b_timesteps(steps: int) -> list[float]:
    """The A14B's (and the tiny model's) scheduler: UniPC, flow sigmas, shift 5."""
    from diffusers import UniPCMultistepScheduler
    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                flow_shift=5.0)
    s.set_timesteps(steps)
    return [float(t) for t in s.timesteps]


def test_step_fraction_bins_for_40_steps():
    ts = a14b_timesteps(40)
    high = [t for t in ts if t >= 900]  # the I2V boundary: 0.9 of 1000 training timesteps
    low = [t for t in ts if t < 900]
    assert (len(high), len(low)) == (15, 25) and high[-1] >= 900 > low[0]  # the expert boundary, as the pipeline switches
    bins = step_fraction_bins(ts, 900.0, CUTS)
    # high-noise: i / 15 < 0.33 for i <= 4, < 0.66 for i <= 9: 5 + 5 + 5 steps
    assert [bins["high_noise"].bin_of(t) for t in high] == [0] * 5 + [1] * 5 + [2] * 5
    # low-noise: step 5 of 25 is exactly at the cut 0.2 and opens bin 1 (the code's `r < 0.2`); 17/25 = 0.68
    # is still below 0.7, 18/25 = 0.72 is not: 5 + 13 + 7 steps
    assert [bins["low_noise"].bin_of(t) for t in low] == [0] * 5 + [1] * 13 + [2] * 7
    # the edges sit halfway between the neighbouring steps of two bins
    assert bins["high_noise"].edges == ((high[9] + high[10]) / 2, (high[4] + high[5]) / 2) == (941.0, 975.0)
    assert bins["low_noise"].edges == ((low[17] + low[18]) / 2, (low[4] + low[5]) / 2) == (536.0, 840.0)


def test_step_bin_at_the_cuts_and_an_empty_bin():
    assert [step_bin(i, 100, [0.33, 0.66]) for i in (32, 33, 65, 66)] == [0, 1, 1, 2]
    assert [step_bin(i, 25, [0.2, 0.7]) for i in (4, 5)] == [0, 1]
    # two high-noise steps (4 steps in all): bin 2 is empty and no timestep of the expert falls into it
    ts = a14b_timesteps(4)
    bins = step_fraction_bins(ts, 900.0, CUTS)["high_noise"]
    assert [bins.bin_of(t) for t in ts if t >= 900] == [0, 1] and bins.num_bins == 3
    with pytest.raises(ValueError, match="ascending"):
        step_fraction_bins(ts, 900.0, {"high_noise": [0.66, 0.33], "low_noise": [0.2]})


# ----------------------------------------------------------------------------- the search


def paper_qdq(x: torch.Tensor, clip: float, shift: int) -> torch.Tensor:
    """The seed paper code's MXFP4 activation quantize-dequantize, restated in torch: block 32,
    e = ceil(log2(clip * amax / 6)) + shift, elements clamped to +-6 and bucketed against the E2M1
    midpoints with a midpoint in the lower bucket (ties toward zero)."""
    xg = x.float().reshape(-1, x.shape[-1] // 32, 32)
    amax = xg.abs().amax(-1) * clip
    zero = amax == 0
    e = torch.ceil(torch.log2(torch.where(zero, torch.ones_like(amax), amax) / 6.0)) + shift
    e = torch.where(zero, torch.zeros_like(e), e).clamp(-127, 127)
    scale = torch.pow(2.0, e).unsqueeze(-1)
    y = (xg / scale).clamp(-6, 6)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    q = grid[torch.bucketize(y.abs(), mids, right=False)] * torch.sign(y)
    return (q * scale).reshape(x.shape)


def paper_layer(seed: int = 0) -> tuple[QuantLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 128 → 48 QuantLinear in fp32 with smoothing, a low-rank branch and a bias, MXFP4 as the paper code
    quantizes it; returns (layer, dense residual, smoothing, bias)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=g) * 0.1
    s = torch.rand(128, generator=g) + 0.5
    bias = torch.randn(48, generator=g)
    wfmt = get_format("mxfp4", ties="toward_zero")
    layer = QuantLinear(128, 48, weight=wfmt.encode(w), bias=bias, smooth=s, compute_dtype=torch.float32,
                        lowrank=(torch.randn(48, 4, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1),
                        act_format={"name": "mxfp4", "opts": {"scale_rule": "ceil", "ties": "toward_zero"}})
    return layer, wfmt.quantize_dequantize(w), s, bias


def test_shifted_ratio_reproduces_the_paper_code_activation_quantizer():
    g = torch.Generator().manual_seed(1)
    smooth = torch.randn(32, 256, generator=g) * torch.rand(256, generator=g) * 8
    # multiples of 1/8 at a few scales: many elements land exactly on E2M1 midpoints (0.75, 1.75, 3.5)
    grid = torch.randint(-48, 49, (32, 256), generator=g) / 8 * 2.0 ** torch.randint(-3, 4, (32, 1), generator=g)
    x = torch.cat([smooth, grid])
    fmt = get_format("mxfp4", scale_rule="ceil", ties="toward_zero")
    assert len(candidates([0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1])) == 15
    for c in candidates([0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1]):
        assert torch.equal(fmt.quantize_dequantize(x, clip_ratio=ratio(c)), paper_qdq(x, *c)), c
    # ... and those ties are where ties-to-even would differ
    even = get_format("mxfp4", scale_rule="ceil").quantize_dequantize(x)
    assert (even != paper_qdq(x, 1.0, 0)).sum() > 100


def test_fifteen_candidate_search_picks_the_brute_force_argmin():
    layer, wq, s, bias = paper_layer()
    layer.context = TimestepContext(bins=TimestepBins((500.0,)))
    g = torch.Generator().manual_seed(2)
    calls = [(900.0, torch.randn(2, 40, 128, generator=g) * 3), (700.0, torch.randn(1, 30, 128, generator=g) * 5),
             (100.0, torch.randn(3, 16, 128, generator=g)), (200.0, torch.randn(50, 128, generator=g) * 2)]
    search = OutputErrorSearch({"l": layer}, [0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1], max_rows=64)
    search.attach()
    for t, x in calls:
        layer.context.set_timestep(t)
        layer(x)
    search.remove()
    assert dict(search.calls) == {("l", 0): 2, ("l", 1): 2}
    # brute force, independently: the paper code's quantizer, fp32 GEMMs on the evenly spaced rows
    cands = candidates([0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1])
    picks = search.choose()["l"]
    for b, group in ((0, calls[:2]), (1, calls[2:])):
        num, den = torch.zeros(15, dtype=torch.float64), 0.0
        for _, x in group:
            rows = x.reshape(-1, 128)
            rows = rows[torch.linspace(0, rows.shape[0] - 1, 64).round().long()] if rows.shape[0] > 64 else rows
            xs = rows / s
            ref = xs @ wq.T + bias
            den += float((ref + xs @ layer.lowrank_down.T @ layer.lowrank_up.T).square().sum(dtype=torch.float64))
            for i, c in enumerate(cands):
                num[i] += float((paper_qdq(xs, *c) @ wq.T + bias - ref).square().sum(dtype=torch.float64))
        err = num / den
        best = int(torch.argmin(err))
        assert err.unique().numel() > 5  # the candidates do differ
        assert picks[b][:2] == cands[best] and picks[b][2] == pytest.approx(float(err[best]), rel=1e-4)
        assert torch.allclose(search.errors("l", b), err, rtol=1e-4)
    report = search.apply(num_bins=2)["l"]
    assert layer.clip_table.tolist() == pytest.approx([ratio(picks[0][:2]), ratio(picks[1][:2])])
    assert report["clip_candidate"] == [list(picks[0][:2]), list(picks[1][:2])]


def test_calib_token_search_with_shifts_and_the_relative_metric():
    # the same knobs on wanexp's own search data (each bin's calibration tokens): argmin per bin
    from wanexp.quant.methods import LayerStats, MethodConfig
    g = torch.Generator().manual_seed(5)
    linear = nn.Linear(96, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 96, generator=g) * 0.1)
    act = {"name": "mxfp4", "opts": {"scale_rule": "ceil", "ties": "toward_zero"}}
    method = MethodConfig("tsclip", {"name": "mxfp4", "opts": {"ties": "toward_zero"}}, act, clip_search=True,
                          exp_shifts=[-1, 0, 1], clip_metric="wq_output_rel", num_bins=2, compute_dtype=torch.float32)
    tokens = {0: torch.randn(40, 96, generator=g) * 4, 1: torch.randn(40, 96, generator=g) ** 3}
    method.stats = {"l": LayerStats(tokens=tokens)}
    layer = method.build("l", linear)
    wq = get_format("mxfp4", ties="toward_zero").quantize_dequantize(linear.weight.detach().float())
    cands = candidates([0.6, 0.7, 0.8, 0.9, 1.0], [-1, 0, 1])
    for b, x in tokens.items():
        ref = x @ wq.T
        err = torch.stack([(paper_qdq(x, *c) @ wq.T - ref).square().sum() for c in cands])
        assert layer.clip_table[b].item() == pytest.approx(ratio(cands[int(torch.argmin(err))]))
    assert method.report["l"]["clip"] == [round(float(r), 6) for r in layer.clip_table]


def test_evenly_spaced_rows_follow_the_code_linspace():
    x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    assert evenly_spaced_rows(x, 4)[:, 0].tolist() == [0.0, 9.0, 18.0, 27.0]  # rows 0, 3, 6, 9
    assert evenly_spaced_rows(x, 100).shape == (10, 3)


# ----------------------------------------------------------------------------- the preset


def test_the_preset_sets_every_knob_and_leaves_attn2_unclipped(tiny_pipe):
    from omegaconf import OmegaConf
    from wanexp.quant.methods import MethodConfig, method_config
    from wanexp.quant.targets import targeted_linears
    cfg = compose("quant=tsclip_paper_code", "format=mxfp4_paper_code")
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    assert (q["name"], q["rank"], q["alpha"], q["bins"], q["exp_shifts"]) == ("tsclip", 16, 0.5, 3, [-1, 0, 1])
    assert q["gptq"]["static_groups"] and q["hessian_input"] == "smoothed_act_quant" and q["freeze_condition_latent"]
    assert q["calib_generation"] == {"height": 480, "width": 832, "guidance_scale": 1.0}
    assert (q["search_rows"], q["search_samples"], q["clip_metric"]) == (4096, 1, "wq_output_rel")
    assert OmegaConf.to_container(cfg.format) == {"name": "mxfp4", "weight": {"scale_rule": "floor", "ties": "toward_zero"},
                                                  "act": {"scale_rule": "ceil", "ties": "toward_zero"}}
    assert MethodConfig.needs(q) == ["absmax", "hessian", "tokens"] and MethodConfig.second_pass(q)
    method = method_config(q, OmegaConf.to_container(cfg.format), num_bins=3)
    names = targeted_linears(tiny_pipe.transformer)
    searched = [n for n in names if method.searches(n)]
    assert searched == [n for n in names if ".attn2." not in n] and len(searched) == 4 * 6
    # a cross-attention layer keeps ρ = 1 in every bin, whatever its tokens say
    lin = tiny_pipe.transformer.get_submodule("blocks.1.attn2.to_out.0")
    layer = QuantLinear(lin.in_features, lin.out_features, weight=method._wfmt().encode(lin.weight.float()),
                        bias=None, act_format=method.act_format)
    from wanexp.quant.methods import LayerStats
    stats = LayerStats(tokens={b: torch.randn(8, lin.in_features) * 50 for b in range(3)})
    assert method._clip_table("blocks.1.attn2.to_out.0", layer, lin.weight.float(), stats).tolist() == [1.0] * 3
    assert layer.clip_table.tolist() == [1.0] * 3


def test_paper_table1_switches_between_the_two_recipes():
    from omegaconf import OmegaConf
    paper = compose("+experiment=paper_table1", hydra_cfg=True)
    own = compose("+experiment=paper_table1", "recipe=wanexp", hydra_cfg=True)
    ladder = lambda c: OmegaConf.to_container(c.hydra.sweeper.params, resolve=True)  # noqa: E731
    assert ladder(paper) == {"quant": "bf16_paper_code,rtn_paper_code,svdquant_rtn_paper_code,svdquant_gptq_paper_code,"
                                      "tsclip_paper_code,tsclip_keep_sensitive_paper_code", "format": "mxfp4_paper_code"}
    assert ladder(own) == {"quant": "bf16,rtn,svdquant_rtn,svdquant_gptq,tsclip,tsclip_keep_sensitive",
                           "format": "mxfp4_ceil"}


def test_bad_recipe_knobs_are_refused_before_loading():
    from omegaconf import OmegaConf
    from wanexp.quant.methods import validate_quant_cfg
    q = OmegaConf.to_container(compose("quant=tsclip_paper_code").quant, resolve=True)
    gen = ["height", "width", "guidance_scale", "num_inference_steps"]
    validate_quant_cfg(q, gen)
    bad = [({"exp_shifts": [0.5]}, "exp_shifts"), ({"clip_metric": "bf16_output"}, "wq_output_rel"),
           ({"bin_fractions": {"high_noise": [0.5], "low_noise": [0.2, 0.7]}}, "high_noise"),
           ({"bin_edges": {"high_noise": [950]}}, "both place"), ({"calib_generation": {"heigth": 1}}, "heigth"),
           ({"clip_search_data": "tokens"}, "clip_search_data"), ({"smoothing": None}, "smoothing")]
    for change, match in bad:
        with pytest.raises(WanexpError, match=match):
            validate_quant_cfg({**q, **change}, gen)


# ----------------------------------------------------------------------------- calibration: the Hessian input


def test_hessian_of_the_smoothed_act_quantized_inputs():
    from wanexp.calib.collect import ALL_BINS, ActivationCollector, CalibStats
    from wanexp.quant.methods import LayerStats, MethodConfig
    from wanexp.quant.smooth import smoothquant_scales
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 64, generator=g) * 0.2)
    x = (torch.randn(2, 40, 64, generator=g) * torch.rand(64, generator=g) * 10).bfloat16()
    act = {"name": "mxfp4", "opts": {"scale_rule": "ceil", "ties": "toward_zero"}}
    method = MethodConfig("svdquant_gptq", {"name": "mxfp4", "opts": {}}, act, smoothing="max", alpha=0.5,
                          residual="gptq", hessian_input="smoothed_act_quant")
    absmax = x.float().abs().reshape(-1, 64).amax(0)
    fn = method.hessian_input_fn(model[0], LayerStats(absmax=absmax))
    stats = CalibStats()
    collector = ActivationCollector("high_noise", model, ["0"], TimestepContext(), ["hessian"], stats,
                                    hessian_input={"0": fn})
    with torch.no_grad():
        model(x.float())
    collector.remove()
    s = smoothquant_scales(absmax, model[0].weight, 0.5)
    xq = get_format("mxfp4", **act["opts"]).quantize_dequantize((x.float() / s).bfloat16()).float().reshape(-1, 64)
    assert torch.equal(stats.get("high_noise", "0", ALL_BINS)["hessian"], xq.T @ xq)
    assert not torch.allclose(xq.T @ xq, (x.float() / s).reshape(-1, 64).T @ (x.float() / s).reshape(-1, 64), rtol=1e-3)


# ----------------------------------------------------------------------------- inference


def test_freeze_condition_latent_resets_only_the_first_frame(tiny_pipe, cache_dir):
    from wanexp.data import load_splits
    from wanexp.generate import generate_one
    sample = load_splits({"name": "tiny", "root": None, "files": None, "split_seed": 0, "image_condition": "reference",
                          "calib": {"num_samples": 1}, "eval": {"num_samples": 1}}, cache_dir).calib[0]
    gen = {"height": 64, "width": 64, "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 3.5,
           "max_sequence_length": 64}
    plain, _ = generate_one(tiny_pipe, sample, gen, 7, decode=False)
    frozen, _ = generate_one(tiny_pipe, sample, {**gen, "freeze_condition_latent": True}, 7, decode=False)
    assert torch.equal(frozen[:, :, 1:], plain[:, :, 1:])  # the trajectory is the same; only the end differs
    # frame 0 is the image's VAE latent, normalised as the pipeline normalises its condition
    vae = tiny_pipe.vae
    image = tiny_pipe.video_processor.preprocess(sample.load_image().resize((64, 64)), height=64, width=64)
    video = torch.cat([image.unsqueeze(2), torch.zeros(1, 3, 4, 64, 64)], dim=2).to(vae.dtype)
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()[:, :, 0].float()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert torch.allclose(frozen[:, :, 0], (z - mean) / std, atol=1e-5)
    assert not torch.allclose(plain[:, :, 0], frozen[:, :, 0], atol=1e-2)
    assert "prepare_latents" not in tiny_pipe.__dict__  # the pipeline is left as it was
