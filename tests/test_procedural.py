import numpy as np
import pytest

from wanexp.models import procedural
from wanexp.models.procedural import COLOURS, KINDS, MOTIONS, PANS, PAN_SPEED, SPEED, TEXTURES, Scene, Thing


def test_same_seed_same_clip_and_different_seeds_differ():
    a, b = procedural.make_clips(7, 6), procedural.make_clips(7, 6)
    assert [c.caption for c in a] == [c.caption for c in b]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    other = procedural.make_clips(8, 6)
    assert not all(np.array_equal(x.frames, y.frames) for x, y in zip(a, other))
    assert a[0].frames.shape == (5, 64, 64, 3) and a[0].frames.dtype == np.uint8
    single = procedural.make_clip(3)
    assert np.array_equal(single.frames, procedural.make_clip(3).frames) and single.caption == procedural.make_clip(3).caption


def test_captions_name_what_is_drawn():
    clips = procedural.make_clips(0, 60)
    seen = {"kind": set(), "colour": set(), "motion": set(), "texture": set(), "pan": set()}
    for clip in clips:
        scene = clip.scene
        assert f"on a {scene.texture} background, {scene.pan}" in clip.caption
        for thing in scene.things:
            assert f"{thing.colour} {thing.kind} {thing.motion}" in clip.caption
            seen["kind"].add(thing.kind), seen["colour"].add(thing.colour), seen["motion"].add(thing.motion)
        seen["texture"].add(scene.texture), seen["pan"].add(scene.pan)
        # every object's colour is in the first frame (objects start inside the frame)
        for thing in scene.things:
            hit = np.all(np.abs(clip.frames[0].astype(int) - COLOURS[thing.colour]) <= 2, axis=-1)
            assert hit.sum() >= 8, (clip.caption, thing)
    assert seen == {"kind": set(KINDS), "colour": set(COLOURS), "motion": set(MOTIONS), "texture": set(TEXTURES),
                    "pan": set(PANS)}
    assert "an orange" in procedural.Thing("circle", "orange", "grows", 0, 0, 5).phrase()


def _centroid(frame, colour):
    mask = np.all(np.abs(frame.astype(int) - colour) <= 2, axis=-1)
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), mask.sum()


@pytest.mark.parametrize("motion", ["moves left", "moves right", "moves up", "moves down", "stays still"])
@pytest.mark.parametrize("pan", list(PANS))
def test_object_moves_as_its_caption_says(motion, pan):
    """In the frame an object moves by its own motion minus the camera's pan, SPEED/PAN_SPEED px a frame."""
    thing = Thing("square", "red", motion, x=32.0, y=32.0, size=6.0)
    scene = Scene(things=(thing,), texture="plain", pan=pan, backdrop=((60, 60, 70), (110, 100, 90)),
                  texture_period=10.0, texture_angle=0.0, height=64, width=64, frames=5)
    frames = procedural.render(scene)
    (x0, y0, _), (x4, y4, _) = _centroid(frames[0], COLOURS["red"]), _centroid(frames[4], COLOURS["red"])
    dx, dy = MOTIONS[motion]
    assert x4 - x0 == pytest.approx(4 * (dx * SPEED - PANS[pan] * PAN_SPEED), abs=0.6)
    assert y4 - y0 == pytest.approx(4 * dy * SPEED, abs=0.6)


