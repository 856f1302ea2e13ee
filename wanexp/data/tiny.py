"""The ``data=tiny`` fixture: 8 samples, one per OpenS2V-Eval category, in OpenS2V-Eval's own layout.

The images are drawn by code (seeded shapes on a gradient), so the fixture ships as a few lines
and is read by the same reader as the real dataset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from wanexp.io import make_temp_dir

FIXTURE_VERSION = 1
_SAMPLES = {
    "Human-Domain_Eval.json": {
        "singlehuman_1": "a man in a blue jacket walks along a beach at sunset, waves behind him",
        "singleface_1": "close-up of a smiling woman turning her head toward the window light",
        "multihuman_1": "two children run across a playground and wave at the camera",
        "multiface_1": "two friends look at each other and laugh, faces lit by a campfire",
    },
    "Open-Domain_Eval.json": {
        "singleobj_1": "a red teapot on a wooden table, steam rising slowly from its spout",
        "multiobject_1": "a yellow ball rolls past a green cube and a blue cone on the floor",
        "humanobj_1": "a woman lifts a white cup of coffee and takes a sip by the window",
        "faceobj_1": "a man's face close to a glowing candle, he gently blows it out",
    },
}


def _image(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, size=3)
    img = np.stack([base[c] * (1 - 0.5 * yy) + 80 * xx for c in range(3)], axis=-1)
    for _ in range(3):  # a few discs of random colour: an object or a face, for a video model
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def ensure_tiny_dataset(cache_dir: str | Path) -> Path:
    """Write the fixture once (atomically) and return its root."""
    from PIL import Image

    cache_dir = Path(cache_dir).expanduser()
    root = cache_dir / f"opens2v-eval-tiny-v{FIXTURE_VERSION}"
    if (root / ".complete").exists():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(cache_dir, ".build-")  # the mode of a plain mkdir, not mkdtemp's 0700
    try:
        seed = 0
        for json_name, prompts in _SAMPLES.items():
            records = {}
            for sid, prompt in prompts.items():
                rel = f"Images/{json_name.split('_')[0]}/{sid}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_image(seed)).save(tmp / rel)
                records[sid] = {"prompt": prompt, "img_paths": [rel]}
                seed += 1
            (tmp / json_name).write_text(json.dumps(records, indent=2))
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(root)
        except OSError:
            if not (root / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


TINY_FILES = tuple(_SAMPLES)
