"""model.compile: the denoiser blocks torch.compile'd for generation, BF16 and W4A4 alike.

On the CPU the blocks are compiled with backend "aot_eager" (dynamo's graphs and AOT autograd, no
code generation: seconds instead of minutes); the GPU end-to-end test runs the runner with the
default backend (inductor). The fused kernels' side (one custom op, one graph across timestep
bins) is tested in tests/test_kernels.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf

from wanexp.config import check_settings
from wanexp.errors import WanexpError
from wanexp.models.compiled import compile_denoisers, compile_setting
from wanexp.quant.api import attach_context, quant_layers, quantize_
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.methods import method_config
from wanexp.quant.targets import select_targets
from wanexp.stages.common import generation_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"


def _inputs(expert, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = expert.config
    return dict(hidden_states=torch.randn(1, c.in_channels, 2, 8, 8, generator=g).to(torch.bfloat16),
                timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 16, c.text_dim, generator=g).to(torch.bfloat16),
                encoder_hidden_states_image=None, return_dict=False)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=overrides)


def _w4a4_expert(tiny_pipe):
    cfg = OmegaConf.to_container(_compose(["quant=rtn", "format=mxfp4"]), resolve=True)
    model = copy.deepcopy(tiny_pipe.transformer)
    config = method_config(cfg["quant"], cfg["format"], 2)
    quantize_(model, config, select_targets(model))
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    attach_context(model, ctx)
    for layer in quant_layers(model).values():
        layer.set_clip_table([0.7, 1.0])   # two bins that quantize differently
    return model, ctx


@torch.no_grad()
def test_compiled_w4a4_blocks_match_eager_and_follow_the_bin(tiny_pipe):
    model, ctx = _w4a4_expert(tiny_pipe)
    eager = {}
    for t in (800.0, 100.0):
        ctx.set_timestep(t)
        eager[t] = model(**_inputs(model))[0]
    assert not torch.equal(eager[800.0], eager[100.0])
    pipe = SimpleNamespace(transformer=model, transformer_2=copy.deepcopy(tiny_pipe.transformer_2))
    torch._dynamo.reset()
    try:
        n = compile_denoisers(pipe, backend="aot_eager")
        assert n == len(model.blocks) + len(pipe.transformer_2.blocks)
        assert all(b._compiled_call_impl is not None for b in model.blocks)
        assert compile_denoisers(pipe, backend="aot_eager") == n          # idempotent
        for t in (800.0, 100.0, 800.0):
            ctx.set_timestep(t)
            y = model(**_inputs(model))[0]
            rel = float((y.double() - eager[t].double()).norm() / eager[t].double().norm())
            assert rel < 1e-2, (t, rel)
        bf16 = pipe.transformer_2
        ref = copy.deepcopy(tiny_pipe.transformer_2)(**_inputs(bf16))[0]
        out = bf16(**_inputs(bf16))[0]
        assert float((out.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
    finally:
        torch._dynamo.reset()


def test_model_compile_setting_and_its_generation_key():
    assert compile_setting(False) is None and compile_setting(None) is None
    assert compile_setting(True) == "default" and compile_setting("max-autotune") == "max-autotune"
    cfg = OmegaConf.create({"model": {"generation": {"height": 64}, "compile": False}, "quant": {}})
    assert "compile" not in generation_cfg(cfg)          # eager runs keep their reference cache
    cfg.model.compile = True
    assert generation_cfg(cfg)["compile"] == "True"      # compiled runs generate their own references


def test_a_bad_model_compile_value_is_refused():
    cfg = _compose(["model.compile=fast"])
    with pytest.raises(WanexpError, match=r"model.compile=fast is not allowed: model.compile takes one of False, True"):
        check_settings(cfg)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_fused_block_matches_eager_at_a14b_width():
    """One A14B block (dim 5120) with the fused W4A4 layers, compiled with inductor: the same
    output as eager for each GEMM backend, and every quantized layer on the fused path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wanexp import kernels
    from wanexp.bench.core import SyntheticTSClip, make_inputs
    from wanexp.models.a14b_random import build_expert
    from wanexp.quant.api import path_calls
    model = build_expert(torch.device("cuda"), 1)
    ctx = TimestepContext(bins=TimestepBins.equal_width(900.0, 1000.0, 4))
    quantize_(model, SyntheticTSClip(), select_targets(model), context=ctx)
    inputs, _ = make_inputs(160, 288, 5, torch.device("cuda"))
    backends = ("auto", "cublas", "fp8") if torch.cuda.get_device_capability() >= (8, 9) else ("auto", "cublas")
    for backend in backends:
        with kernels.gemm_backend(backend):
            eager = {}
            for t in (950.0, 910.0):
                ctx.set_timestep(t)
                eager[t] = model(**inputs, return_dict=False)[0]
            torch._dynamo.reset()
            kernels.prepare(model)
            for block in model.blocks:
                block.compile()
            before = path_calls(model)
            for t in (950.0, 910.0):
                ctx.set_timestep(t)
                y = model(**inputs, return_dict=False)[0]
                rel = float((y.double() - eager[t].double()).norm() / eager[t].double().norm())
                assert rel < 1e-2, (backend, t, rel)
            after = path_calls(model)
            assert after["reference"] == before["reference"] and after["fused"] > before["fused"]
            for block in model.blocks:
                block._compiled_call_impl = None
    torch._dynamo.reset()
