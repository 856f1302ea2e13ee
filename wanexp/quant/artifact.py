"""The quantized-model artifact: one safetensors file of every QuantLinear's buffers plus a JSON header.

The header (also stored in the safetensors metadata) names the method, format, expert policy, bins
and the base model's fingerprint, and holds a SHA-256 of every tensor (``wanexp.integrity``).
Loading never recalibrates, refuses a different base model, and refuses a tensor whose bytes no
longer match its checksum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.quant.api import module_device, quant_layers, replace_module
from wanexp.quant.linear import QuantLinear
from wanexp.version import __version__

ARTIFACT_FILE = "quantized.safetensors"
ARTIFACT_VERSION = 2  # 2: a SHA-256 per tensor in the header


def save_artifact(path: str | Path, experts: dict[str, nn.Module], header: dict[str, Any]) -> Path:
    """Every QuantLinear of ``experts`` (``{name: model}``) into one file."""
    return save_layers(path, {e: quant_layers(m) for e, m in experts.items()}, header)


def save_layers(path: str | Path, layers: dict[str, dict[str, QuantLinear]], header: dict[str, Any]) -> Path:
    """``{expert: {layer name: QuantLinear}}`` into one safetensors file with the JSON header."""
    from wanexp.integrity import save_tensors

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, dict]] = {}
    for expert, named in layers.items():
        described[expert] = {}
        for name, layer in named.items():
            described[expert][name] = layer.describe()
            for key, buf in layer.named_buffers(recurse=False):
                if buf is not None:
                    tensors[f"{expert}/{name}/{key}"] = buf.detach().contiguous().cpu()
    full = dict(header, version=ARTIFACT_VERSION, wanexp_version=__version__, layers=described)
    save_tensors(path, tensors, metadata={"wanexp": json.dumps(full, sort_keys=True)})
    return path


def artifact_digest(path: str | Path) -> str:
    """The artifact's data hash as recorded in its header (``load_artifact`` checks it against the bytes)."""
    from wanexp.integrity import DIGESTS_KEY, file_digest, read_metadata
    return file_digest(json.loads(read_metadata(path, "quantized artifact")[DIGESTS_KEY]))


def read_header(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WanexpError(f"quantized artifact {path} does not exist (run the quantize stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["wanexp"])
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise WanexpError(f"quantized artifact {path} is corrupt or not a wanexp artifact ({err})") from err
    if header.get("version") != ARTIFACT_VERSION:
        raise WanexpError(f"artifact {path} has version {header.get('version')}, this wanexp reads {ARTIFACT_VERSION} "
                          "(re-run the quantize stage)")
    return header


_FIX = "re-run the quantize stage (or point quant.load at an intact copy)"


def verify_artifact(path: str | Path, expect: dict[str, Any] | None = None) -> str:
    """Check an artifact without a model: its header, the method and format asked for, and every
    tensor against its checksum (a reused artifact is checked before anything loads); returns its
    data hash. The base model is checked when it is loaded into one (``load_artifact``)."""
    from wanexp.integrity import load_tensors
    check_header(path, read_header(path), None, expect)
    return load_tensors(path, "quantized artifact", _FIX)[2]


def check_header(path: str | Path, header: dict[str, Any], fingerprint: str | None,
                 expect: dict[str, Any] | None = None) -> None:
    """Refuse an artifact made for another base model, or with another method/format than asked for."""
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise WanexpError(f"artifact {path} was made for base model {header.get('fingerprint')}, "
                          f"but the loaded model is {fingerprint}; re-run the quantize stage for this model")
    for key, want in (expect or {}).items():
        if header.get(key) != want:
            raise WanexpError(f"artifact {path} has {key}={header.get(key)!r} but this run asks for {want!r}")


def load_artifact(path: str | Path, experts: dict[str, nn.Module], fingerprint: str | None,
                  expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Swap the artifact's QuantLinears into ``experts`` (in place); returns the header, with the
    file's data hash as ``sha256``.

    Each layer lands on the device of the module it replaces (the placement rule of
    :func:`wanexp.quant.api.replace_module`): on the GPU for a pipeline held there, on the CPU for
    an offloaded one. The tensors are checked against their checksums and the header's layer list
    before any module is replaced, so a tampered file fails without leaving a half-quantized model behind.
    """
    from wanexp.integrity import load_tensors

    header = read_header(path)
    check_header(path, header, fingerprint, expect)
    tensors, _, digest = load_tensors(path, "quantized artifact", _FIX)
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():  # "<expert>/<layer>/<buffer>"
        expert, _, rest = key.partition("/")
        layer, _, buf = rest.rpartition("/")
        grouped.setdefault((expert, layer), {})[buf] = t
    # Build every layer before swapping any, so a bad file leaves the model untouched.
    built: list[tuple[nn.Module, str, QuantLinear]] = []
    for expert, layers in header["layers"].items():
        if expert not in experts:
            raise WanexpError(f"artifact {path} holds expert {expert!r}, which this model does not have")
        for name, desc in layers.items():
            try:
                experts[expert].get_submodule(name)
            except AttributeError as err:
                raise WanexpError(f"artifact {path} names layer {expert}:{name}, which the model lacks") from err
            try:
                layer = QuantLinear.from_description(desc, grouped.get((expert, name), {}))
            except (KeyError, ValueError, RuntimeError, TypeError) as err:
                raise WanexpError(f"artifact {path} is inconsistent at {expert}:{name} ({err}); "
                                  "it was modified or truncated — re-run the quantize stage") from err
            built.append((experts[expert], name, layer))
    for model, name, layer in built:
        replace_module(model, name, layer)
    return dict(header, sha256=digest)
