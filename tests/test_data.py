import json

import pytest

from wanexp.data import CATEGORIES, category_of, load_splits, read_opens2v
from wanexp.data.tiny import TINY_FILES, ensure_tiny_dataset
from wanexp.errors import WanexpError


def test_tiny_fixture_has_one_sample_per_category(cache_dir):
    samples = read_opens2v(ensure_tiny_dataset(cache_dir), TINY_FILES)
    assert len(samples) == 8
    assert sorted(s.category for s in samples) == sorted(CATEGORIES)
    img = samples[0].load_image()
    assert img.mode == "RGB" and min(img.size) > 0


@pytest.mark.parametrize("sid,cat", [("singleobj_1", "single_object"), ("multiobject_30", "multiple_objects"),
                                     ("singlehuman_1", "single_human"), ("singleface_30", "single_face")])
def test_category_from_id(sid, cat):
    assert category_of(sid) == cat


def test_unknown_prefix_is_refused():
    with pytest.raises(WanexpError, match="prefix"):
        category_of("spaceship_3")


def _dataset(tmp_path, records, name="Open-Domain_Eval.json"):
    (tmp_path / "Images").mkdir(exist_ok=True)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "Images" / "a.png")
    (tmp_path / name).write_text(json.dumps(records))
    return tmp_path


def test_reader_accepts_mapping_and_list_layouts(tmp_path):
    root = _dataset(tmp_path, {"singleobj_1": {"prompt": "a cup", "img_paths": ["Images/a.png"], "other": 3}})
    (root / "Human-Domain_Eval.json").write_text(json.dumps(
        [{"id": "singlehuman_2", "prompt": "a man", "img_paths": ["Images/a.png"]}]))
    samples = read_opens2v(root, ["Open-Domain_Eval.json", "Human-Domain_Eval.json"])
    by_id = {s.id: s for s in samples}
    assert set(by_id) == {"singleobj_1", "singlehuman_2"}
    assert by_id["singleobj_1"].extra.get("other") == 3 and by_id["singlehuman_2"].prompt == "a man"


@pytest.mark.parametrize("records,match", [
    ({"singleobj_1": {"prompt": "", "img_paths": ["Images/a.png"]}}, "empty or missing prompt"),
    ({"singleobj_1": {"prompt": "x", "img_paths": ["Images/missing.png"]}}, "missing.png"),
])
def test_reader_errors(tmp_path, records, match):
    root = _dataset(tmp_path, records)
    with pytest.raises(WanexpError, match=match):
        read_opens2v(root, ["Open-Domain_Eval.json"])


def test_missing_json_and_duplicate_ids(tmp_path):
    root = _dataset(tmp_path, {"singleobj_1": {"prompt": "x", "img_paths": ["Images/a.png"]}})
    with pytest.raises(WanexpError, match="Human-Domain_Eval.json"):
        read_opens2v(root, ["Open-Domain_Eval.json", "Human-Domain_Eval.json"])
    (root / "Human-Domain_Eval.json").write_text(json.dumps({"singleobj_1": {"prompt": "y", "img_paths": ["Images/a.png"]}}))
    with pytest.raises(WanexpError, match="singleobj_1"):
        read_opens2v(root, ["Open-Domain_Eval.json", "Human-Domain_Eval.json"])


def test_splits_never_overlap_and_are_seeded(cache_dir):
    cfg = {"name": "tiny", "split_seed": 3, "calib": {"num_samples": 3}, "eval": {"num_samples": None}}
    a, b = load_splits(cfg, cache_dir), load_splits(cfg, cache_dir)
    ids_c, ids_e = {s.id for s in a.calib}, {s.id for s in a.eval}
    assert len(ids_c) == 3 and len(ids_e) == 5 and not ids_c & ids_e
    assert [s.id for s in a.eval] == [s.id for s in b.eval]


def test_split_errors(cache_dir):
    with pytest.raises(WanexpError, match="only 6 samples remain"):
        load_splits({"name": "tiny", "calib": {"num_samples": 2}, "eval": {"num_samples": 7}}, cache_dir)
    with pytest.raises(WanexpError, match="empty"):
        load_splits({"name": "tiny", "calib": {"num_samples": 8}, "eval": {}}, cache_dir)
    with pytest.raises(WanexpError, match="data.root"):
        load_splits({"name": "opens2v_eval", "root": None}, cache_dir)
