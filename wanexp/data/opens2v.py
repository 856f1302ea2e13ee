"""Reader for the OpenS2V-Eval subject-to-video benchmark (layout in README, "OpenS2V-Eval").

The dataset root holds ``*_Eval.json`` files mapping sample ids to records (or lists of records)
with at least ``prompt`` and ``img_paths`` (paths relative to the root). An image-to-video model
uses the first image. The category comes from the id prefix; an unknown prefix is an error rather
than a guess.

The published files overlap: ``Single-Domain_Eval.json`` and ``Human-Domain_Eval.json`` reuse ids
of ``Open-Domain_Eval.json``, the first with identical records, the second partly with other
reference images. Reading several files therefore merges identical repeats into one sample and
refuses differing ones unless the user names the winner (``on_conflict``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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

OPEN_DOMAIN = "Open-Domain_Eval.json"  # the seed paper's 180 samples, all eight categories
KNOWN_FILES = (OPEN_DOMAIN, "Human-Domain_Eval.json", "Single-Domain_Eval.json")
DEFAULT_FILES = (OPEN_DOMAIN,)
ON_CONFLICT = ("error", "first", "last")  # or the name of one of the files read


@dataclass(frozen=True)
class Sample:
    """One image-to-video sample: the id names its video file (``<id>.mp4``)."""

    id: str
    category: str
    prompt: str
    image_path: Path
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False)  # the JSON file the record came from

    @property
    def num_images(self) -> int:
        """Reference images of the record (the model is conditioned on the first, or on a blank image)."""
        if "img_paths" in self.extra:
            return len(image_paths(self.extra))
        return 0 if self.extra.get("blank_image") else 1

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


def load_records(path: Path) -> dict[str, dict]:
    """One JSON file as {id: record}, in file order; a repeated id inside one file is refused.

    Both layouts: {id: record} / {id: [record, ...]} (the first record), or [record-with-id, ...]."""
    if not path.is_file():
        raise WanexpError(f"OpenS2V-Eval file {path} is missing")
    try:
        obj = json.loads(path.read_text(), object_pairs_hook=_pairs)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WanexpError(f"{path} is not valid JSON: {e}") from None
    if isinstance(obj, _Pairs):
        items = []
        for sid, rec in obj:
            if isinstance(rec, list) and not isinstance(rec, _Pairs):  # a list of records: the first
                if not rec:
                    raise WanexpError(f"{path}: sample {sid!r} has an empty record list")
                rec = rec[0]
            items.append((str(sid), _plain(rec)))
    elif isinstance(obj, list):
        items = []
        for rec in map(_plain, obj):
            sid = (rec.get("id") or rec.get("sample_id")) if isinstance(rec, dict) else None
            if not sid:
                raise WanexpError(f"{path}: a record in the list has no 'id' field")
            items.append((str(sid), rec))
    else:
        raise WanexpError(f"{path}: expected a JSON object or list at the top level")
    records: dict[str, dict] = {}
    for sid, rec in items:
        if sid in records:
            raise WanexpError(f"{path}: sample id {sid!r} appears twice in the file")
        if not isinstance(rec, dict):
            raise WanexpError(f"{path}: record of {sid!r} is not an object")
        records[sid] = rec
    return records


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so repeated keys are seen rather than dropped."""


def _pairs(pairs):
    return _Pairs(pairs)


def _plain(obj):
    """Nested objects back to dicts (only the top level needs its pairs)."""
    if isinstance(obj, _Pairs):
        return {k: _plain(v) for k, v in obj}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def differing_fields(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def merge_records(per_file: dict[str, dict[str, dict]], on_conflict: str = "error") -> dict[str, tuple[str, dict]]:
    """{id: (file, record)} over the files in order: an identical repeat is one sample; a differing one
    is refused (naming both files and the fields) unless ``on_conflict`` picks the winner: ``first``
    (the seed paper code's rule), ``last``, or a file name."""
    names = list(per_file)
    if on_conflict not in ON_CONFLICT and on_conflict not in names:
        raise WanexpError(f"data.on_conflict={on_conflict} is not one of {', '.join(ON_CONFLICT)} "
                          f"or a file read ({', '.join(names)})")
    merged: dict[str, tuple[str, dict]] = {}
    conflicts: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
    for name in names:
        for sid, rec in per_file[name].items():
            if sid not in merged:
                merged[sid] = (name, rec)
                continue
            old_name, old = merged[sid]
            if old == rec:
                continue
            if on_conflict == "error":
                conflicts.setdefault((old_name, name), []).append((sid, differing_fields(old, rec)))
            elif on_conflict == "last" or on_conflict == name:
                merged[sid] = (name, rec)
    if conflicts:
        raise WanexpError(_conflict_message(conflicts))
    return merged


def _conflict_message(conflicts: dict) -> str:
    parts = []
    for (a, b), items in conflicts.items():
        fields = sorted({f for _, fs in items for f in fs})
        ids = [sid for sid, _ in items]
        parts.append(f"{len(ids)} sample id(s) differ between {a} and {b} (fields: {', '.join(fields)}; "
                     f"e.g. {', '.join(ids[:3])}{' …' if len(ids) > 3 else ''})")
    return ("; ".join(parts) + ". Choose the winning file (data.on_conflict=first, last or a file name) "
            "or read fewer files (data.files=[...])")


def read_opens2v(root: str | Path, files: Iterable[str] = DEFAULT_FILES, on_conflict: str = "error") -> list[Sample]:
    """The samples of the listed JSON files, merged (see ``merge_records``), sorted by id; a clear
    error for every malformed input (missing file, bad JSON, empty prompt, unresolved first image)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WanexpError(f"OpenS2V-Eval root {root} is not a directory (set data.root=...)")
    files = list(files)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        present = sorted(p.name for p in root.glob("*.json"))
        raise WanexpError(f"OpenS2V-Eval file(s) {', '.join(missing)} missing under data.root={root} "
                          f"(present: {', '.join(present) or 'no JSON file'}; data.files chooses the files)")
    merged = merge_records({name: load_records(root / name) for name in files}, on_conflict)
    if not merged:
        raise WanexpError(f"no samples found in {', '.join(str(root / f) for f in files)}")
    return [to_sample(root, sid, merged[sid][1], str(root / merged[sid][0])) for sid in sorted(merged, key=natural_key)]


def to_sample(root: Path, sid: str, rec: dict, source: str) -> Sample:
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise WanexpError(f"{source}: sample {sid!r} has an empty or missing prompt")
    img_paths = image_paths(rec)
    if not img_paths:
        raise WanexpError(f"{source}: sample {sid!r} has no img_paths")
    image = root / img_paths[0]
    if not image.is_file():
        raise WanexpError(f"{source}: image {img_paths[0]!r} of sample {sid!r} does not resolve to a file under {root}")
    extra = {k: v for k, v in rec.items() if k != "prompt"}
    return Sample(id=sid, category=category_of(sid), prompt=prompt.strip(), image_path=image, extra=extra,
                  source=source)


def image_paths(rec: dict) -> Sequence[str]:
    """The record's reference image paths (a single string is one path; anything else is none)."""
    paths = rec.get("img_paths")
    if isinstance(paths, str):
        paths = [paths]
    return [p for p in paths if isinstance(p, str) and p] if isinstance(paths, list) else []


def natural_key(sid: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", sid)]
