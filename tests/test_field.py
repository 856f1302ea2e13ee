"""The field's recipes (issue 18, item 2): each one's defining behaviour, in numbers.

SmoothQuant W8A8 INT8, FP8 W8A8 with dynamic per-token scales, AWQ W4A16 and the ViDiT-Q-style
timestep-aware balancing are ``quant=`` configs on the common MethodConfig; the tests compose them as
a run would and check the arithmetic against formulas written out here, independently of the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from wanexp.errors import WanexpError
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.methods import LayerStats, MethodConfig, layer_error, method_config, validate_quant_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
F32 = torch.float32


def _compose(*overrides: str) -> tuple[dict, dict]:
    """The run's ``quant`` and ``format`` sections as Hydra composes them."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.quant, resolve=True), OmegaConf.to_container(cfg.format, resolve=True)


def _recipe(name: str, stats: dict | None = None, bins: int | None = None, **extra) -> MethodConfig:
    quant, fmt = _compose(f"quant={name}", *(f"quant.{k}={v}" for k, v in extra.items()))
    method = method_config(quant, fmt, bins or int(quant.get("bins", 1)), compute_dtype=F32)
    method.stats = stats or {}
    return method


def _planted(seed=0, n=512, d_in=256, d_out=64, outliers=(5, 70, 200), gain=40.0):
    """A linear layer and calibration tokens with a few outlier input channels (what smoothing is for)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
    x = torch.randn(n, d_in, generator=g)
    x[:, list(outliers)] *= gain
    return lin, x


def _int_per_row(v: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric integer quantize-dequantize with one bf16-stored scale per row, written out."""
    scale = (v.abs().amax(-1, keepdim=True) / qmax).to(torch.bfloat16).float()
    return torch.where(scale > 0, (v / scale).round().clamp(-qmax, qmax) * scale, torch.zeros_like(v))


