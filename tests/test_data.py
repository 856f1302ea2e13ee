import io
import json
import os
from collections import Counter
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# OpenS2V-Eval as published (issue 22): a synthetic root with the published structure
# ---------------------------------------------------------------------------------------------
PAPER_COUNTS = {"single_human": 30, "single_object": 30, "single_face": 30, "multiple_objects": 30,
                "human_object_interaction": 15, "face_object_interaction": 15, "multiple_faces": 15,
                "multiple_humans": 15}
OPEN, HUMAN, SINGLE = "Open-Domain_Eval.json", "Human-Domain_Eval.json", "Single-Domain_Eval.json"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from wanexp.data.fixture import write_opens2v_like
    return write_opens2v_like(tmp_path_factory.mktemp("opens2v_published"))


def _composed(root, *overrides):
    from wanexp.data.check import compose_data_config
    return compose_data_config(root, list(overrides))


def test_fixture_has_the_published_structure(published):
    records = {f: json.loads((published / f).read_text()) for f in (OPEN, HUMAN, SINGLE)}
    assert {f: len(r) for f, r in records.items()} == {OPEN: 180, HUMAN: 60, SINGLE: 90}
    assert set(records[HUMAN]) | set(records[SINGLE]) <= set(records[OPEN])
    assert all(records[SINGLE][i] == records[OPEN][i] for i in records[SINGLE])
    assert sum(records[HUMAN][i] != records[OPEN][i] for i in records[HUMAN]) == 30
    sizes = Counter(len(r["img_paths"]) for r in records[OPEN].values())
    assert sizes == {1: 90, 2: 40, 3: 50}
    suffixes = {p.rsplit(".", 1)[1] for r in records[OPEN].values() for p in r["img_paths"]}
    assert suffixes == {"jpg", "png"}


def test_default_reads_open_domain_alone_the_papers_180(published, cache_dir):
    data = _composed(published)["data"]
    assert data["files"] == [OPEN] and data["on_conflict"] == "error"
    from wanexp.data import read_samples
    _, samples = read_samples(data, cache_dir)
    assert len(samples) == 180 and Counter(s.category for s in samples) == PAPER_COUNTS
    assert read_opens2v(published) == samples  # the reader's own default is the same file


def test_identical_duplicates_merge(published):
    merged = read_opens2v(published, [OPEN, SINGLE])
    assert len(merged) == 180 and Counter(s.category for s in merged) == PAPER_COUNTS
    single_first = {s.id: s for s in read_opens2v(published, [SINGLE, OPEN])}
    assert len(single_first) == 180 and single_first["singleobj_1"].source == str(published / SINGLE)


def test_differing_duplicates_are_refused_naming_both_files_and_fields(published):
    with pytest.raises(WanexpError) as err:
        read_opens2v(published, [OPEN, HUMAN, SINGLE])
    msg = str(err.value)
    assert "30 sample id(s) differ between Open-Domain_Eval.json and Human-Domain_Eval.json" in msg
    assert "fields: img_paths" in msg and "singlehuman_1" in msg and "data.on_conflict" in msg


@pytest.mark.parametrize("files,on_conflict,crop", [
    ([OPEN, HUMAN], "first", False), ([HUMAN, OPEN], "first", True), ([OPEN, HUMAN], "last", True),
    ([OPEN, HUMAN, SINGLE], HUMAN, True), ([OPEN, HUMAN, SINGLE], OPEN, False)])
def test_on_conflict_picks_the_chosen_file(published, files, on_conflict, crop):
    by_id = {s.id: s for s in read_opens2v(published, files, on_conflict)}
    assert len(by_id) == 180
    image = by_id["singlehuman_1"].image_path
    assert ("crop_man" in str(image)) == crop
    assert image == published / json.loads((published / (HUMAN if crop else OPEN)).read_text())["singlehuman_1"]["img_paths"][0]
    assert "crop_man" not in str(by_id["singleface_1"].image_path)  # identical in both files


