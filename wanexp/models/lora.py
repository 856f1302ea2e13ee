"""LoRAs merged into the BF16 experts, so the model that is calibrated and quantized is the one people run.

``model.lora=[path@scale, …]`` (or ``{path, scale, expert}`` entries) names local safetensors files in
the diffusers / PEFT layout: ``transformer.<module>.lora_A.weight`` [r, in] and ``….lora_B.weight``
[out, r] (``lora_B.bias`` too), ``transformer.`` for the high-noise expert and ``transformer_2.`` for
the low-noise one; keys without a prefix (or PEFT's ``base_model.model.``) go to the high-noise expert,
as in diffusers, unless the entry names ``expert: high_noise | low_noise | both``. Files in the
original Wan / ComfyUI naming (``diffusion_model.…lora_down/lora_up``, with ``alpha``: the published
Wan2.2 step-distilled LoRAs) are converted by diffusers' own ``WanLoraLoaderMixin.lora_state_dict``.

Each linear becomes ``W + scale · (alpha / r) · B A`` (``alpha / r`` from diffusers' adapter metadata
when the file has it, else 1), computed in fp32 on the weight's device and rounded once to the
weight's dtype. Every entry is read and checked against the model (keys, shapes) before any weight
changes. The merged LoRAs are recorded on the experts (file name, content hash, scale) and enter the
model fingerprint, so an artifact made with a LoRA is refused on the model without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.models.experts import EXPERTS, experts

TARGETS = ("auto", *EXPERTS, "both")
RECORD_ATTR = "_wanexp_loras"  # on each expert: the LoRAs merged into it, in order
_PREFIXES = {"transformer_2.": "low_noise", "transformer.": "high_noise"}
_PEFT_PREFIX = "base_model.model."
_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
LAYOUT = ("diffusers/PEFT LoRA keys: transformer.<module>.lora_A.weight and .lora_B.weight "
          "(transformer_2.… for the low-noise expert)")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0
    expert: str = "auto"   # auto: by key prefix | high_noise | low_noise | both

    def __str__(self) -> str:
        return f"{self.path}@{self.scale:g}" + ("" if self.expert == "auto" else f" ({self.expert})")


def parse_specs(value: Iterable[Any] | None) -> list[LoraSpec]:
    """``model.lora``: a list of ``"path@scale"`` strings (scale 1 when omitted) or ``{path, scale, expert}``."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping, LoraSpec)):
        value = [value]
    return [_parse_one(v) for v in value]


def _parse_one(item: Any) -> LoraSpec:
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, Mapping):
        unknown = set(item) - {"path", "scale", "expert"}
        if unknown or "path" not in item:
            raise WanexpError(f"model.lora entry {dict(item)} needs path (and optionally scale, expert); "
                              f"unknown keys: {sorted(unknown)}")
        path, scale, expert = item["path"], item.get("scale", 1.0), str(item.get("expert", "auto"))
    else:
        path, _, scale = str(item).rpartition("@") if "@" in str(item) else (str(item), "", "1")
        expert = "auto"
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise WanexpError(f"model.lora entry {item!r}: the scale after @ must be a number") from None
    if expert not in TARGETS:
        raise WanexpError(f"model.lora entry {item!r}: expert={expert} is not one of {', '.join(TARGETS)}")
    return LoraSpec(Path(str(path)).expanduser(), scale, expert)


