"""Procedurally drawn short captioned videos: the training data of the trained tiny Wan2.2-I2V.

Each clip is one or two objects (a kind, a colour, a motion) over a textured background, filmed by a
camera that is still or pans; the caption names all of it ("a red circle moves right and a blue
square stays still on a striped background, the camera pans left"). Everything is drawn by numpy
from a seed, so the same seed gives the same clip, byte for byte, on every machine.

Geometry: the scene lives in world coordinates (pixels of the output frame); a camera pan moves the
window over the world, so the background texture and every object shift together in the frame,
while an object's own motion shifts it alone. Edges are anti-aliased by drawing at twice the size
and averaging 2x2 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("circle", "square", "triangle", "ring", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "purple": (150, 60, 200), "orange": (250, 140, 30), "cyan": (40, 210, 220),
}
# world pixels per frame (x right, y down); "grows"/"shrinks" change the size instead
MOTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
           "stays still": (0, 0), "grows": (0, 0), "shrinks": (0, 0)}
# each motion for another: a direction for its opposite, still -> grows -> shrinks -> still (the caption
# and the clip of a scene with its motions swapped: what a model that ignores the motion words cannot tell apart)
MOTION_SWAP = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
               "moves down": "moves up", "stays still": "grows", "grows": "shrinks", "shrinks": "stays still"}
PANS = {"the camera is still": 0, "the camera pans left": -1, "the camera pans right": 1}
TEXTURES = ("plain", "striped", "checkered", "dotted", "gradient")
# muted background palettes (two tones each), never close to an object colour
_BACKDROPS = ((60, 60, 70), (110, 100, 90), (40, 70, 60), (90, 80, 120), (150, 140, 120), (70, 50, 45))
SPEED = 4.0          # world pixels per frame of an object's motion
PAN_SPEED = 3.0      # world pixels per frame of a camera pan
_SS = 2              # supersampling factor (anti-aliasing)


@dataclass(frozen=True)
class Thing:
    kind: str
    colour: str
    motion: str
    x: float          # centre at frame 0, world pixels
    y: float
    size: float       # half-extent, pixels

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind} {self.motion}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    texture: str
    pan: str
    backdrop: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture_period: float
    texture_angle: float
    height: int
    width: int
    frames: int
    speed: float = SPEED  # world pixels per frame of the objects' motions

    @property
    def caption(self) -> str:
        objects = " and ".join(t.phrase() for t in self.things)
        return f"{objects} on a {self.texture} background, {self.pan}"


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray            # uint8 [frames, height, width, 3]
    caption: str
    scene: Scene = field(repr=False)


@dataclass(frozen=True)
class DataOptions:
    """What a clip may show, beyond the fixed vocabulary. The defaults are the data the shipped proxy
    was first trained on; each option only narrows or speeds it up, so every caption stays in the
    tokenizer's vocabulary."""
    speed: float = SPEED                      # world pixels per frame of an object's motion
    motions: tuple[str, ...] = tuple(MOTIONS)  # the motions drawn from (a subset of MOTIONS)
    max_objects: int = 2                      # 1: every clip shows one object

    def __post_init__(self):
        unknown = [m for m in self.motions if m not in MOTIONS]
        if unknown or not self.motions:
            raise ValueError(f"motions must be a non-empty subset of {list(MOTIONS)}; got {list(self.motions)}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, got {self.speed}")

    @classmethod
    def parse_motions(cls, text: str) -> tuple[str, ...]:
        """A comma-separated list of motions ("moves left,moves right"); empty: all of MOTIONS."""
        return tuple(m.strip() for m in text.split(",") if m.strip()) or tuple(MOTIONS)


def random_scene(rng: np.random.Generator, height: int = 64, width: int = 64, frames: int = 5,
                 options: DataOptions = DataOptions()) -> Scene:
    """Draw a scene's description (no pixels) from ``rng``. The default ``options`` draw exactly what they
    drew before the options existed (the same draws from ``rng``)."""
    n = 1 if rng.random() < 0.6 or options.max_objects == 1 else 2
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    things = []
    for colour in colours:
        size = float(rng.uniform(0.12, 0.2) * min(height, width))
        things.append(Thing(kind=str(rng.choice(KINDS)), colour=str(colour), motion=str(rng.choice(list(options.motions))),
                            x=float(rng.uniform(0.3, 0.7) * width), y=float(rng.uniform(0.3, 0.7) * height),
                            size=size))
    pair = rng.choice(len(_BACKDROPS), size=2, replace=False)
    return Scene(things=tuple(things), texture=str(rng.choice(TEXTURES)), pan=str(rng.choice(list(PANS))),
                 backdrop=(_BACKDROPS[pair[0]], _BACKDROPS[pair[1]]), texture_period=float(rng.uniform(8, 16)),
                 texture_angle=float(rng.uniform(0, np.pi)), height=height, width=width, frames=frames,
                 speed=options.speed)


def camera_offset(scene: Scene, f: int) -> float:
    """World x of the frame's left edge at frame ``f``."""
    return PANS[scene.pan] * PAN_SPEED * f


