"""End-to-end runs of `python -m wanexp` on the tiny model (CLI subprocesses, as users run it)."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _mtimes(run_dir: Path) -> dict:
    # Hydra rewrites its own .hydra/ record and W&B its offline log on every launch, and wanexp.log grows by
    # each attempt's lines; every other file of ours must stay.
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and not {"wandb", ".hydra"} & set(p.parts) and p.name != "wanexp.log"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache_dir):
    """The default `python -m wanexp` (RTN W4A4 MXFP4, W&B offline), run once for this module."""
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("default_run")
    run_dir = root / "run"
    env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT=str(root / "outputs"))
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "wanexp", "progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": run_dir, "proc": proc, "cmd": cmd, "env": env, "root": root}


def test_default_run_end_to_end(default_run):
    run_dir, out = default_run["dir"], default_run["proc"].stdout
    assert "method=rtn" in out and "format=mxfp4" in out and "PSNR" in out
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["method"] == "rtn" and row["format"] == "mxfp4" and row["num_videos"] == 6
    # a quantized model really differs from BF16, but stays recognisably the same video
    assert 0 < row["latent_rel_err"] < 1.0 and 0 < row["ssim"] < 1.0 and 5 < row["psnr"] < 100
    assert 0 < row["model_size_gb"]
    manifest = _lines(run_dir / "manifest.jsonl")
    assert len(manifest) == 6 and all((run_dir / r["video"]).stat().st_size > 0 for r in manifest)
    assert {s: (run_dir / "stages" / f"{s}.json").is_file()
            for s in ("calibrate", "quantize", "generate", "evaluate", "report")} == dict.fromkeys(
        ("calibrate", "quantize", "generate", "evaluate", "report"), True)
    assert (run_dir / "artifact" / "quantized.safetensors").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "W&B should have logged offline into the run dir"
    assert len(list(offline[0].rglob("media/videos/**/*.mp4"))) == 2  # logger.videos=2 samples as wandb.Video
    # size, speed and the BF16 twin's figures measured in the same run
    assert row["model_size_gb"] < 0.7 * row["model_size_gb_bf16"]  # tiny: embeddings and heads stay BF16
    assert row["pipeline_size_gb"] > row["model_size_gb"] and row["pipeline_size_gb_bf16"] > row["model_size_gb_bf16"]
    assert row["fps"] == pytest.approx(5 / row["sec_per_video"], rel=1e-3) and row["sec_per_video_bf16"] > 0
    assert pd.isna(row["kept"]) and pd.isna(row["clip_candidates"]) and row["rank"] == 0
    per_sample = pd.read_csv(run_dir / "eval" / "per_sample.csv")
    assert len(per_sample) == 6 and per_sample["category"].nunique() == 6
    assert (per_sample["num_ref_images"] == 1).all()  # the tiny fixture: one reference image a sample
    assert row["num_calib_samples"] == 0 and not row["calib_overlaps_eval"] and pd.isna(row["calib_samples"])  # RTN
    # the printed summary ends with the run's report.html, which plays every video beside its BF16 twin
    assert out.strip().splitlines()[-1] == f"  report:  {run_dir / 'report.html'}"
    html = (run_dir / "report.html").read_text()
    assert html.count("<video ") == 12 and len(list((run_dir / "report_assets" / "videos").rglob("*.mp4"))) == 12


def test_resuming_a_finished_run_does_no_work(default_run):
    import subprocess
    run_dir = default_run["dir"]
    before = _mtimes(run_dir)
    proc = subprocess.run(default_run["cmd"], cwd=default_run["root"], env=default_run["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method=rtn" in proc.stdout
    after = _mtimes(run_dir)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}


def test_lost_video_is_regenerated_alone_and_identically(default_run):
    import subprocess
    run_dir = default_run["dir"]
    manifest = run_dir / "manifest.jsonl"
    records = _lines(manifest)
    victim = records[2]
    latents = (run_dir / victim["latents"]).read_bytes()
    (run_dir / victim["video"]).unlink()
    (run_dir / victim["latents"]).unlink()
    others = {r["id"]: (run_dir / r["video"]).stat().st_mtime_ns for r in records if r is not victim}
    proc = subprocess.run(default_run["cmd"] + ["stage=generate"], cwd=default_run["root"], env=default_run["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / victim["latents"]).read_bytes() == latents  # same seed, same bits
    assert {i: (run_dir / "videos" / f"{i}.mp4").stat().st_mtime_ns for i in others} == others
    assert len(_lines(manifest)) == len(records) + 1 and _lines(manifest)[-1]["id"] == victim["id"]


def test_other_config_in_same_dir_is_refused(default_run):
    import subprocess
    proc = subprocess.run(default_run["cmd"] + ["format=nvfp4"], cwd=default_run["root"], env=default_run["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "format.name=mxfp4 when generate finished, now nvfp4; generate cannot be redone in place" in proc.stderr


def test_analyze_a_run_without_calibration(default_run):
    """quant=rtn calibrates nothing: stage=analyze draws every other figure and says, in one line, why the
    activation trace is missing."""
    import subprocess
    run_dir = default_run["dir"]
    proc = subprocess.run(default_run["cmd"] + ["stage=analyze", "logger=none"], cwd=default_run["root"],
                          env=default_run["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = pd.read_csv(run_dir / "eval" / "per_sample.csv").sort_values("latent_rel_err")
    worst, best = errors["id"].iloc[-1], errors["id"].iloc[0]
    drawn = ["clip_distribution", "sensitivity", "sensitivity_ranking", "quality_memory", f"qualitative_{worst}",
             f"qualitative_{best}"]
    index = json.loads((run_dir / "analysis" / "index.json").read_text())
    assert sorted(index["figures"]) == sorted(drawn) and list(index["skipped"]) == ["activation_trace"]
    assert all((run_dir / "analysis" / f"{n}.{ext}").stat().st_size > 0 for n in drawn for ext in ("png", "pdf", "json"))
    skipped = [l for l in proc.stdout.splitlines() if l.startswith("wanexp: analyze: skipped")]
    assert skipped == ["wanexp: analyze: skipped activation_trace: calibration was skipped: quant=rtn needs no "
                       "calibration statistics, so no BF16 trajectory was traced (the per-step traces are recorded "
                       "while calibrating a method that needs statistics: smoothing, GPTQ or clip search)"]
    assert f"wanexp: analyze: 6 figures in {run_dir / 'analysis'}; report: {run_dir / 'report.html'}" in proc.stdout
    assert (run_dir / "stages" / "analyze.json").is_file()
    html = (run_dir / "report.html").read_text()
    assert html.count("<img ") == 6 and "quant=rtn needs no calibration statistics" in html


LADDER = ("bf16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "tsclip_keep_sensitive", "hif4_tailaware")


def test_method_ladder_multirun_and_artifact_reload(cli, tmp_path, request):
    """Every method end to end in one multirun (sharing one set of BF16 videos), its qualitative grid and
    report.html (in Chromium); then a TS-clip artifact reloaded with quant.load reproduces its videos bit
    for bit without calibrating."""
    proc = cli("-m", "quant=" + ",".join(LADDER), "+experiment=smoke", "data.eval.num_samples=1",
               "++quant.calib_blocks_per_pass=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    _check_sweep_outputs(sweep, proc)
    runs = {pd.read_csv(p).iloc[0]["method"]: p.parent for p in (tmp_path / "outputs" / "multirun").rglob("results.csv")}
    assert sorted(runs) == sorted(LADDER)
    rows = {m: pd.read_csv(d / "results.csv").iloc[0] for m, d in runs.items()}
    assert rows["bf16"]["latent_rel_err"] == 0 and rows["bf16"]["ssim"] == pytest.approx(1.0)
    for m in LADDER[1:]:
        assert 0 < rows[m]["latent_rel_err"] < 0.5, m
    # low rank + smoothing beat plain RTN on the tiny model too
    assert rows["svdquant_gptq"]["latent_rel_err"] < rows["rtn"]["latent_rel_err"]
    refs = list((tmp_path / "outputs" / "reference_cache").glob("*/manifest.jsonl"))
    assert len(refs) == 1 and len(_lines(refs[0])) == 1  # generated once, used by every sweep point
    # the sweep ends with its ablation table, deltas against the BF16 run
    table = pd.read_csv(next((tmp_path / "outputs" / "multirun").rglob("ablation.csv")))
    assert list(table["method"]) == list(LADDER)
    assert table.set_index("method").loc["rtn", "latent_rel_err"] == pytest.approx(rows["rtn"]["latent_rel_err"])
    assert "Δlatent_rel_err" not in table  # fidelity is already against the BF16 twin
    ts = runs["tsclip"]
    calib = json.loads((ts / "stages" / "calibrate.json").read_text())
    # 4 blocks, 2 per pass, one pass of each expert's steps per group
    assert len(list(Path(calib["stats_dir"]).glob("stats-*-part*-of002.safetensors"))) == 4
    # the content-addressed cache: tsclip_keep_sensitive needs the same statistics and calibrates no more
    kept_calib = json.loads((runs["tsclip_keep_sensitive"] / "stages" / "calibrate.json").read_text())
    assert kept_calib["stats_dir"] == calib["stats_dir"] and kept_calib["parts_reused"] == 4
    assert calib["parts_reused"] == 0 and kept_calib["seconds"] < calib["seconds"]
    gptq_calib = json.loads((runs["svdquant_gptq"] / "stages" / "calibrate.json").read_text())
    assert gptq_calib["stats_dir"] != calib["stats_dir"]  # 1 bin, not 4: other statistics
    choices = json.loads((ts / "artifact" / "choices.json").read_text())
    # a ratio per bin; 4 bins asked, but at 4 steps each expert runs 2, so 2 bins each (README "LoRAs and short schedules")
    assert {len(c["clip"]) for e in choices.values() for c in e.values()} == {2}
    assert all(None not in c["cos_err_bins"] for e in choices.values() for c in e.values())  # every bin calibrated
    kept = json.loads((runs["tsclip_keep_sensitive"] / "artifact" / "choices.json").read_text())
    assert not any(n.endswith(("attn1.to_out.0", "ffn.net.2")) for e in kept.values() for n in e)

    reload_dir = tmp_path / "reload"
    proc = cli("quant=tsclip", "+experiment=smoke", "data.eval.num_samples=1",
               f"quant.load={ts / 'artifact' / 'quantized.safetensors'}", f"hydra.run.dir={reload_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in json.loads((reload_dir / "stages" / "calibrate.json").read_text())
    assert not (reload_dir / "calib").exists()
    sid = _lines(ts / "manifest.jsonl")[0]["id"]
    assert (reload_dir / "latents" / f"{sid}.safetensors").read_bytes() == (ts / "latents" / f"{sid}.safetensors").read_bytes()
    proc = cli("quant=rtn", "+experiment=smoke", f"quant.load={ts / 'artifact' / 'quantized.safetensors'}",
               f"hydra.run.dir={tmp_path / 'mismatch'}")
    assert proc.returncode == 2 and "method='tsclip'" in proc.stderr and "Traceback" not in proc.stderr
    # last, as it is skipped without Chromium: the sweep's report.html in a browser
    _render_sweep_report(sweep, request.getfixturevalue("render_report"), request.getfixturevalue("keep_artifact"),
                         tmp_path)


def test_help_cfg_and_named_sweeps(cli):
    help_out = cli("--help").stdout
    for group in ("model", "data", "quant", "format", "expert", "evaluate", "logger", "ablation", "experiment",
                  "hydra/launcher"):
        assert f"{group}:" in help_out
    job = cli("--cfg", "job", "quant=w4a16", "format=int4").stdout
    assert "name: w4a16" in job and "group_size: 128" in job
    hydra_cfg = cli("--cfg", "hydra", "+ablation=methods").stdout
    assert "mode: MULTIRUN" in hydra_cfg and "quant: bf16,w4a16,rtn,svdquant_rtn" in hydra_cfg
    assert "could not" not in cli("--cfg", "job", "+experiment=smoke").stderr.lower()


@pytest.mark.parametrize("args,expect", [
    (("quant=nope",), "quant"),
    (("format.name=e3m0",), "format.name=e3m0 is unknown"),
    (("stage=dance",), "stage=dance"),
    (("data=opens2v_eval", "data.root=/nonexistent/OpenS2V"), "/nonexistent/OpenS2V"),
    (("evaluate=vbench",), "at least 113 pixels a side, but model.generation makes 64×64"),  # before generating
    (("evaluate=vbench", "evaluate.vbench.dimensions=[imaging_quality,colour]"), "'colour' is not a VBench dimension"),
])
def test_bad_input_gives_one_clear_error(cli, args, expect):
    proc = cli(*args, env={"WANEXP_OPENS2V_ROOT": ""})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert expect in proc.stderr


def test_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = cli(f"hydra.run.dir={blocker}/run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr


TABLE1 = ["bf16", "rtn", "svdquant_rtn", "svdquant_gptq", "tsclip", "tsclip_keep_sensitive"]
# the paper code's calibration and search run at 480x832 on the A14B; 64x64 here keeps the test short
SMALL = ("++quant.calib_generation.height=64", "++quant.calib_generation.width=64",
         "++quant.search_generation.height=64", "++quant.search_generation.width=64")


def test_paper_table1_sweep_renders_the_papers_layout(cli, tmp_path):
    # the default: every row with the seed paper code's recipe (recipe=wanexp: wanexp's own, test_paper_code)
    proc = cli("+experiment=paper_table1", "logger=none", "data.calib.num_samples=1", "data.eval.num_samples=1",
               "model.generation.num_inference_steps=4", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").glob("*/*"))
    table = pd.read_csv(sweep / "ablation.csv")
    assert list(table["method"]) == TABLE1  # the six rows, in the paper's order
    assert set(table["format"]) == {"bf16", "mxfp4(act_scale_rule=ceil,scale_rule=floor,ties=toward_zero)"}
    assert set(table["recipe"]) == {"paper_code"}
    t = table.set_index("method")
    for m in TABLE1[1:]:  # deltas against the BF16 row of the sweep
        assert t.loc[m, "Δmodel_size_gb"] == pytest.approx(t.loc[m, "model_size_gb"] - t.loc["bf16", "model_size_gb"])
        assert t.loc[m, "Δmodel_size_gb"] < 0
    assert t.loc["tsclip", "bins"] == 3 and t.loc["tsclip", "clip_candidates"] == "0.6,0.7,0.8,0.9,1 ×2^-1,0,1"
    assert t.loc["tsclip_keep_sensitive", "kept"] == "modules=blocks.*.attn1.to_out.0+blocks.*.ffn.net.2"
    assert t.loc["svdquant_rtn", "rank"] == 16 and t.loc["rtn", "rank"] == 0
    md = (sweep / "paper_table1.md").read_text()
    assert md.count("\n| ") == 7  # header + six paper rows
    assert "| BF16 baseline | BF16 | BF16 | – | n/a / 0.806 |" in md  # VBench not run: n/a beside the paper
    long = pd.read_csv(sweep / "paper_table1.csv")
    err = long[long["metric"] == "latent rel. err"].set_index("method")["ours"]
    assert err.to_dict() == pytest.approx(t["latent_rel_err"].to_dict())
    assert "Ours† (+ self_attn.o, ffn.2 in BF16)" in proc.stdout
    # the preset's overlapping split; one evaluated sample is taken from those not calibrated on first
    rows = pd.concat([pd.read_csv(p) for p in sweep.glob("*/results.csv")]).set_index("method")
    assert rows.loc["tsclip", "num_calib_samples"] == 1 and rows.loc["tsclip", "calib_source"] == "data"
    assert not rows.loc["tsclip", "calib_overlaps_eval"] and rows.loc["rtn", "num_calib_samples"] == 0
    # Ours: searched per bin on the W4A4 generation, cross-attention left at clip 1 in every bin
    run = next(sweep.glob("*_tsclip_paper_code_mxfp4_paper_code"))
    chosen = json.loads((run / "artifact" / "choices.json").read_text())
    for expert, layers in chosen.items():
        for name, c in layers.items():
            if ".attn2." in name:
                assert c["clip"] == [1.0, 1.0, 1.0] and "search_err" not in c, name
            else:
                assert len(c["clip"]) == 3 and c["search_err"][0] is not None, name
    # every video, the BF16 twins' too, is generated with freeze_condition_latent: the BF16 row's videos are
    # the twins the quantized rows are compared with
    refs = {json.loads((d / "generate.json").read_text())["reference_dir"] for d in sweep.glob("[0-9]_*")}
    assert len(refs) == 1 and json.loads((run / "wanexp_config.json").read_text())["quant"]["freeze_condition_latent"]


def _check_sweep_outputs(sweep, proc):
    """The sweep's end: one qualitative grid (BF16 and the six quantized methods) and report.html."""
    assert proc.stdout.strip().splitlines()[-1] == f"wanexp: report: {sweep / 'report.html'}"
    index = json.loads((sweep / "analysis" / "index.json").read_text())
    grids = [n for n in index["figures"] if n.startswith("qualitative_")]
    assert len(grids) == 1 and index["skipped"] == {}  # one video: it is both the worst and the best
    grid = json.loads((sweep / "analysis" / f"{grids[0]}.json").read_text())
    assert grid["labels"][0] == "BF16" and sorted(l.split()[0] for l in grid["labels"][1:]) == sorted(LADDER[1:])
    assert all(0 < grid["mean_abs_diff"][l][2] < grid["vmax"] for l in grid["labels"][1:])
    assert (sweep / "report.html").is_file()


