"""The quantized-model artifact: every QuantLinear's buffers plus a JSON header, in safetensors.

The header (stored in the safetensors metadata) names the method, format, expert policy, bins
and the base model's fingerprint, and holds a SHA-256 of every tensor (``wanexp.integrity``).
Loading never recalibrates, refuses a different base model, and refuses a tensor whose bytes no
longer match its checksum.

Two layouts, one entry file (``artifact/quantized.safetensors``):

* **single file** (version 2): every tensor in the entry file;
* **made of parts** (version 3): the entry file names part files beside it (``wanexp.parts``:
  relative path, data hash, size) and holds only the tensors no part has as they are now. The
  calibrate stage with transient Hessians writes each pass's GPTQ layers as such a part
  (``artifact/parts/``), so the quantize stage writes only the entry file (KBs) instead of the whole
  model again. The parts are referenced by relative path, not copied or linked: they already live
  in the artifact's directory, and moving or copying that directory whole keeps the artifact intact.
  ``wanexp.data_sha256`` is the data hash of the union, the same a single file of those tensors has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.integrity import DIGESTS_KEY, file_digest, load_tensors, read_metadata, save_tensors, tensor_sha256
from wanexp.quant.api import module_device, quant_layers, replace_module
from wanexp.quant.linear import QuantLinear
from wanexp.version import __version__

ARTIFACT_FILE = "quantized.safetensors"
ARTIFACT_VERSION = 2  # 2: a SHA-256 per tensor in the header (one file)
PARTS_VERSION = 3     # 3: the tensors may live in part files the entry file names
READ_VERSIONS = (ARTIFACT_VERSION, PARTS_VERSION)
PARTS_KEY = "wanexp.parts"        # {relative path: {"sha256": data hash, "bytes": size, "skip": [keys]}}
DATA_KEY = "wanexp.data_sha256"   # the data hash of every tensor, own and the parts'
WHAT = "quantized artifact"
_FIX = "re-run the quantize stage (or point quant.load at an intact copy)"
_PART_FIX = ("it was written by the calibrate stage: delete it, run stage=calibrate, then stage=quantize "
             "in that run directory (or point quant.load at an intact copy of the whole artifact directory)")


def save_artifact(path: str | Path, experts: dict[str, nn.Module], header: dict[str, Any],
                  parts: Sequence[Path] = ()) -> Path:
    """Every QuantLinear of ``experts`` (``{name: model}``) into the artifact at ``path`` (see
    :func:`save_layers` for ``parts``)."""
    return save_layers(path, {e: quant_layers(m) for e, m in experts.items()}, header, parts)


def _layer_tensors(layers: dict[str, dict[str, QuantLinear]]) -> tuple[dict[str, torch.Tensor], dict]:
    """``("<expert>/<layer>/<buffer>" → tensor on the CPU, {expert: {layer: description}})``."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, dict]] = {}
    for expert, named in layers.items():
        described[expert] = {}
        for name, layer in named.items():
            described[expert][name] = layer.describe()
            for key, buf in layer.named_buffers(recurse=False):
                if buf is not None:
                    tensors[f"{expert}/{name}/{key}"] = buf.detach().contiguous().cpu()
    return tensors, described


def save_layers(path: str | Path, layers: dict[str, dict[str, QuantLinear]], header: dict[str, Any],
                parts: Sequence[Path] = ()) -> Path:
    """``{expert: {layer name: QuantLinear}}`` into the artifact at ``path`` with the JSON header.

    Without ``parts``: one file. With ``parts`` (safetensors files under ``path``'s directory, each
    written by ``save_layers``): a part whose tensors are all among the layers' is referenced, and
    only the tensors no part holds as they are now (a clip table searched after the part was made)
    are written into ``path``; a part holding something else is not used."""

    path = Path(path)
    tensors, described = _layer_tensors(layers)
    full = dict(header, version=PARTS_VERSION if parts else ARTIFACT_VERSION, wanexp_version=__version__,
                layers=described)
    metadata = {"wanexp": json.dumps(full, sort_keys=True)}
    if parts:
        digests = {k: tensor_sha256(t) for k, t in tensors.items()}
        manifest, covered = _referenced_parts(path.parent, parts, digests)
        metadata.update({PARTS_KEY: json.dumps(manifest, sort_keys=True), DATA_KEY: file_digest(digests)})
        tensors = {k: t for k, t in tensors.items() if k not in covered}
    save_tensors(path, tensors, metadata=metadata)
    return path