def test_on_conflict_value_and_repeated_id_in_one_file_are_refused(published, tmp_path):
    with pytest.raises(WanexpError, match="data.on_conflict=newest is not one of error, first, last"):
        read_opens2v(published, [OPEN, HUMAN], "newest")
    rec = '{"prompt": "a cup", "img_paths": ["Images/singleobj/1_0.png"]}'
    (tmp_path / OPEN).write_text('{"singleobj_1": %s, "singleobj_1": %s}' % (rec, rec))
    with pytest.raises(WanexpError, match="'singleobj_1' appears twice in the file"):
        read_opens2v(tmp_path)


@pytest.mark.parametrize("preset", ["paper_table1", "paper_table2"])
def test_seed_paper_presets_evaluate_180_and_calibrate_on_12_of_them(published, cache_dir, preset):
    from wanexp.data import calib_record
    splits = load_splits(_composed(published, f"+experiment={preset}")["data"], cache_dir)
    assert len(splits.eval) == 180 and Counter(s.category for s in splits.eval) == PAPER_COUNTS
    assert len(splits.calib) == 12 and len(splits.overlap) == 12 and splits.calib_source == "data"
    row = calib_record(splits, calibrated=True)
    assert row["num_calib_samples"] == 12 and row["calib_overlaps_eval"] is True and row["num_calib_in_eval"] == 12
    assert row["calib_samples"].split() == [s.id for s in splits.calib]
    assert calib_record(splits, calibrated=False) == {"calib_source": None, "num_calib_samples": 0, "calib_samples": None,
                                                      "calib_overlaps_eval": False, "num_calib_in_eval": 0}


def test_hif4_preset_calibrates_on_prompts_with_a_blank_image(published, cache_dir):
    splits = load_splits(_composed(published, "+experiment=hif4_table")["data"], cache_dir)
    assert len(splits.eval) == 180 and len(splits.calib) == 16 and not splits.overlap
    assert splits.calib_source.endswith("hif4_calib_prompts.json")
    assert all(s.extra["blank_image"] for s in splits.calib + splits.eval)
    assert splits.calib[0].load_image().getextrema() == ((128, 128),) * 3


def test_default_split_never_overlaps_and_overlap_only_when_asked(published, cache_dir):
    base = _composed(published)["data"]
    splits = load_splits(base, cache_dir)
    assert (len(splits.calib), len(splits.eval), splits.overlap) == (16, 164, [])
    ids = {"ids": ["singleobj_1", "singleface_2"]}
    with pytest.raises(WanexpError, match="overlap on .*data.calib.overlap_eval=true"):
        load_splits({**base, "calib": ids, "eval": ids}, cache_dir)
    both = load_splits({**base, "calib": {**ids, "overlap_eval": True}, "eval": ids}, cache_dir)
    assert both.overlap == ids["ids"]
    # a partial evaluation of the overlapping split takes samples not calibrated on first
    paper = {**base, "calib": {"num_samples": 12, "overlap_eval": True}}
    assert load_splits({**paper, "eval": {"num_samples": 168}}, cache_dir).overlap == []
    assert len(load_splits({**paper, "eval": {"num_samples": 170}}, cache_dir).overlap) == 2
    with pytest.raises(WanexpError, match="data.calib.num_samples=200 but .* holds only 180"):
        load_splits({**base, "calib": {"num_samples": 200}}, cache_dir)


def test_multi_image_samples_use_the_first_image_and_count_them(published):
    from wanexp.data import sample_table
    samples = read_opens2v(published)
    records = json.loads((published / OPEN).read_text())
    assert all(s.image_path == published / records[s.id]["img_paths"][0] for s in samples)
    table = sample_table(samples)
    assert list(table.columns) == ["id", "num_ref_images"]
    assert table["num_ref_images"].value_counts().to_dict() == {1: 90, 3: 50, 2: 40}
    assert table.set_index("id").loc["multihuman_1", "num_ref_images"] == 3
    assert samples[0].extra["synthesis_flag"] in (True, False) and "class_label" in samples[0].extra