def _render_sweep_report(sweep, render_report, keep_artifact, tmp_path):
    """report.html's images and videos load in Chromium; its ablation table holds ablation.csv's numbers."""
    from wanexp.generate import read_mp4
    page = render_report(sweep / "report.html", tmp_path / "report_sweep.png")
    assert len(page["images"]) == 2 and all(i["complete"] and i["width"] > 0 for i in page["images"])  # grid, scatter
    assert len(page["videos"]) == len(LADDER)  # BF16 and the six methods side by side
    assert all(v["ready"] >= 2 and v["error"] is None for v in page["videos"]) and page["remote"] == []
    assert read_mp4(sweep / page["videos"][0]["src"]).shape == (5, 64, 64, 3)
    table = pd.read_csv(sweep / "ablation.csv")
    cells = {(c["col"], c["row"]): c for c in page["cells"] if c["table"] == "ablation"}
    for k, rec in enumerate(table.to_dict("records"), start=1):
        assert cells[("method", k)]["text"] == rec["method"]
        for col in ("latent_rel_err", "Δmodel_size_gb", "psnr"):
            assert float(cells[(col, k)]["value"]) == pytest.approx(rec[col], rel=1e-12), (rec["method"], col)
    links = [c for c in page["cells"] if c["table"] == "runs" and c["text"] == "report.html"]
    assert len(links) == len(LADDER)  # each run's own report, linked
    keep_artifact(tmp_path / "report_sweep.png")
