"""Reader for the OpenS2V-Eval image-to-video set (layout in EVAL.md).

The dataset root holds ``*_Eval.json`` files mapping sample ids to records (or lists of records)
with at least ``prompt`` and ``img_paths`` (paths relative to the root). An image-to-video model
uses the first image. The category comes from the id prefix; an unknown prefix is an error rather
than a guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from wanexp.errors import WanexpError

# The eight OpenS2V-Eval categories of the seed paper, keyed by the id prefixes that name them.
CATEGORIES = (
    "single_human", "single_object", "single_face", "multiple_humans",
    "multiple_objects", "multiple_faces", "human_object_interaction", "face_object_interaction",
)
PREFIX_TO_CATEGORY = {
    "singlehuman": "single_human",
    "singleobj": "single_object", "singleobject": "single_object",
    "singleface": "single_face",
    "multihuman": "multiple_humans", "multihumans": "multiple_humans", "multiplehuman": "multiple_humans",
    "multiobj": "multiple_objects", "multiobject": "multiple_objects", "multipleobject": "multiple_objects",
    "multiface": "multiple_faces", "multifaces": "multiple_faces", "multipleface": "multiple_faces",
    "humanobj": "human_object_interaction", "humanobject": "human_object_interaction",
    "faceobj": "face_object_interaction", "faceobject": "face_object_interaction",
}

DEFAULT_FILES = ("Open-Domain_Eval.json", "Human-Domain_Eval.json", "Single-Domain_Eval.json")


@dataclass(frozen=True)
class Sample:
    """One image-to-video sample: the id names its video file (``<id>.mp4``)."""

    id: str
    category: str
    prompt: str
    image_path: Path
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def load_image(self):
        from PIL import Image
        if self.extra.get("blank_image"):  # calibration prompts without an image: a fixed blank placeholder
            return Image.new("RGB", (832, 480), (128, 128, 128))
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def category_of(sample_id: str) -> str:
    prefix = re.sub(r"[_\-]?\d+$", "", sample_id).replace("_", "").replace("-", "").lower()
    try:
        return PREFIX_TO_CATEGORY[prefix]
    except KeyError:
        raise WanexpError(
            f"OpenS2V-Eval sample id {sample_id!r} has the unknown category prefix {prefix!r}; "
            f"known prefixes: {', '.join(sorted(PREFIX_TO_CATEGORY))}"
        ) from None


def _records(obj: Any, source: Path) -> Iterable[tuple[str, dict]]:
    """Both layouts: {id: record}, {id: [record, ...]}, or [record-with-id, ...]."""
    if isinstance(obj, dict):
        for sid, rec in obj.items():
            if isinstance(rec, list):
                if not rec:
                    raise WanexpError(f"{source}: sample {sid!r} has an empty record list")
                rec = rec[0]
            yield str(sid), rec
    elif isinstance(obj, list):
        for rec in obj:
            sid = rec.get("id") or rec.get("sample_id") if isinstance(rec, dict) else None
            if not sid:
                raise WanexpError(f"{source}: a record in the list has no 'id' field")
            yield str(sid), rec
    else:
        raise WanexpError(f"{source}: expected a JSON object or list at the top level")


def read_opens2v(root: str | Path, files: Iterable[str] = DEFAULT_FILES) -> list[Sample]:
    """All samples of the listed JSON files, sorted by id; clear errors for every malformed input."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WanexpError(f"OpenS2V-Eval root {root} is not a directory (set data.root=...)")
    samples: dict[str, Sample] = {}
    origin: dict[str, Path] = {}
    for name in files:
        path = root / name
        if not path.is_file():
            raise WanexpError(f"OpenS2V-Eval file {path} is missing (expected under data.root={root})")
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise WanexpError(f"{path} is not valid JSON: {e}") from None
        for sid, rec in _records(obj, path):
            if sid in samples:
                raise WanexpError(f"sample id {sid!r} appears in both {origin[sid].name} and {path.name}; "
                                  "choose the files to read with data.files=[...]")
            samples[sid] = _sample(root, sid, rec, path)
            origin[sid] = path
    if not samples:
        raise WanexpError(f"no samples found in {', '.join(str(root / f) for f in files)}")
    return [samples[k] for k in sorted(samples, key=_natural_key)]


def _sample(root: Path, sid: str, rec: dict, source: Path) -> Sample:
    if not isinstance(rec, dict):
        raise WanexpError(f"{source}: record of {sid!r} is not an object")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise WanexpError(f"{source}: sample {sid!r} has an empty or missing prompt")
    img_paths = rec.get("img_paths")
    if isinstance(img_paths, str):
        img_paths = [img_paths]
    if not img_paths:
        raise WanexpError(f"{source}: sample {sid!r} has no img_paths")
    image = (root / img_paths[0])
    if not image.is_file():
        raise WanexpError(f"{source}: image {img_paths[0]!r} of sample {sid!r} does not resolve to a file under {root}")
    extra = {k: v for k, v in rec.items() if k not in ("prompt",)}
    return Sample(id=sid, category=category_of(sid), prompt=prompt.strip(), image_path=image, extra=extra)


def _natural_key(sid: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", sid)]
