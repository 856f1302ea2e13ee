"""The quantized artifact made of parts (issue 13, disk): the calibrate stage's GPTQ parts are the
artifact's tensors, the entry file only names them; it verifies itself, and the one-file layout of
earlier versions still loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wanexp.errors import WanexpError
from wanexp.integrity import save_tensors
from wanexp.quant.api import quant_layers, quantize_
from wanexp.quant.artifact import (PARTS_KEY, artifact_digest, artifact_files, check_artifact_files, load_artifact,
                                   read_header, save_artifact, save_layers, verify_artifact)
from wanexp.quant.context import TimestepContext
from wanexp.quant.linear import QuantLinear
from wanexp.quant.methods import MethodConfig
from wanexp.quant.targets import block_index, select_targets

from test_quant import MX, Toy

HEADER = {"fingerprint": "f", "method": "rtn"}


def _base() -> dict:
    """The BF16 base model: two experts with distinct weights."""
    models = {}
    for k, name in enumerate(("high_noise", "low_noise")):
        models[name] = Toy()
        with torch.no_grad():
            for p in models[name].parameters():
                p.mul_(1 + 0.1 * k)
    return models


def _quantized() -> dict:
    """The base quantized with RTN MXFP4, with a clip table that is not all ones."""
    models = _base()
    for k, model in enumerate(models.values()):
        quantize_(model, MethodConfig("rtn", MX, MX, compute_dtype=torch.float32), select_targets(model),
                  TimestepContext())
        model.blocks[0].attn1.to_q.clip_table = torch.tensor([0.8 - 0.1 * k])
    return models


def _write_parts(root: Path, models: dict) -> list[Path]:
    """What the calibrate stage writes with transient Hessians: per expert, one part a pass of 2 blocks."""
    parts = []
    for expert, model in models.items():
        layers = quant_layers(model)
        for k, blocks in enumerate(((0, 1), (2, 3))):
            mine = {n: m for n, m in layers.items() if block_index(n) in blocks}
            path = root / "parts" / f"{expert}-part{k:03d}-of002.safetensors"
            parts.append(save_layers(path, {expert: mine}, dict(HEADER, part=[expert, k, 2])))
    return parts


@pytest.fixture
def made(tmp_path):
    models = _quantized()
    root = tmp_path / "artifact"
    parts = _write_parts(root, models)
    entry = save_artifact(root / "quantized.safetensors", models, HEADER, parts=parts)
    single = save_artifact(tmp_path / "single" / "quantized.safetensors", models, HEADER)
    return {"models": models, "entry": entry, "parts": parts, "single": single, "root": root}


def _fresh() -> dict:
    return _base()


def _state(models: dict) -> dict:
    return {f"{e}/{k}": v for e, m in models.items() for k, v in m.state_dict().items()}


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_an_artifact_of_parts_writes_no_tensor_again_and_rebuilds_the_same_layers(made):
    entry, parts, single = made["entry"], made["parts"], made["single"]
    assert read_header(entry)["version"] == 3 and read_header(single)["version"] == 2
    assert _keys(entry) == []  # every tensor is in a part
    parts_bytes = sum(p.stat().st_size for p in parts)
    assert entry.stat().st_size < 0.25 * parts_bytes < single.stat().st_size  # the layers are on disk once
    assert artifact_files(entry) == [entry, *parts] and artifact_files(single) == [single]
    assert artifact_digest(entry) == artifact_digest(single) == verify_artifact(entry) == verify_artifact(single)
    from_parts, from_file = _fresh(), _fresh()
    assert load_artifact(entry, from_parts, "f")["sha256"] == artifact_digest(single)
    load_artifact(single, from_file, "f")
    want, got, other = _state(made["models"]), _state(from_parts), _state(from_file)
    assert want.keys() == got.keys() == other.keys()
    assert all(torch.equal(want[k], got[k]) and torch.equal(want[k], other[k]) for k in want)
    assert {e: {n: q.describe() for n, q in quant_layers(m).items()} for e, m in from_parts.items()} == \
        {e: {n: q.describe() for n, q in quant_layers(m).items()} for e, m in made["models"].items()}
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(from_parts["low_noise"](x), made["models"]["low_noise"](x))


def test_a_tensor_changed_after_its_part_was_written_is_the_only_one_the_entry_file_holds(made):
    models, root = made["models"], made["root"]
    layer = models["high_noise"].blocks[2].ffn.net[2]
    layer.clip_table = torch.tensor([0.6])  # as the paper code's W4A4 clip search re-picks a table
    entry = save_artifact(root / "quantized.safetensors", models, HEADER, parts=made["parts"])
    key = "high_noise/blocks.2.ffn.net.2/clip_table"
    assert _keys(entry) == [key]
    manifest = json.loads(safe_open(str(entry), framework="pt").metadata()[PARTS_KEY])
    assert manifest["parts/high_noise-part001-of002.safetensors"]["skip"] == [key]
    single = save_artifact(root.parent / "changed.safetensors", models, HEADER)
    assert artifact_digest(entry) == artifact_digest(single)
    fresh = _fresh()
    load_artifact(entry, fresh, "f")
    assert float(fresh["high_noise"].blocks[2].ffn.net[2].clip_table[0]) == pytest.approx(0.6)
    assert float(fresh["high_noise"].blocks[0].attn1.to_q.clip_table[0]) == pytest.approx(0.8)


def _flip_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-200:-100] = bytes(b ^ 0xFF for b in raw[-200:-100])  # tensor data (the header is at the start)
    path.write_bytes(bytes(raw))


def test_a_missing_short_damaged_or_swapped_part_is_one_error_naming_it(made, tmp_path):
    entry, part = made["entry"], made["parts"][1]
    keep = tmp_path / "keep.safetensors"
    shutil.copy(part, keep)

    def refused(match: str, check=check_artifact_files):
        fresh = _fresh()
        with pytest.raises(WanexpError, match=match) as caught:
            check(entry) if check is check_artifact_files else load_artifact(entry, fresh, "f")
        assert str(part) in str(caught.value) and "\n" not in str(caught.value)
        assert not any(isinstance(m, QuantLinear) for e in fresh.values() for m in e.modules())  # untouched
        shutil.copy(keep, part)

    part.unlink()
    refused("does not exist .*copy the artifact's whole directory")
    part.write_bytes(keep.read_bytes()[:-10])
    refused("has .* bytes, .* records .*: it was truncated or replaced")
    _flip_middle(part)
    refused("does not match its checksum", check=load_artifact)
    other = _quantized()
    other["high_noise"].blocks[2].ffn.net[2].clip_table = torch.tensor([0.3])  # same shapes, other values
    _write_parts(tmp_path / "other", other)
    shutil.copy(tmp_path / "other" / "parts" / part.name, part)
    refused("is not the part .* was made with", check=load_artifact)
    assert load_artifact(entry, _fresh(), "f")["sha256"] == artifact_digest(made["single"])  # intact again


def test_a_one_file_artifact_as_earlier_versions_wrote_it_still_loads(made, tmp_path):
    """Version 2, written here by hand in that layout (every tensor in the file, the header and the
    tensors' SHA-256s in the safetensors metadata), not by today's writer."""
    models = made["models"]
    tensors = {f"{e}/{n}/{k}": b for e, m in models.items() for n, q in quant_layers(m).items()
               for k, b in q.named_buffers(recurse=False) if b is not None}
    header = dict(HEADER, version=2, wanexp_version="0.9", layers={e: {n: q.describe() for n, q in quant_layers(m).items()}
                                                                     for e, m in models.items()})
    old = tmp_path / "old.safetensors"
    save_tensors(old, tensors, metadata={"wanexp": json.dumps(header)})
    fresh = _fresh()
    assert load_artifact(old, fresh, "f")["sha256"] == artifact_digest(made["entry"])
    want, got = _state(models), _state(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)