def _broken_copy(published, tmp_path):
    import shutil
    root = Path(shutil.copytree(published, tmp_path / "broken"))
    records = json.loads((root / OPEN).read_text())
    (root / records["singleobj_2"]["img_paths"][0]).unlink()
    first = root / records["faceobj_3"]["img_paths"][0]
    first.write_bytes(first.read_bytes()[:40])  # truncated: the file is there but does not decode
    records["multiface_4"]["prompt"] = "  "
    (root / OPEN).write_text(json.dumps(records))
    return root


def test_data_check_reports_a_published_root(published):
    from wanexp.data.check import check
    out = io.StringIO()
    assert check(published, ["+experiment=paper_table1"], out=out) == 0
    text = out.getvalue()
    assert "Open-Domain_Eval.json       180 ids  (single_human 30, single_object 30, single_face 30, multiple_humans 15, " \
           "multiple_objects 30, multiple_faces 15, human_object_interaction 15, face_object_interaction 15); " \
           "samples by number of images 1: 90, 2: 40, 3: 50" in text
    assert "Human-Domain_Eval.json       60 ids  (single_human 30, single_face 30)" in text
    assert "Open-Domain_Eval.json & Human-Domain_Eval.json: 60 shared ids, 30 identical, 30 differ (fields: img_paths; " \
           "e.g. singlehuman_1, singlehuman_2, singlehuman_3)" in text
    assert "Open-Domain_Eval.json & Single-Domain_Eval.json: 90 shared ids, 90 identical\n" in text
    assert "images: 350 referenced, 0 missing, 0 undecodable" in text and "prompts: 0 empty or missing" in text
    assert "calibration: 12 samples from data:" in text and "evaluation:  180 samples (single_human 30," in text
    assert "calibrated and evaluated: 12 (data.calib.overlap_eval=true)" in text and text.endswith("problems: none\n")
    # reading every file without choosing a winner is a problem of that configuration
    out = io.StringIO()
    assert check(published, [f"data.files=[{OPEN},{HUMAN},{SINGLE}]"], out=out) == 1
    assert "problems: 1\n  split: 30 sample id(s) differ between Open-Domain_Eval.json and Human-Domain_Eval.json" in out.getvalue()


def test_data_check_names_every_problem_and_exits_non_zero(published, tmp_path):
    import subprocess
    import sys
    root = _broken_copy(published, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "wanexp.data", "check", str(root)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "images: 350 referenced, 1 missing, 1 undecodable" in out and "prompts: 1 empty or missing" in out
    assert "image Images/singleobj/2_0.jpg (Open-Domain_Eval.json: 'singleobj_2') is missing" in out
    assert "(Open-Domain_Eval.json: 'faceobj_3') is undecodable" in out
    assert "Open-Domain_Eval.json: 'multiface_4' has an empty or missing prompt" in out
    assert "problems: 4" in out  # the three above, and the split that cannot be read
    assert subprocess.run([sys.executable, "-m", "wanexp.data", "check", str(root), "data.nope=1"],
                          capture_output=True, text=True, timeout=120).returncode == 2


def test_run_checks_every_sample_before_loading_a_model(published, tmp_path, cli):
    root = _broken_copy(published, tmp_path)
    records = json.loads((root / OPEN).read_text())
    records["multiface_4"]["prompt"] = "a prompt again"
    records.pop("singleobj_2")
    (root / OPEN).write_text(json.dumps(records))  # one problem left: an image that does not decode
    run_dir = tmp_path / "run"
    proc = cli("data=opens2v_eval", f"data.root={root}", "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("wanexp: error: 1 image(s) of the run's samples cannot be used: ") and "'faceobj_3'" in line
    assert "undecodable" in line and not (run_dir / "model.json").exists() and not (run_dir / "stages").exists()
    assert not (run_dir / "wanexp_config.json").exists()  # the directory is not tied to the failed attempt