def thing_at(thing: Thing, f: int, speed: float) -> tuple[float, float, float]:
    """World centre and half-extent of ``thing`` at frame ``f``, moving ``speed`` world pixels a frame
    (its scene's ``speed``: no default, which would place a faster scene's objects at the shipped speed)."""
    dx, dy = MOTIONS[thing.motion]
    grow = {"grows": 1.0, "shrinks": -1.0}.get(thing.motion, 0.0)
    return thing.x + dx * speed * f, thing.y + dy * speed * f, max(2.0, thing.size * (1 + 0.15 * grow * f))


def _background(scene: Scene, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    a, b = (np.asarray(c, dtype=np.float32) for c in scene.backdrop)
    p, th = scene.texture_period, scene.texture_angle
    if scene.texture == "plain":
        w = np.zeros_like(wx)
    elif scene.texture == "striped":
        w = (np.sin(2 * np.pi * (wx * np.cos(th) + wy * np.sin(th)) / p) > 0).astype(np.float32)
    elif scene.texture == "checkered":
        w = ((np.floor(wx / p) + np.floor(wy / p)) % 2).astype(np.float32)
    elif scene.texture == "dotted":
        fx, fy = (wx / p) % 1 - 0.5, (wy / p) % 1 - 0.5
        w = (fx * fx + fy * fy < 0.09).astype(np.float32)
    else:  # gradient along the texture angle, in world space (so a pan slides it)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * (wx * np.cos(th) + wy * np.sin(th)) / (6 * p))
    return a + (b - a) * w[..., None]


def _coverage(kind: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    """Which supersampled pixels (offsets from the centre) the shape covers."""
    if kind == "circle":
        return dx * dx + dy * dy <= s * s
    if kind == "square":
        return (np.abs(dx) <= s * 0.85) & (np.abs(dy) <= s * 0.85)
    if kind == "triangle":  # apex up, base at +s
        return (dy <= s) & (dy >= -s) & (np.abs(dx) <= (dy + s) * 0.55)
    if kind == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= s * s) & (r2 >= (0.55 * s) ** 2)
    if kind == "cross":
        arm = 0.3 * s
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= s)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= s))
    raise ValueError(f"unknown object kind {kind!r}")


def render(scene: Scene) -> np.ndarray:
    """The scene's frames, uint8 [frames, height, width, 3]."""
    h, w = scene.height * _SS, scene.width * _SS
    sy, sx = (np.mgrid[0:h, 0:w].astype(np.float32) + 0.5) / _SS  # frame pixel coordinates
    out = np.empty((scene.frames, scene.height, scene.width, 3), dtype=np.uint8)
    for f in range(scene.frames):
        cam = camera_offset(scene, f)
        wx, wy = sx + cam, sy
        img = _background(scene, wx, wy)
        for thing in scene.things:  # later things are drawn on top
            cx, cy, s = thing_at(thing, f, scene.speed)
            mask = _coverage(thing.kind, wx - cx, wy - cy, s)
            img[mask] = COLOURS[thing.colour]
        img = img.reshape(scene.height, _SS, scene.width, _SS, 3).mean(axis=(1, 3))
        out[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def with_motions_swapped(scene: Scene) -> Scene:
    """The same scene with every object's motion replaced by its ``MOTION_SWAP`` (camera, places, sizes kept)."""
    return replace(scene, things=tuple(replace(t, motion=MOTION_SWAP[t.motion]) for t in scene.things))


def without_objects(scene: Scene) -> Scene:
    """The same scene's background alone (the camera still pans)."""
    return replace(scene, things=())


def vocabulary() -> list[str]:
    """Every caption phrase, for training the tokenizer of the trained tiny model."""
    words = [*KINDS, *COLOURS, *MOTIONS, *PANS, *TEXTURES, "an", "and", "on a", "background,"]
    return [" ".join(words)] + [f"a {c} {k} {m} on a {t} background, {p}" for c, k, m, t, p in
                                zip(COLOURS, KINDS * 2, list(MOTIONS) * 2, TEXTURES * 2, list(PANS) * 3)]


def make_clip(seed: int, height: int = 64, width: int = 64, frames: int = 5,
              options: DataOptions = DataOptions()) -> Clip:
    """One captioned clip; the same ``seed`` (and ``options``) gives the same clip."""
    scene = random_scene(np.random.default_rng(seed), height, width, frames, options)
    return Clip(frames=render(scene), caption=scene.caption, scene=scene)


def make_clips(seed: int, count: int, height: int = 64, width: int = 64, frames: int = 5,
               options: DataOptions = DataOptions()) -> list[Clip]:
    """``count`` clips, the i-th drawn from (``seed``, i): a set is a pure function of its seed (and ``options``)."""
    seqs = np.random.SeedSequence(seed).spawn(count)
    return [Clip(frames=render(s := random_scene(np.random.default_rng(q), height, width, frames, options)),
                 caption=s.caption, scene=s) for q in seqs]
