"""Evaluation samples and the calibration / evaluation splits.

By default the two splits never share a sample. The seed paper calibrates on samples it also
evaluates; that happens only when ``data.calib.overlap_eval=true`` asks for it, and the results row
records what was calibrated on and how much of it was evaluated.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from wanexp.data.opens2v import CATEGORIES, Sample, category_of, read_opens2v
from wanexp.data.tiny import TINY_FILES, ensure_tiny_dataset
from wanexp.errors import WanexpError

__all__ = ["CATEGORIES", "Sample", "Splits", "calib_record", "category_of", "load_splits", "read_opens2v",
           "sample_table"]

# Calibration prompt files shipped with wanexp: data.calib.prompts_file=<name> picks one.
PROMPTS_DIR = Path(__file__).parent / "prompts"


class Splits:
    """The calibration and evaluation samples of a run, and where calibration came from."""

    def __init__(self, calib: list[Sample], eval: list[Sample], overlap_allowed: bool = False,
                 calib_source: str = "data"):
        overlap = {s.id for s in calib} & {s.id for s in eval}
        if overlap and not overlap_allowed:
            raise WanexpError(f"calibration and evaluation splits overlap on {sorted(overlap)}; "
                              "set data.calib.overlap_eval=true to allow it")
        self.calib, self.eval, self.calib_source = calib, eval, calib_source

    @property
    def overlap(self) -> list[str]:
        """Ids calibrated on that are evaluated too, in calibration order."""
        evaluated = {s.id for s in self.eval}
        return [s.id for s in self.calib if s.id in evaluated]


def load_splits(cfg: Mapping[str, Any], cache_dir: str | Path) -> Splits:
    """Read the dataset named by ``cfg`` (the ``data`` group) and cut the two splits.

    A seeded permutation of the ids orders the samples. Calibration takes ``calib.ids``, or the first
    ``calib.num_samples`` of that order, or the prompts of ``calib.prompts_file``. Evaluation takes
    ``eval.ids``, or the rest of the order (the first ``eval.num_samples`` of it); with
    ``calib.overlap_eval`` the calibration samples follow at its end, so the whole set is evaluated
    while a partial evaluation takes samples not calibrated on first.
    """
    root, samples = read_samples(cfg, cache_dir)
    by_id = {s.id: s for s in samples}
    calib_cfg, eval_cfg = cfg.get("calib") or {}, cfg.get("eval") or {}
    overlap = bool(calib_cfg.get("overlap_eval"))
    order = list(by_id)
    random.Random(int(cfg.get("split_seed", 0))).shuffle(order)

    source = "data"
    if calib_cfg.get("prompts_file"):
        path = prompts_path(calib_cfg["prompts_file"])
        calib, source = _prompt_file_samples(path, calib_cfg.get("num_samples")), f"prompts_file:{path}"
    elif calib_cfg.get("ids"):
        calib = [_pick(by_id, i, "data.calib.ids") for i in calib_cfg["ids"]]
    else:
        n = int(calib_cfg.get("num_samples") or 0)
        if n > len(order):
            raise WanexpError(f"data.calib.num_samples={n} but {root} holds only {len(order)} samples")
        calib = [by_id[i] for i in order[:n]]
    calib_ids = [s.id for s in calib if s.id in by_id]
    eval_order = [i for i in order if i not in set(calib_ids)] + (calib_ids if overlap else [])

    if eval_cfg.get("ids"):
        evals = [_pick(by_id, i, "data.eval.ids") for i in eval_cfg["ids"]]
    else:
        n = eval_cfg.get("num_samples")
        if n is not None and len(eval_order) < int(n):
            raise WanexpError(f"data.eval.num_samples={n} but only {len(eval_order)} samples remain after the "
                              f"calibration split ({len(calib)}) of {len(samples)} in {root}")
        evals = [by_id[i] for i in (eval_order if n is None else eval_order[: int(n)])]
    if not evals:
        raise WanexpError(f"the evaluation split is empty ({len(samples)} samples in {root}, "
                          f"{len(calib)} used for calibration)")
    condition = cfg.get("image_condition") or "reference"
    if condition == "blank":  # text-to-video through the I2V model: one fixed blank image everywhere
        calib, evals = _blank(calib), _blank(evals)
    elif condition != "reference":
        raise WanexpError(f"data.image_condition={condition} is unknown (reference | blank)")
    return Splits(calib, evals, overlap_allowed=overlap, calib_source=source)


def read_samples(cfg: Mapping[str, Any], cache_dir: str | Path) -> tuple[Path, list[Sample]]:
    """The data root named by the ``data`` config and every sample of the files it reads."""
    if cfg.get("root"):
        root = Path(cfg["root"]).expanduser()
        files = cfg.get("files") or None
    elif cfg.get("name") == "tiny":
        root, files = ensure_tiny_dataset(cache_dir), TINY_FILES
    else:
        raise WanexpError(f"data.root is not set for data={cfg.get('name')}: point it at your OpenS2V-Eval folder "
                          "(data.root=/path/to/OpenS2V-Eval) or set WANEXP_OPENS2V_ROOT")
    on_conflict = str(cfg.get("on_conflict") or "error")
    samples = read_opens2v(root, files, on_conflict) if files else read_opens2v(root, on_conflict=on_conflict)
    return root, samples


def calib_record(splits: Splits, calibrated: bool) -> dict[str, Any]:
    """The results row's account of calibration: what it ran on, and how much of it was evaluated too
    (nothing when the method calibrated on nothing)."""
    used = splits.calib if calibrated else []
    evaluated = {s.id for s in splits.eval}
    in_eval = [s.id for s in used if s.id in evaluated]
    return {"calib_source": splits.calib_source if used else None, "num_calib_samples": len(used),
            "calib_samples": " ".join(s.id for s in used) or None,
            "calib_overlaps_eval": bool(in_eval), "num_calib_in_eval": len(in_eval)}


def sample_table(samples: list[Sample]):
    """Per evaluated sample, what the data says of it beyond its id: the number of reference images."""
    import pandas as pd
    return pd.DataFrame({"id": [s.id for s in samples], "num_ref_images": [s.num_images for s in samples]})


def prompts_path(value: str) -> Path:
    """A prompts file: a path, or the name of one shipped in ``wanexp/data/prompts/``."""
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path
    shipped = PROMPTS_DIR / path.name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.json")))
    raise WanexpError(f"data.calib.prompts_file {value} does not exist (a path, or one shipped with wanexp: {names})")


def _blank(samples: list[Sample]) -> list[Sample]:
    return [replace(s, extra={**s.extra, "blank_image": True}) for s in samples]


def _pick(by_id: dict[str, Sample], sid: str, key: str) -> Sample:
    if sid not in by_id:
        raise WanexpError(f"{key} names {sid!r}, which is not in the dataset")
    return by_id[sid]


def _prompt_file_samples(path: Path, n: int | None) -> list[Sample]:
    """Calibration prompts from a JSON list (strings or {prompt, image}); no image → a blank frame."""
    try:
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WanexpError(f"data.calib.prompts_file {path} is not valid JSON: {e}") from None
    if not isinstance(items, list) or not items:
        raise WanexpError(f"data.calib.prompts_file {path} must hold a non-empty JSON list of prompts")
    if n is not None and int(n) > len(items):
        raise WanexpError(f"data.calib.num_samples={n} but {path} holds only {len(items)} prompts")
    out = []
    for k, item in enumerate(items[: int(n) if n is not None else None]):
        rec = {"prompt": item} if isinstance(item, str) else dict(item)
        if not str(rec.get("prompt", "")).strip():
            raise WanexpError(f"{path}: calibration prompt #{k} is empty")
        image = Path(rec["image"]).expanduser() if rec.get("image") else None
        if image is not None and not image.is_file():
            raise WanexpError(f"{path}: calibration image {image} does not exist")
        out.append(Sample(id=f"calib_{k}", category="calibration", prompt=str(rec["prompt"]).strip(),
                          image_path=image or Path(""), extra={"blank_image": image is None}, source=str(path)))
    return out
