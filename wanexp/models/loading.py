"""Load a Wan2.2-I2V pipeline: the tiny default or a user's local A14B checkpoint, by one code path.

Both go through ``WanImageToVideoPipeline.from_pretrained`` on a local diffusers-format directory;
the tiny model is only special in that we write its directory ourselves first. Nothing here ever
reaches a hub: ``local_files_only`` is always set, and a missing or incomplete directory is reported
before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from wanexp.errors import WanexpError
from wanexp.formats.base import dtype_from_name
from wanexp.models.a14b_random import load_random_pipeline
from wanexp.models.base import place_pipeline, quiet_libraries  # noqa: F401 (place_pipeline: for callers)
from wanexp.models.experts import experts
from wanexp.models.lora import check_specs, merge_loras
from wanexp.models.tiny import MODEL_INDEX_COMPONENTS, ensure_tiny_checkpoint

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def resolve_model_dir(cfg: Mapping[str, Any], cache_dir: str | Path) -> Path:
    """The local diffusers directory for ``cfg`` (the ``model`` group), checked for completeness."""
    from wanexp.models.tiny import WEIGHTS
    if cfg["name"] in WEIGHTS:  # tiny (trained, shipped in the package) | tiny_random (seeded random)
        return ensure_tiny_checkpoint(cache_dir, WEIGHTS[cfg["name"]])
    env = cfg.get("path_env") or "WANEXP_WAN22_I2V_A14B"
    raw = cfg.get("path") or os.environ.get(env)
    if not raw:
        raise WanexpError(f"model={cfg['name']} needs a local diffusers-format checkpoint: set model.path=/path/to/"
                          f"Wan2.2-I2V-A14B-Diffusers or the environment variable {env} (nothing is downloaded)")
    path = Path(str(raw)).expanduser()
    check_model_dir(path)
    return path


def check_model_dir(path: Path) -> None:
    """Raise one clear error listing every expected file that is missing under ``path``."""
    if not path.is_dir():
        raise WanexpError(f"model directory {path} does not exist (expected a diffusers-format Wan2.2-I2V-A14B "
                          f"checkpoint with model_index.json and subfolders {', '.join(MODEL_INDEX_COMPONENTS)})")
    missing = []
    if not (path / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub in MODEL_INDEX_COMPONENTS:
        folder = path / sub
        if not folder.is_dir():
            missing.append(f"{sub}/")
            continue
        names = [p.name for p in folder.iterdir()]
        if sub == "tokenizer":
            if not any(n.startswith(("tokenizer", "spiece")) for n in names):
                missing.append(f"{sub}/tokenizer.json or spiece.model")
            continue
        config = "scheduler_config.json" if sub == "scheduler" else "config.json"
        if config not in names:
            missing.append(f"{sub}/{config}")
        if sub != "scheduler" and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
            missing.append(f"{sub}/*.safetensors (weights)")
    if missing:
        raise WanexpError(f"model directory {path} is incomplete: missing {', '.join(missing)}")
    index = json.loads((path / "model_index.json").read_text())
    if index.get("_class_name") != "WanImageToVideoPipeline" or not index.get("transformer_2"):
        raise WanexpError(f"{path}/model_index.json describes {index.get('_class_name')} without transformer_2; "
                          "wanexp needs the two-expert Wan2.2-I2V pipeline (WanImageToVideoPipeline)")


def load_pipeline(cfg: Mapping[str, Any], cache_dir: str | Path, device: str | torch.device = "cpu"):
    """Load the pipeline, place it on ``device`` according to ``cfg.offload``, and quiet its logging."""
    quiet_libraries()
    from diffusers import WanImageToVideoPipeline
    loras = check_specs(cfg.get("lora"))  # a missing or unreadable LoRA file fails before any weight is read
    if cfg["name"] == "a14b_random":  # full size, random weights, built in memory (no checkpoint)
        pipe = load_random_pipeline(cfg, torch.device(device))
        merge_loras(pipe, loras)
        return pipe
    path = resolve_model_dir(cfg, cache_dir)
    try:
        dtype = dtype_from_name(str(cfg.get("dtype", "bf16")))
    except ValueError as err:
        raise WanexpError(f"model.dtype={cfg.get('dtype')!r}: {err}") from None
    try:
        pipe = WanImageToVideoPipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, image_encoder=None, image_processor=None)
    except (OSError, ValueError, EnvironmentError) as err:
        raise WanexpError(f"could not load the pipeline from {path}: {str(err).splitlines()[0]}") from err
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, str(cfg.get("offload", "none")), torch.device(device), bool(cfg.get("vae_tiling", False)))
    merge_loras(pipe, loras)  # into the BF16 experts, before anything calibrates (wanexp.models.lora)
    return pipe


def model_fingerprint(pipe) -> str:
    """A short hash of both experts' configs and a sample of their weights: artifacts are tied to it."""
    h = hashlib.sha256()
    for name, module in experts(pipe).items():
        h.update(name.encode())
        config = dict(module.config)
        if "_use_default_values" in config:  # diffusers builds this list from a set: its order varies by process
            config["_use_default_values"] = sorted(config["_use_default_values"])
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        loras = getattr(module, "_wanexp_loras", None)
        if loras:  # merged LoRAs (wanexp.models.lora): an artifact made with them is refused without them
            h.update(json.dumps(loras, sort_keys=True).encode())
        for pname, p in module.named_parameters():
            if p.ndim >= 2:  # the first row of every matrix: cheap, yet any other checkpoint differs
                h.update(pname.encode())
                h.update(p.detach()[0, :64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def held_bytes(*modules: torch.nn.Module) -> int:
    """Bytes the modules actually hold: every parameter and buffer (packed codes and scales as
    stored), each storage counted once."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def pipeline_bytes(pipe) -> int:
    """Every weight the pipeline holds (both experts, text encoder, VAE): the papers' model size."""
    return held_bytes(*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)))