def _referenced_parts(root: Path, parts: Sequence[Path], digests: dict[str, str]) -> tuple[dict, set[str]]:
    """The manifest of the ``parts`` that hold only tensors of ``digests`` (each with the keys whose
    bytes changed since, ``skip``), and the keys they supply as they are."""
    manifest, covered = {}, set()
    for part in parts:
        part = Path(part)
        held = json.loads(read_metadata(part, f"{WHAT} part").get(DIGESTS_KEY, "null") or "null")
        inside = root.resolve() in part.resolve().parents
        if not inside or not held or not set(held) <= set(digests):
            continue  # not beside the artifact, or not these layers' part: its tensors are written again
        same = {k for k, d in held.items() if digests[k] == d}
        manifest[part.resolve().relative_to(root.resolve()).as_posix()] = {
            "sha256": file_digest(held), "bytes": part.stat().st_size, "skip": sorted(set(held) - same)}
        covered |= same
    return manifest, covered


def _metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise WanexpError(f"{WHAT} {path} does not exist (run the quantize stage first)")
    return read_metadata(path, WHAT)


def _parts(path: Path, meta: dict[str, str]) -> dict[Path, dict]:
    """The part files an artifact is made of (none for one file), checked to be there at their
    recorded size: cheap, so a missing or truncated part is named before any model loads."""
    parts = {}
    for rel, entry in json.loads(meta.get(PARTS_KEY) or "{}").items():
        part = path.parent / rel
        if not part.is_file():
            raise WanexpError(f"{WHAT} {path} is made of parts, and its part {part} does not exist "
                              "(copy the artifact's whole directory); " + _PART_FIX)
        if part.stat().st_size != entry["bytes"]:
            raise WanexpError(f"{WHAT} part {part} has {part.stat().st_size} bytes, {path} records "
                              f"{entry['bytes']}: it was truncated or replaced; " + _PART_FIX)
        parts[part] = entry
    return parts


def artifact_files(path: str | Path) -> list[Path]:
    """The files an artifact is: its entry file, then its parts (what to copy or upload)."""
    path = Path(path)
    return [path, *_parts(path, _metadata(path))]


def artifact_digest(path: str | Path) -> str:
    """The artifact's data hash as recorded in its header (``load_artifact`` checks it against the bytes)."""
    meta = _metadata(Path(path))
    return meta[DATA_KEY] if DATA_KEY in meta else file_digest(json.loads(meta[DIGESTS_KEY]))


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta = _metadata(path)
    try:
        header = json.loads(meta["wanexp"])
    except (KeyError, ValueError) as err:
        raise WanexpError(f"{WHAT} {path} is corrupt or not a wanexp artifact (no header: {err})") from err
    if header.get("version") not in READ_VERSIONS:
        raise WanexpError(f"artifact {path} has version {header.get('version')}, this wanexp reads "
                          f"{' and '.join(map(str, READ_VERSIONS))} (re-run the quantize stage)")
    return header


def check_artifact_files(path: str | Path) -> None:
    """The cheap checks, for before a model loads: the header reads, every part is there at its size."""
    path = Path(path)
    read_header(path)
    _parts(path, _metadata(path))


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(header, every tensor on the CPU, data hash), each tensor checked against its checksum, each
    part against the data hash the entry file records for it, and the whole against ``wanexp.data_sha256``."""
    path = Path(path)
    header = read_header(path)
    meta = _metadata(path)
    parts = _parts(path, meta)
    own, _, digest = load_tensors(path, WHAT, _FIX)
    if not parts:
        return header, own, digest
    tensors, digests = {}, {}
    for part, entry in parts.items():
        held, part_meta, part_digest = load_tensors(part, f"{WHAT} part", _PART_FIX)
        if part_digest != entry["sha256"]:
            raise WanexpError(f"{WHAT} part {part} is not the part {path} was made with (its data hash "
                              f"differs); " + _PART_FIX)
        skip = set(entry["skip"])
        tensors.update((k, t) for k, t in held.items() if k not in skip)
        digests.update((k, d) for k, d in json.loads(part_meta[DIGESTS_KEY]).items() if k not in skip)
    tensors.update(own)
    digests.update(json.loads(meta[DIGESTS_KEY]))
    if file_digest(digests) != meta.get(DATA_KEY):
        raise WanexpError(f"{WHAT} {path}: its parts and its own tensors do not add up to the data hash it "
                          f"records; {_FIX}")
    return header, tensors, meta[DATA_KEY]


def verify_artifact(path: str | Path, expect: dict[str, Any] | None = None) -> str:
    """Check an artifact without a model: its header, the method and format asked for, and every
    tensor (its parts' too) against its checksum (a reused artifact is checked before anything
    loads); returns its data hash. The base model is checked when it is loaded into one (``load_artifact``)."""
    check_header(path, read_header(path), None, expect)
    return read_artifact(path)[2]


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
    check_header(path, read_header(path), fingerprint, expect)
    header, tensors, digest = read_artifact(path)
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