def check_specs(value: Iterable[Any] | None) -> list[LoraSpec]:
    """Parse ``model.lora`` and check each file before any model loads: it exists (local files only,
    nothing is downloaded), is a safetensors file, and holds LoRA tensors."""
    from safetensors import safe_open
    specs = parse_specs(value)
    for spec in specs:
        if not spec.path.is_file():
            raise WanexpError(f"LoRA file {spec.path} does not exist (model.lora takes local safetensors files)")
        try:
            with safe_open(str(spec.path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises several types for a non-safetensors file
            raise WanexpError(f"LoRA file {spec.path} is not a readable safetensors file ({err})") from None
        if not any("lora" in k for k in keys):
            raise WanexpError(f"LoRA file {spec.path} holds no LoRA tensors (its keys are e.g. {keys[:3]}); "
                              f"expected {LAYOUT}")
    return specs


@dataclass
class _Update:
    expert: str
    module: str
    down: torch.Tensor            # A [r, in]
    up: torch.Tensor              # B [out, r]
    bias: torch.Tensor | None     # lora_B.bias [out]
    scale: float                  # the entry's scale times alpha / r


def merge_loras(pipe, value: Iterable[Any] | None) -> list[dict]:
    """Merge every LoRA of ``model.lora`` into the pipeline's experts, in order; returns the records.

    Every file is read and matched against the model before the first weight changes, so a bad
    entry leaves the pipeline as it was."""
    specs = check_specs(value)
    models = experts(pipe)
    planned = [(spec, _plan(spec, models)) for spec in specs]
    records = []
    for spec, updates in planned:
        record = {"file": spec.path.name, "sha256": file_digest(spec.path), "scale": spec.scale}
        for expert in sorted({u.expert for u in updates}):
            if any(r["sha256"] == record["sha256"] for r in lora_records(models[expert])):
                raise WanexpError(f"LoRA {spec.path} is already merged into the {expert} expert of this pipeline")
        for u in updates:
            _apply(models[u.expert].get_submodule(u.module), u)
        for expert in sorted({u.expert for u in updates}):
            setattr(models[expert], RECORD_ATTR, [*lora_records(models[expert]), dict(record, expert=expert)])
        records.append(dict(record, experts=sorted({u.expert for u in updates}), layers=len(updates)))
    return records


def lora_records(module: nn.Module) -> list[dict]:
    """The LoRAs merged into one expert (what the model fingerprint includes)."""
    return list(getattr(module, RECORD_ATTR, None) or [])


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors in diffusers naming (converted by diffusers when in the original Wan naming)
    and diffusers' adapter metadata (``{"transformer.r": …, "transformer.lora_alpha": …}``), if any."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from safetensors import safe_open
    from safetensors.torch import load_file
    from wanexp.models.base import quiet_libraries
    quiet_libraries()
    tensors = load_file(str(path), device="cpu")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        converted = WanLoraLoaderMixin.lora_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError) as err:
        raise WanexpError(f"LoRA {path} could not be read as a Wan LoRA ({type(err).__name__}: {err}); "
                          f"expected {LAYOUT}") from None
    return converted, (json.loads(raw) if raw else {})


def _plan(spec: LoraSpec, models: dict[str, nn.Module]) -> list[_Update]:
    """The updates one LoRA makes, checked against the model: every module it names is a linear of
    the expert it targets, with matching shapes."""
    tensors, meta = read_lora(spec.path)
    modules: dict[tuple[str | None, str], dict[str, torch.Tensor]] = {}
    strays = []
    for key, t in tensors.items():
        owner, rest = _owner(key)
        part = next((p for p in _PARTS if rest.endswith(p)), None)
        if part is None:
            strays.append(key)
            continue
        modules.setdefault((owner, rest[: -len(part)]), {})[part] = t
    if strays:
        raise WanexpError(f"LoRA {spec.path} holds {len(strays)} tensors that are not LoRA factors "
                          f"(e.g. {strays[:3]}); expected {LAYOUT}")
    owners = {o for o, _ in modules}
    if spec.expert != "auto" and len(owners) > 1:
        raise WanexpError(f"LoRA {spec.path} holds layers of both experts (transformer. and transformer_2.); "
                          f"expert={spec.expert} cannot retarget it: drop expert (or use one file per expert)")
    updates, unmatched = [], []
    for (owner, name), parts in sorted(modules.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            raise WanexpError(f"LoRA {spec.path}: {name} has {sorted(p.strip('.') for p in parts)} but needs "
                              "both lora_A.weight and lora_B.weight")
        for expert in _targets(spec.expert, owner):
            try:
                layer = models[expert].get_submodule(name)
            except AttributeError:
                unmatched.append(f"{expert}:{name}")
                continue
            updates.append(_check_shapes(spec, expert, name, layer, parts, _alpha_over_rank(meta, owner, parts)))
    if not updates:
        names = [n for _, n in modules][:3]
        raise WanexpError(f"LoRA {spec.path} matches no layer of the model: its {len(modules)} modules are named "
                          f"e.g. {names}; expected {LAYOUT}")
    if unmatched:
        raise WanexpError(f"LoRA {spec.path}: {len(unmatched)} of its {len(unmatched) + len(updates)} layers are not "
                          f"in the model (e.g. {unmatched[:3]}): a LoRA for another model")
    return updates


def _owner(key: str) -> tuple[str | None, str]:
    """(expert named by the key's prefix or None, the key without it)."""
    for prefix, expert in _PREFIXES.items():
        if key.startswith(prefix):
            return expert, key[len(prefix):]
    return None, key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _targets(wanted: str, owner: str | None) -> list[str]:
    if wanted == "both":
        return list(EXPERTS)
    if wanted != "auto":
        return [wanted]
    return [owner or "high_noise"]  # diffusers' rule: keys without a prefix are the `transformer`'s


def _alpha_over_rank(meta: dict, owner: str | None, parts: dict) -> float:
    """PEFT's scaling alpha / r from diffusers' adapter metadata (1 when absent, i.e. alpha = r)."""
    prefix = {"high_noise": "transformer.", "low_noise": "transformer_2.", None: "transformer."}[owner]
    for key in ("alpha_pattern", "rank_pattern"):
        if meta.get(prefix + key):
            raise WanexpError(f"LoRA metadata {prefix}{key} (per-module ranks or alphas) is not supported; "
                              "merge the LoRA with diffusers' fuse_lora and pass the fused pipeline instead")
    if meta.get(prefix + "use_dora"):
        raise WanexpError("DoRA adapters are not LoRAs and cannot be merged as W + B A")
    alpha, rank = meta.get(prefix + "lora_alpha"), meta.get(prefix + "r")
    if alpha is None:
        return 1.0
    return float(alpha) / float(rank or parts[".lora_A.weight"].shape[0])


def _check_shapes(spec: LoraSpec, expert: str, name: str, layer: nn.Module, parts: dict, alpha: float) -> _Update:
    down, up, bias = parts[".lora_A.weight"], parts[".lora_B.weight"], parts.get(".lora_B.bias")
    if type(layer) is not nn.Linear:
        what = "already quantized" if type(layer).__name__ == "QuantLinear" else f"a {type(layer).__name__}"
        raise WanexpError(f"LoRA {spec.path} targets {expert}:{name}, which is {what}, not a BF16 linear "
                          "(merge LoRAs into the BF16 pipeline, before quantizing)")
    ok = (down.ndim == 2 and up.ndim == 2 and down.shape[1] == layer.in_features
          and up.shape[0] == layer.out_features and up.shape[1] == down.shape[0])
    if not ok:
        raise WanexpError(f"LoRA {spec.path} does not fit {expert}:{name} (a LoRA for another architecture): the layer "
                          f"is {layer.out_features}×{layer.in_features} but lora_B·lora_A is "
                          f"{list(up.shape)}·{list(down.shape)}")
    if bias is not None and (layer.bias is None or bias.shape != layer.bias.shape):
        raise WanexpError(f"LoRA {spec.path} has a lora_B.bias for {expert}:{name}, which has no bias of that shape")
    return _Update(expert, name, down, up, bias, spec.scale * alpha)


@torch.no_grad()
def _apply(layer: nn.Linear, u: _Update) -> None:
    """W ← W + s·B·A in fp32 on the weight's device, rounded once to the weight's dtype."""
    w = layer.weight
    delta = u.up.to(w.device, torch.float32) @ u.down.to(w.device, torch.float32)
    w.copy_((w.float() + u.scale * delta).to(w.dtype))
    if u.bias is not None:
        layer.bias.copy_((layer.bias.float() + u.scale * u.bias.to(layer.bias.device, torch.float32)).to(layer.bias.dtype))
