"""Quantized attention (wanexp.quant.attention): the references' defining behaviour, and the scoped
mode that applies them to a denoiser's attention calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from wanexp.quant.attention import (AttentionConfig, AttentionMode, fp8_attention, quantize_blocks,
                                    sage_attention)


def _qkv(b=1, h=2, s=200, d=32, seed=0, k_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    k = k + k_offset * torch.randn(1, h, 1, d, generator=g)   # an offset every token shares (Wan's K has them)
    return q, k, v


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_block_quantizers_use_one_scale_per_block_and_their_grids():
    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(1))
    x[0, 0, 5, 3] = 500.0                                    # an outlier in block 0 of head 0 only
    for kind, qmax in (("int8", 127.0), ("fp8", 448.0)):
        y = quantize_blocks(x, 128, kind)
        assert y.shape == x.shape
        # blocks other than the outlier's are as fine as without it
        clean = quantize_blocks(x[:, :, 128:], 128, kind)
        assert torch.equal(y[:, :, 128:], clean)
        head1 = y[0, 1, :128] / (x[0, 1, :128].abs().max() / qmax)
        if kind == "int8":   # integers (up to the rounding of the division that recovers them)
            assert float((head1 - head1.round()).abs().max()) < 1e-4 and float(head1.abs().max()) <= 127 + 1e-4
        else:                # on the E4M3 grid
            assert torch.allclose(head1.to(torch.float8_e4m3fn).float(), head1, rtol=1e-5, atol=0)
    assert float((quantize_blocks(x, 128, "int8")[0, 0, :128] - x[0, 0, :128]).abs().max()) > 1.0  # the outlier's block pays


@pytest.mark.parametrize("name", ["fp8", "int8_sage"])
def test_quantized_attention_is_close_to_exact_and_not_exact(name):
    q, k, v = _qkv()
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = fp8_attention(q, k, v) if name == "fp8" else sage_attention(q, k, v)
    err = _rel(out, exact)
    assert 1e-4 < err < (0.1 if name == "fp8" else 5e-2), err   # fp8: Q, K, V and P each carry 3 mantissa bits


def test_sage_k_smoothing_removes_the_error_of_a_shared_k_offset():
    q, k, v = _qkv(k_offset=30.0)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    smooth = _rel(sage_attention(q, k, v, smooth_k=True), exact)
    raw = _rel(sage_attention(q, k, v, smooth_k=False), exact)
    assert smooth < 5e-2 and raw > 3 * smooth, (smooth, raw)
    # the mean's subtraction itself changes nothing (softmax is shift-invariant per query)
    ks = k.double() - k.double().mean(dim=-2, keepdim=True)
    assert _rel(F.scaled_dot_product_attention(q.double(), ks, v.double()), exact) < 1e-12
    assert _rel(sage_attention(q, k, v, pv="fp8"), exact) < 5e-2


def test_bad_attention_settings_are_refused():
    with pytest.raises(ValueError, match="attention='int4' is not one of bf16, fp8, int8_sage"):
        AttentionConfig("int4")
    with pytest.raises(ValueError, match="attention.pv='bf8'"):
        AttentionConfig("int8_sage", pv="bf8")


def test_the_mode_replaces_plain_attention_calls_inside_its_scope_only():
    q, k, v = _qkv(s=64)
    mode = AttentionMode(AttentionConfig("fp8"))
    with mode:
        y = F.scaled_dot_product_attention(q, k, v)
        masked = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # not Wan's: unchanged
    assert mode.calls == 1 and torch.equal(y, fp8_attention(q, k, v))
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with AttentionMode(AttentionConfig("bf16")) as off:
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert off.calls == 0


@torch.no_grad()
def test_the_mode_reaches_every_attention_of_a_wan_expert(tiny_pipe):
    model = copy.deepcopy(tiny_pipe.transformer)
    c = model.config
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, c.in_channels, 2, 8, 8, generator=g).to(torch.bfloat16),
                  timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 16, c.text_dim, generator=g).to(torch.bfloat16),
                  return_dict=False)
    ref = model(**inputs)[0]
    for name in ("fp8", "int8_sage"):
        mode = AttentionMode(AttentionConfig(name))
        with mode:
            out = model(**inputs)[0]
        assert mode.calls == 2 * len(model.blocks)               # self- and cross-attention of every block
        assert not torch.equal(out, ref) and _rel(out, ref) < 0.1, (name, _rel(out, ref))


TINY_RUN = ["+experiment=smoke", "logger=none", "model.generation.num_inference_steps=2", "model.generation.height=32",
            "model.generation.width=32", "data.eval.num_samples=1", "timing.warmup_steps=1"]


def test_the_runner_applies_the_attention_axis_and_reports_it(cli, tmp_path):
    """attention=int8_sage on W4A4 RTN: the quantized videos change (the BF16 references do not), the
    results row names it; quant=bf16 with quantized attention is refused before any model loads."""
    runs = {}
    for att in ("bf16", "int8_sage"):
        proc = cli(*TINY_RUN, f"attention={att}", f"hydra.run.dir={tmp_path / att}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[att] = tmp_path / att
    from safetensors.torch import load_file
    lat = {a: load_file(str(next((d / "latents").glob("*.safetensors"))))["latents"] for a, d in runs.items()}
    assert not torch.equal(lat["bf16"], lat["int8_sage"])
    import json

    import pandas as pd
    refs = {a: json.loads((d / "generate.json").read_text())["reference_dir"] for a, d in runs.items()}
    assert refs["bf16"] == refs["int8_sage"]                   # one BF16 reference for both
    rows = {a: pd.read_csv(d / "results.csv").iloc[0] for a, d in runs.items()}
    assert pd.isna(rows["bf16"]["attention"]) and rows["int8_sage"]["attention"] == "int8_sage"
    assert rows["bf16"]["latent_rel_err"] != rows["int8_sage"]["latent_rel_err"]
    proc = cli(*TINY_RUN, "quant=bf16", "attention=fp8", f"hydra.run.dir={tmp_path / 'refused'}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "wanexp: error: attention=fp8 composes with a quantized method; quant=bf16 is the run every other is "
        "compared to, so its attention stays bf16")
