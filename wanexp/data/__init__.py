"""Evaluation samples and the calibration / evaluation splits (never overlapping)."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from wanexp.data.opens2v import CATEGORIES, Sample, category_of, read_opens2v
from wanexp.data.tiny import TINY_FILES, ensure_tiny_dataset
from wanexp.errors import WanexpError

__all__ = ["CATEGORIES", "Sample", "Splits", "category_of", "load_splits", "read_opens2v"]


class Splits:
    def __init__(self, calib: list[Sample], eval: list[Sample]):
        overlap = {s.id for s in calib} & {s.id for s in eval}
        if overlap:
            raise WanexpError(f"calibration and evaluation splits overlap on {sorted(overlap)}")
        self.calib, self.eval = calib, eval


def load_splits(cfg: Mapping[str, Any], cache_dir: str | Path) -> Splits:
    """Read the dataset named by ``cfg`` (the ``data`` group) and cut the two splits.

    Unless ids are listed explicitly, a seeded permutation of the ids gives the calibration split
    first and the evaluation split from the rest, so the two never share a sample. A separate prompt
    file can feed calibration instead (then evaluation may use every sample).
    """
    if cfg.get("root"):
        root = Path(cfg["root"]).expanduser()
        files = cfg.get("files") or None
    elif cfg.get("name") == "tiny":
        root, files = ensure_tiny_dataset(cache_dir), TINY_FILES
    else:
        raise WanexpError(f"data.root is not set for data={cfg.get('name')}: point it at your OpenS2V-Eval folder "
                          "(data.root=/path/to/OpenS2V-Eval) or set WANEXP_OPENS2V_ROOT")
    samples = read_opens2v(root, files) if files else read_opens2v(root)
    by_id = {s.id: s for s in samples}

    calib_cfg, eval_cfg = cfg.get("calib") or {}, cfg.get("eval") or {}
    order = list(by_id)
    random.Random(int(cfg.get("split_seed", 0))).shuffle(order)

    if calib_cfg.get("prompts_file"):
        calib = _prompt_file_samples(Path(calib_cfg["prompts_file"]).expanduser(), calib_cfg.get("num_samples"))
        remaining = order
    elif calib_cfg.get("ids"):
        calib = [_pick(by_id, i, "data.calib.ids") for i in calib_cfg["ids"]]
        remaining = [i for i in order if i not in set(calib_cfg["ids"])]
    else:
        n = int(calib_cfg.get("num_samples", 0))
        calib, remaining = [by_id[i] for i in order[:n]], order[n:]

    if eval_cfg.get("ids"):
        evals = [_pick(by_id, i, "data.eval.ids") for i in eval_cfg["ids"]]
    else:
        n = eval_cfg.get("num_samples")
        chosen = remaining if n is None else remaining[: int(n)]
        if n is not None and len(chosen) < int(n):
            raise WanexpError(f"data.eval.num_samples={n} but only {len(remaining)} samples remain after the "
                              f"calibration split ({len(calib)}) of {len(samples)} in {root}")
        evals = sorted((by_id[i] for i in chosen), key=lambda s: order.index(s.id))
    if not evals:
        raise WanexpError(f"the evaluation split is empty ({len(samples)} samples in {root}, "
                          f"{len(calib)} used for calibration)")
    condition = cfg.get("image_condition") or "reference"
    if condition == "blank":  # text-to-video through the I2V model: one fixed blank image everywhere
        calib, evals = _blank(calib), _blank(evals)
    elif condition != "reference":
        raise WanexpError(f"data.image_condition={condition} is unknown (reference | blank)")
    return Splits(calib, evals)


def _blank(samples: list[Sample]) -> list[Sample]:
    return [replace(s, extra={**s.extra, "blank_image": True}) for s in samples]


def _pick(by_id: dict[str, Sample], sid: str, key: str) -> Sample:
    if sid not in by_id:
        raise WanexpError(f"{key} names {sid!r}, which is not in the dataset")
    return by_id[sid]


def _prompt_file_samples(path: Path, n: int | None) -> list[Sample]:
    """Calibration prompts from a JSON list (strings or {prompt, image}); no image → a blank frame."""
    if not path.is_file():
        raise WanexpError(f"data.calib.prompts_file {path} does not exist")
    items = json.loads(path.read_text())
    out = []
    for k, item in enumerate(items[: n or None]):
        rec = {"prompt": item} if isinstance(item, str) else dict(item)
        if not str(rec.get("prompt", "")).strip():
            raise WanexpError(f"{path}: calibration prompt #{k} is empty")
        image = Path(rec["image"]).expanduser() if rec.get("image") else None
        if image is not None and not image.is_file():
            raise WanexpError(f"{path}: calibration image {image} does not exist")
        out.append(Sample(id=f"calib_{k}", category="calibration", prompt=rec["prompt"],
                          image_path=image or Path(""), extra={"blank_image": image is None}))
    return out