def test_grows_and_shrinks_change_the_area_and_a_pan_slides_the_texture():
    sizes = {}
    for motion in ("grows", "shrinks"):
        scene = Scene(things=(Thing("circle", "blue", motion, 32.0, 32.0, 8.0),), texture="plain",
                      pan="the camera is still", backdrop=((60, 60, 70), (110, 100, 90)), texture_period=10.0,
                      texture_angle=0.0, height=64, width=64, frames=5)
        frames = procedural.render(scene)
        sizes[motion] = _centroid(frames[4], COLOURS["blue"])[2] / _centroid(frames[0], COLOURS["blue"])[2]
    assert sizes["grows"] > 2.0 and sizes["shrinks"] < 0.3
    stripes = Scene(things=(), texture="striped", pan="the camera pans left", backdrop=((60, 60, 70), (150, 140, 120)),
                    texture_period=12.0, texture_angle=0.0, height=64, width=64, frames=5)
    frames = procedural.render(stripes).astype(int)
    # vertical stripes panned left by 3 px a frame: frame 1 is frame 0 shifted right by 3 px
    assert np.abs(frames[1][:, 3:] - frames[0][:, :-3]).max() <= 1
    assert np.abs(frames[1] - frames[0]).max() > 50


def test_data_options_narrow_the_draws_and_speed_up_the_motion():
    """The default options draw what make_clips drew before they existed (pinned by a hash of the frames);
    narrowed options give only their motions and one object, moving ``speed`` px a frame; bad options fail."""
    import hashlib
    default = procedural.make_clips(1000, 50)
    assert hashlib.md5(np.stack([c.frames for c in default]).tobytes()).hexdigest() == "470d64abe5dd03d09479c1e70748aba6"
    assert [c.caption for c in default] == [c.caption for c in procedural.make_clips(1000, 50, options=procedural.DataOptions())]
    five = ("moves left", "moves right", "moves up", "moves down", "stays still")
    opts = procedural.DataOptions(speed=8.0, motions=five, max_objects=1)
    clips = procedural.make_clips(1000, 50, options=opts)
    assert all(len(c.scene.things) == 1 and c.scene.things[0].motion in five for c in clips)
    assert {c.scene.things[0].motion for c in clips} == set(five)
    # the same scene drawn at speed 8 instead of 4: the object has moved twice as far by frame 5
    scene = Scene(things=(Thing("square", "red", "moves right", x=20.0, y=32.0, size=6.0),), texture="plain",
                  pan="the camera is still", backdrop=((60, 60, 70), (110, 100, 90)), texture_period=10.0,
                  texture_angle=0.0, height=64, width=64, frames=5, speed=8.0)
    frames = procedural.render(scene)
    assert _centroid(frames[4], COLOURS["red"])[0] - _centroid(frames[0], COLOURS["red"])[0] == pytest.approx(32.0, abs=0.6)
    assert procedural.DataOptions.parse_motions("") == tuple(MOTIONS)
    assert procedural.DataOptions.parse_motions("moves left, grows") == ("moves left", "grows")
    for bad in (dict(motions=("moves sideways",)), dict(motions=()), dict(max_objects=3), dict(speed=0.0)):
        with pytest.raises(ValueError):
            procedural.DataOptions(**bad)


def test_motion_swap_keeps_the_scene_and_frame_1_and_changes_what_moves():
    """with_motions_swapped: every motion replaced by its MOTION_SWAP partner (directions are their own inverse
    pairs), frame 1 drawn identically (things start where they started), a moving thing's later frames differ;
    without_objects: the background alone, equal to the clip wherever no object was drawn."""
    clip = next(c for c in procedural.make_clips(5, 40) if any(t.motion.startswith("moves") for t in c.scene.things))
    swapped = procedural.with_motions_swapped(clip.scene)
    assert [procedural.MOTION_SWAP[t.motion] for t in clip.scene.things] == [t.motion for t in swapped.things]
    assert all(procedural.MOTION_SWAP[procedural.MOTION_SWAP[m]] == m for m in procedural.MOTIONS if m.startswith("moves"))
    assert swapped.caption != clip.caption and swapped.pan == clip.scene.pan
    frames = procedural.render(swapped)
    assert np.array_equal(frames[0], clip.frames[0]) and not np.array_equal(frames[1:], clip.frames[1:])
    background = procedural.render(procedural.without_objects(clip.scene))
    same = (background == clip.frames).all(axis=-1)
    assert 0.5 < same.mean() < 1.0          # objects cover part of the frame, the rest is the background itself
