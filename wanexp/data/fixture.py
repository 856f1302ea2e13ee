"""A synthetic data root with the structure of OpenS2V-Eval as published (README, "OpenS2V-Eval").

Three files with the published id pattern: ``Open-Domain_Eval.json`` holds 180 ids in the eight
categories (30/30/30/30/15/15/15/15); ``Single-Domain_Eval.json`` repeats its 90 single-subject
records unchanged; ``Human-Domain_Eval.json`` repeats its 60 single-human and single-face ids, the 30
single-human ones with other (cropped) reference images. 90 records have 1 image, 40 have 2 and 50
have 3, as .jpg and .png. Prompts are drawn from a small made-up vocabulary (never the benchmark's
text); a few end in stray text, as some published prompts do. Used by the tests, and to try the
data check (``python -m wanexp.data check``) without the benchmark.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

# id prefix → (number of ids, reference images per record), in the published file's order.
PUBLISHED_LAYOUT = {
    "singleobj": (30, [1] * 30), "singlehuman": (30, [1] * 30), "singleface": (30, [1] * 30),
    "multiobject": (30, [3] * 30), "humanobj": (15, [2] * 15), "faceobj": (15, [2] * 15),
    "multiface": (15, [2] * 10 + [3] * 5), "multihuman": (15, [3] * 15),
}
SINGLE_DOMAIN = ("singlehuman", "singleface", "singleobj")
HUMAN_DOMAIN = ("singlehuman", "singleface")
HUMAN_DOMAIN_DIFFERS = "singlehuman"  # these records carry other (cropped) images in Human-Domain

_SUBJECTS = ["a glass lantern", "a small robot", "an old sailor", "a girl in a raincoat", "a grey cat",
             "a chess player", "a violin", "a baker", "two hikers", "a paper kite"]
_ACTIONS = ["turns slowly", "is lifted by the wind", "moves toward the camera", "glows softly",
            "is picked up and set down", "looks around and smiles", "spins once"]
_PLACES = ["in a quiet library", "on a rainy street", "at the edge of a lake", "in a sunlit kitchen",
           "under a paper moon", "on a wooden stage"]


def _prompt(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}, steady shot, soft light."
    return text + "\n\nbackground" if rng.random() < 0.05 else text


def _write_image(path: Path, rng: np.random.Generator, size: int) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_opens2v_like(root: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """Write the synthetic root (Images/ and the three JSON files) into ``root``; returns it."""
    root = Path(root)
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    open_domain, k = {}, 0
    for prefix, (count, n_images) in PUBLISHED_LAYOUT.items():
        for i in range(1, count + 1):
            paths = []
            for j in range(n_images[i - 1]):
                rel = f"Images/{prefix}/{i}_{j}.{'jpg' if k % 2 else 'png'}"
                _write_image(root / rel, pixels, image_size)
                paths.append(rel)
                k += 1
            open_domain[f"{prefix}_{i}"] = {"img_paths": paths, "prompt": _prompt(rng),
                                            "synthesis_flag": bool(i % 3 == 0), "class_label": [prefix.rstrip("s")]}
    human_domain = {}
    for sid, rec in open_domain.items():
        prefix = sid.rsplit("_", 1)[0]
        if prefix == HUMAN_DOMAIN_DIFFERS:
            crop = f"Images/{prefix}/crop_man/{sid.rsplit('_', 1)[1]}.png"
            _write_image(root / crop, pixels, image_size)
            human_domain[sid] = {**rec, "img_paths": [crop]}
        elif prefix in HUMAN_DOMAIN:
            human_domain[sid] = dict(rec)
    single_domain = {sid: dict(rec) for sid, rec in open_domain.items() if sid.rsplit("_", 1)[0] in SINGLE_DOMAIN}
    for name, records in (("Open-Domain_Eval.json", open_domain), ("Human-Domain_Eval.json", human_domain),
                          ("Single-Domain_Eval.json", single_domain)):
        (root / name).write_text(json.dumps(records, indent=1))
    return root