def _fp8_per_row(v: torch.Tensor) -> torch.Tensor:
    scale = v.abs().amax(-1, keepdim=True) / 448.0
    return (v / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------
def test_each_recipe_brings_its_format_and_still_composes_with_others():
    expect = {"smoothquant": ("int8", -1, True), "fp8_dynamic": ("fp8_e4m3", None, True),
              "awq": ("int4", 128, False), "viditq": ("mxfp4", None, True)}
    for name, (fmt_name, group, acts) in expect.items():
        quant, fmt = _compose(f"quant={name}")
        assert (quant["name"], fmt["name"], fmt["weight"].get("group_size"), quant["activations"]) == \
            (name, fmt_name, group, acts)
    assert _compose("quant=smoothquant", "format=int4")[1]["name"] == "int4"    # the command line wins
    assert _compose("quant=awq", "format=nvfp4")[1]["name"] == "nvfp4"
    assert _compose("quant=rtn")[1]["name"] == "mxfp4"                           # the default is untouched
    assert _compose("quant=viditq", "expert=shared")[0]["smoothing_per_bin"] is True
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        sweep = compose("config", overrides=["+ablation=field"], return_hydra_config=True)
    runs = str(sweep.hydra.sweeper.params.quant).split(",")
    assert runs == ["bf16", "rtn", "tsclip", "smoothquant", "fp8_dynamic", "awq", "viditq"]
    assert sweep.report.bootstrap.baseline == "rtn"


def test_the_runner_knows_the_recipes_and_refuses_per_bin_smoothing_it_cannot_store():
    from wanexp.quant.recipes import method_names as registered
    METHODS = registered()
    assert {"smoothquant", "fp8_dynamic", "awq", "viditq"} <= set(METHODS)
    assert MethodConfig.needs(_compose("quant=fp8_dynamic")[0]) == []       # dynamic scales: no calibration
    assert MethodConfig.needs(_compose("quant=awq")[0]) == ["absmax", "tokens"]
    quant = _compose("quant=viditq")[0]
    validate_quant_cfg(quant)
    with pytest.raises(WanexpError, match="residual=rtn and quant.rank=0"):
        validate_quant_cfg(dict(quant, residual="gptq"))
    with pytest.raises(WanexpError, match="needs a smoothing statistic"):
        validate_quant_cfg(dict(quant, smoothing=None))


# ---------------------------------------------------------------------------------------------
# SmoothQuant W8A8 INT8
# ---------------------------------------------------------------------------------------------
def test_smoothquant_scales_are_the_formula_and_int8_runs_per_channel_and_per_token():
    lin, x = _planted()
    amax = x.abs().amax(0)
    method = _recipe("smoothquant", {"l": LayerStats(absmax=amax, tokens={0: x})})
    layer = method.build("l", lin)
    w = lin.weight.detach()
    s = amax.sqrt() / w.abs().amax(0).sqrt()                       # s_j = a_j^0.5 / max_o|W_oj|^0.5
    torch.testing.assert_close(layer.smooth, s, rtol=1e-6, atol=0)
    assert method.report["l"]["alpha"] == 0.5
    # weights: one scale per output channel; the stored weight is INT8 RTN of W·diag(s), row by row
    assert layer.wq_scales.shape[0] == w.shape[0] and layer.wq_scales.numel() == w.shape[0]
    torch.testing.assert_close(layer.dequantized_weight(), _int_per_row(w * s, 127), rtol=0, atol=0)
    # activations: x/s quantized with one scale per token, computed at the call
    xt = x[:16]
    want = _int_per_row(xt / s, 127) @ _int_per_row(w * s, 127).T + lin.bias.detach()
    torch.testing.assert_close(layer(xt), want, rtol=1e-5, atol=1e-5)
    # the outliers moved: α = 0.5 takes about the square root of the channel spread (44x here)
    spread = lambda v: float(v.abs().amax(0).max() / v.abs().amax(0).median())  # noqa: E731
    assert spread(x / s) < spread(x) / 4
    # and it beats INT8 without smoothing on this layer (per-token INT8 cannot hold 40x outliers)
    plain = _recipe("smoothquant", {"l": LayerStats(absmax=amax, tokens={0: x})}, smoothing="null")
    err_plain = layer_error(plain.build("l", lin), x, w)
    assert layer_error(layer, x, w) < 0.5 * err_plain


# ---------------------------------------------------------------------------------------------
# FP8 W8A8, dynamic per-token activation scales
# ---------------------------------------------------------------------------------------------
def test_fp8_dynamic_scales_each_token_by_its_own_maximum():
    lin, x = _planted(outliers=())
    layer = _recipe("fp8_dynamic").build("l", lin)
    w = lin.weight.detach()
    assert not any("act" in n or "scale" in n for n, _ in layer.named_buffers() if not n.startswith("wq_"))  # nothing static
    torch.testing.assert_close(layer.dequantized_weight(), _fp8_per_row(w), rtol=0, atol=0)  # per output channel
    xt = x[:8].clone()
    want = _fp8_per_row(xt) @ _fp8_per_row(w).T + lin.bias.detach()
    torch.testing.assert_close(layer(xt), want, rtol=1e-5, atol=1e-5)
    # per token and dynamic: one token 2^10 times larger changes that token's output by exactly 2^10 and
    # leaves every other token's output bit for bit (a per-tensor scale would crush the others)
    loud = xt.clone()
    loud[3] *= 1024.0
    base, out = layer(xt) - lin.bias.detach(), layer(loud) - lin.bias.detach()
    keep = [i for i in range(8) if i != 3]
    assert torch.equal(out[keep], base[keep])
    torch.testing.assert_close(out[3], base[3] * 1024.0, rtol=1e-6, atol=0)
    per_tensor = xt.abs().amax() * 1024 / 448.0  # what one static scale for the batch would be
    assert per_tensor > 100 * (xt[0].abs().amax() / 448.0)


# ---------------------------------------------------------------------------------------------
# AWQ W4A16
# ---------------------------------------------------------------------------------------------
def _awq_errors(lin, x, grid):
    """The search written out: s = a^α / sqrt(max·min), a = mean|x|; INT4 g128 RTN of W·s; error of
    (x/s)·Q(W·s)ᵀ against x·Wᵀ on the tokens."""
    w = lin.weight.detach()
    a = x.abs().mean(0)
    ref = x @ w.T
    errors, scales = [], []
    for alpha in grid:
        s = a.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        ws = (w * s).reshape(w.shape[0], -1, 128)
        scale = (ws.abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
        wq = ((ws / scale).round().clamp(-7, 7) * scale).reshape(w.shape)
        errors.append(float(((x / s) @ wq.T - ref).square().sum()))
        scales.append(s)
    return errors, scales


def test_awq_picks_the_brute_force_argmin_of_its_grid_and_beats_rtn_on_outliers():
    lin, x = _planted(gain=25.0)
    stats = {"l": LayerStats(absmax=x.abs().amax(0), tokens={0: x})}
    method = _recipe("awq", stats)
    layer = method.build("l", lin)
    grid = method.alpha
    assert grid == [round(0.05 * i, 2) for i in range(20)]                     # 0, 0.05, …, 0.95
    errors, scales = _awq_errors(lin, x, grid)
    best = min(range(len(grid)), key=errors.__getitem__)
    assert method.report["l"]["alpha"] == pytest.approx(grid[best])
    torch.testing.assert_close(layer.smooth, scales[best], rtol=1e-5, atol=0)
    assert layer.act_format is None                                             # W4A16: activations 16-bit
    w = lin.weight.detach()
    unclipped = layer_error(_recipe("awq", stats, weight_clip_search="false").build("l", lin), x, w)
    assert unclipped == pytest.approx(errors[best], rel=1e-3)
    rtn = layer_error(_recipe("awq", stats, alpha="[0.0]", weight_clip_search="false").build("l", lin), x, w)
    assert rtn == pytest.approx(errors[0], rel=1e-3)                             # α = 0: plain INT4 RTN
    assert grid[best] > 0 and unclipped < 0.4 * rtn                              # the outlier channels pay off
    assert layer_error(layer, x, w) <= unclipped                                 # and the clipping on top


def _int4_group_clipped(w: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """INT4 in groups of 128 with a clip ratio per row and group, written out."""
    g = w.reshape(w.shape[0], -1, 128)
    scale = (rho.unsqueeze(-1) * g.abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    return ((g / scale).round().clamp(-7, 7) * scale).reshape(w.shape)


def test_awq_weight_clipping_picks_each_groups_argmin_and_spares_q_and_k():
    lin, x = _planted(gain=25.0, d_out=32)
    with torch.no_grad():
        lin.weight[:, 3] *= 12.0          # a heavy weight in group 0 of every row: clipping it can pay off
    stats = {n: LayerStats(absmax=x.abs().amax(0), tokens={0: x}) for n in ("l", "blocks.0.attn1.to_q")}
    method = _recipe("awq", stats)
    layer = method.build("l", lin)
    s, ws = layer.smooth, lin.weight.detach() * layer.smooth
    xs = (x / s).reshape(x.shape[0], -1, 128)
    grid = method.weight_clip_ratios
    assert grid == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]
    errs = torch.stack([torch.einsum("tgk,ogk->otg", xs, (ws - _int4_group_clipped(ws, torch.full((32, 2), r)))
                                     .reshape(32, -1, 128)).square().sum(1) for r in grid])  # [ratio, row, group]
    picked = torch.tensor(grid)[errs.argmin(0)]
    torch.testing.assert_close(layer.dequantized_weight(), _int4_group_clipped(ws, picked), rtol=0, atol=0)
    report = method.report["l"]
    assert report["weight_clipped"] == pytest.approx(float((picked < 1).float().mean()))
    assert 0 < report["weight_clipped"] < 1                                # some groups clipped, not all
    excluded = method.build("blocks.0.attn1.to_q", lin)                     # q and k are never clipped
    assert "weight_clip_mean" not in method.report["blocks.0.attn1.to_q"]
    torch.testing.assert_close(excluded.dequantized_weight(), _int4_group_clipped(ws, torch.ones(32, 2)),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# ViDiT-Q-style timestep-aware balancing
# ---------------------------------------------------------------------------------------------
def _outliers(b: int) -> list[int]:
    return [5 + 7 * b + 32 * j for j in range(8)]


def _binned(lin_in=256, bins=3, seed=1):
    """Tokens whose outlier channels (one in each MXFP4 block) move from bin to bin, as activations
    drift along denoising."""
    g = torch.Generator().manual_seed(seed)
    tokens, maxima = {}, {}
    for b in range(bins):
        t = torch.randn(128, lin_in, generator=g)
        t[:, _outliers(b)] *= 30.0
        tokens[b], maxima[b] = t, t.abs().amax(0)
    allx = torch.cat(list(tokens.values()))
    return LayerStats(absmax=allx.abs().amax(0), tokens=tokens, bin_absmax=maxima)


def test_viditq_has_one_mask_per_bin_and_inference_uses_the_current_bins(tmp_path):
    from wanexp.formats import get_format
    from wanexp.kernels import supports_layer
    from wanexp.quant.artifact import load_artifact, save_artifact
    lin, _ = _planted()
    stats = _binned()
    method = _recipe("viditq", {"l": stats}, bins=3)
    layer = method.build("l", lin)
    w = lin.weight.detach()
    assert layer.smooth.shape == (3, 256) and layer.smooth_bins == 3
    masks = [stats.bin_absmax[b].sqrt() / w.abs().amax(0).sqrt() for b in range(3)]  # SmoothQuant per bin
    for b in range(3):
        torch.testing.assert_close(layer.smooth[b], masks[b], rtol=1e-6, atol=0)
    for b in range(3):  # each bin's outliers are balanced by its own mask only
        others = [c for c in range(3) if c != b]
        assert all(float((masks[b][_outliers(b)] / masks[c][_outliers(b)]).min()) > 3 for c in others)
    mx = get_format("mxfp4")
    bins = TimestepBins((300.0, 600.0))           # bin 0: t >= 600, 1: [300, 600), 2: t < 300
    layer.context = TimestepContext(bins=bins)
    x = stats.tokens[1][:8]
    outs = {}
    for t, b in ((900.0, 0), (450.0, 1), (100.0, 2)):
        layer.context.set_timestep(t)
        assert layer.context.bin == b and layer.current_bin() == b
        xs = x / masks[b]
        want = mx.quantize_dequantize(xs) @ mx.quantize_dequantize(w * masks[b]).T + lin.bias.detach()
        outs[b] = layer(x)
        torch.testing.assert_close(outs[b], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    with layer.at_bin(2):                           # a pinned bin (the searches) wins over the context
        assert torch.equal(layer(x), outs[2])
    # the error of bin 1's tokens is lowest with bin 1's own mask
    errs = {}
    for b in range(3):
        with layer.at_bin(b):
            errs[b] = layer_error(layer, stats.tokens[1], w)
    assert errs[1] < 0.8 * min(errs[0], errs[2])
    # a static-mask layer of the same shape is fused on GPU; the per-bin one is refused (reference path)
    static = _recipe("smoothquant", {"l": stats}, bins=1)
    static.weight_format = static.act_format = {"name": "mxfp4", "opts": {}}
    static.compute_dtype = torch.bfloat16
    layer_bf16 = _recipe("viditq", {"l": stats}, bins=3)
    layer_bf16.compute_dtype = torch.bfloat16
    assert supports_layer(static.build("l", lin)) and not supports_layer(layer_bf16.build("l", lin))
    # the table and the per-bin weights survive the artifact
    model = nn.Sequential(nn.Linear(256, 64))
    model[0] = layer
    path = save_artifact(tmp_path / "q.safetensors", {"high_noise": model}, {"fingerprint": "f"})
    again = nn.Sequential(nn.Linear(256, 64))
    load_artifact(path, {"high_noise": again}, "f")
    for b in range(3):
        with again[0].at_bin(b):
            torch.testing.assert_close(again[0](x), outs[b], rtol=0, atol=0)
    assert again[0].nbytes() > 2.9 * _recipe("viditq", {"l": stats}, bins=1).build("l", lin).nbytes()


def test_viditq_falls_back_to_the_pooled_mask_for_a_bin_calibration_never_saw():
    lin, _ = _planted()
    stats = _binned(bins=2)
    layer = _recipe("viditq", {"l": stats}, bins=3).build("l", lin)    # bin 2 has no statistics
    pooled = stats.absmax.sqrt() / lin.weight.detach().abs().amax(0).sqrt()
    torch.testing.assert_close(layer.smooth[2], pooled, rtol=1e-6, atol=0)
    assert not torch.allclose(layer.smooth[0], layer.smooth[1])
