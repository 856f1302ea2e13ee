"""The device placement rule, checked on the CPU (issue: every W4A4 method crashed on CUDA).

The crash class: a tensor made without ``device=`` (a clip table, a candidate table) or statistics
left on the host, meeting a layer that lives on the GPU. On a CPU-only machine the same mistake is
made visible by building under ``torch.device("meta")``: every tensor a factory call makes without
an explicit device lands on ``meta``, and the first op that mixes it with the real (CPU) tensors
fails, exactly as the CUDA run did. Statistics are given on ``meta``'s counterpart, a device the
weight is not on, by leaving them where calibration put them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wanexp.quant.api import module_device, quant_layers, quantize_, replace_module
from wanexp.quant.artifact import load_artifact, save_artifact
from wanexp.quant.methods import LayerStats, method_config
from wanexp.quant.targets import select_targets

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = ("w4a16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "hif4_tailaware", "hif4_conservative",
           "smoothquant", "fp8_dynamic", "awq", "viditq")
# the field's recipes run in the format they imply (int8, fp8_e4m3, int4; viditq the default mxfp4)
OWN_FORMAT = ("smoothquant", "fp8_dynamic", "awq", "viditq")
FORMATS = ("mxfp4", "mxfp4_ceil", "nvfp4", "int4", "hif4")


def _compose(group: str, name: str, section: str | None = None) -> dict:
    """The ``section`` (default: ``group``) of the run config Hydra composes with ``group=name``."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"{group}={name}"])
    return OmegaConf.to_container(cfg[section or group], resolve=True)


def _stats(model, layers, bins: int, seed: int = 0) -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        k = model.get_submodule(name).in_features
        tokens = {b: (torch.randn(48, k, generator=g) * (1 + b)).to(torch.bfloat16) for b in range(bins)}
        x = torch.cat(list(tokens.values())).float()
        out[name] = LayerStats(absmax=x.abs().amax(0), hessian=x.T @ x, tokens=tokens,
                               bin_absmax={b: t.float().abs().amax(0) for b, t in tokens.items()})
    return out


@pytest.fixture(scope="module")
def expert(tiny_pipe):
    return tiny_pipe.transformer


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_with_no_tensor_made_off_its_weights_device(expert, method):
    quant = _compose("quant", method)
    fmt = (_compose("quant", method, "format") if method in OWN_FORMAT else
           _compose("format", "hif4" if method.startswith("hif4") else "mxfp4_ceil"))
    model = copy.deepcopy(expert)
    targets = [n for n in select_targets(model) if n.startswith("blocks.0.")]  # every layer kind, once
    bins = int(quant.get("bins", 1))
    config = method_config(quant, fmt, bins, compute_dtype=torch.bfloat16)
    config.stats = _stats(model, targets, bins)
    with torch.device("meta"):  # a factory call without device= would land here and fail below
        swapped = quantize_(model, config, targets)
    assert swapped == targets
    for name, layer in quant_layers(model).items():
        devices = {b.device.type for b in layer.buffers()}
        assert devices == {"cpu"}, (name, devices)
    assert all(len(r["clip"]) == (bins if quant.get("clip_search") else 1) for r in config.report.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_builds_with_no_tensor_made_off_its_weights_device(expert, fmt):
    model = copy.deepcopy(expert)
    targets = select_targets(model)
    config = method_config(_compose("quant", "rtn"), _compose("format", fmt), 1)
    with torch.device("meta"):
        quantize_(model, config, targets)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    y = quant_layers(model)["blocks.0.attn1.to_q"](x)  # and runs where it was built
    assert y.device.type == "cpu" and torch.isfinite(y).all()


def test_layers_built_elsewhere_are_placed_on_the_device_of_the_layer_they_replace(expert):
    """compute_device (the GPU in the runner) may differ from where the model is held (the CPU under
    offload): the QuantLinear goes where the nn.Linear was, every buffer with it."""
    model = copy.deepcopy(expert)
    targets = select_targets(model)[:3]
    config = method_config(_compose("quant", "rtn"), _compose("format", "mxfp4"), 1)
    home = copy.deepcopy(model).to("meta")
    built = {}
    for name in targets:  # build on the CPU, swap into the meta-held model
        built[name] = config.build(name, model.get_submodule(name))
        replace_module(home, name, built[name])
    for name in targets:
        layer = home.get_submodule(name)
        assert {b.device.type for b in layer.buffers()} == {"meta"}
    assert module_device(home).type == "meta"


def test_an_artifact_loads_onto_the_device_of_the_model_it_is_loaded_into(expert, tmp_path):
    model = copy.deepcopy(expert)
    config = method_config(_compose("quant", "svdquant_rtn"), _compose("format", "mxfp4"), 1)
    targets = select_targets(model)
    config.stats = _stats(model, targets, 1)
    quantize_(model, config, targets)
    path = save_artifact(tmp_path / "q.safetensors", {"high_noise": model}, {"fingerprint": "f"})

    on_meta = copy.deepcopy(expert).to("meta")
    load_artifact(path, {"high_noise": on_meta}, "f")
    layers = quant_layers(on_meta)
    assert len(layers) == len(targets)
    assert {b.device.type for layer in layers.values() for b in layer.buffers()} == {"meta"}

    on_cpu = copy.deepcopy(expert)
    load_artifact(path, {"high_noise": on_cpu}, "f")
    x = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    name = targets[0]
    assert torch.equal(quant_layers(on_cpu)[name](x), quant_layers(model)[name](x))


def test_path_calls_count_the_reference_path_on_the_cpu(expert):
    from wanexp.quant.api import path_calls
    model = copy.deepcopy(expert)
    quantize_(model, method_config(_compose("quant", "rtn"), _compose("format", "mxfp4"), 1), select_targets(model))
    layer = quant_layers(model)["blocks.0.ffn.net.2"]
    for _ in range(3):
        layer(torch.randn(4, 128, dtype=torch.bfloat16))
    assert layer.calls == {"fused": 0, "reference": 3}
    assert path_calls(model) == {"fused": 0, "reference": 3}
