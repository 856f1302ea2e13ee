"""Faults and bad input as a user meets them (issue 14): every case goes through ``python -m wanexp``
and the test asserts the exit code, the one-line message and what is on disk afterwards.

The runs are shared to keep CI short: one sweep (a point that finishes and one that fails) and one
single-run chain (calibrate only; then a NaN in a quantized layer; then a run interrupted with
Ctrl-C and resumed with the command it printed) in one output tree, all at the smallest settings;
the other cases stop at setup, within seconds, before any model loads.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

TINIEST = ["+experiment=smoke", "model.generation.num_inference_steps=2", "model.generation.height=32",
           "model.generation.width=32", "timing.warmup_steps=1"]
SMALL = [*TINIEST, "data.eval.num_samples=1"]
CALIB = ["quant=svdquant_rtn", "quant.alpha=0.5"]   # a method that calibrates, with a cheap quantize
SWEEP = ["-m", "format=mxfp4_ceil,hif4", "expert.keep_blocks=[0,1,2]", *SMALL, "progress=false"]  # point 1 fails
NAN_LAYER = ("high_noise", "blocks.1.ffn.net.2")


def _env(cache_dir, **extra):
    env = dict(os.environ, WANEXP_CACHE=str(cache_dir), WANEXP_OUTPUT_ROOT="outputs", **extra)
    env.pop("WANDB_MODE", None)
    return env


def wanexp(args, cwd, cache_dir, popen=False, **env):
    """``python -m wanexp ARGS`` in ``cwd`` with a relative output root, under umask 022."""
    cmd = [sys.executable, "-m", "wanexp", *args]
    kw = dict(cwd=cwd, env=_env(cache_dir, **env), text=True, preexec_fn=lambda: os.umask(0o022))
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    return subprocess.run(cmd, capture_output=True, timeout=900, **kw)


def run_printed(command: str, cwd, cache_dir):
    """Run a command line exactly as wanexp printed it (``python`` being this interpreter)."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "wanexp"], command
    return wanexp(argv[3:], cwd, cache_dir)


def in_dir(args, run_dir) -> list[str]:
    return [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _mtimes(run_dir: Path) -> dict:
    """Every file of ours (Hydra rewrites .hydra/ on each launch; wanexp.log grows by each attempt's lines)."""
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "wanexp.log"}


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# the shared runs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory, cache_dir):
    """The working directory the runs start from (``outputs/`` below it)."""
    root = tmp_path_factory.mktemp("faults")
    (root / "A").mkdir()
    return {"root": root, "cwd": root / "A", "outputs": root / "A" / "outputs", "cache": cache_dir}


@pytest.fixture(scope="module")
def sweep(tree):
    """A two-point sweep whose second point fails at setup; then the command it printed, run again."""
    first = wanexp(SWEEP, tree["cwd"], tree["cache"])
    dirs = list((tree["outputs"] / "multirun").glob("*/*"))
    assert len(dirs) == 1, first.stderr[-3000:]
    point = dirs[0] / "0_rtn_mxfp4_ceil"
    before = _mtimes(point)
    advice = lines(first.stderr)[-1]
    again = run_printed(advice.split(" with: ", 1)[1], tree["cwd"], tree["cache"]) if " with: " in advice else None
    return {"first": first, "again": again, "dir": dirs[0], "point": point, "before": before, "advice": advice}


@pytest.fixture(scope="module")
def chain(tree, sweep):
    """One run directory: calibrate only; then all stages from a copy of the data, with a NaN injected
    into a quantized layer; then all stages again, interrupted by Ctrl-C; then the printed command."""
    cwd, cache, run_dir = tree["cwd"], tree["cache"], tree["outputs"] / "runs" / "chain"
    refs = next((tree["outputs"] / "reference_cache").glob("*/manifest.jsonl"))
    # the sweep made these references; pretend their cached timing is from a slow, old measurement
    refs.write_text("".join(json.dumps(dict(r, seconds=999.0)) + "\n" for r in map(json.loads, lines(refs.read_text()))))
    base = [*CALIB, *SMALL, f"hydra.run.dir={run_dir}"]
    calibrated = wanexp([*CALIB, *TINIEST, "data.eval.num_samples=2", "stage=calibrate", "progress=false",
                         f"hydra.run.dir={run_dir}"], cwd, cache)
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    data_copy = tree["root"] / "data_copy"
    shutil.copytree(next(Path(cache).glob("opens2v-eval-tiny-*")), data_copy)
    moved_data = [f"data.root={data_copy}", "data.files=[Human-Domain_Eval.json,Open-Domain_Eval.json]"]
    nan = wanexp([*base, *moved_data], cwd, cache, WANEXP_INJECT_NAN=":".join(NAN_LAYER))
    after_nan = {"stages": sorted(p.name for p in (run_dir / "stages").glob("*.json")),
                 "error": json.loads((run_dir / "error.json").read_text()) if (run_dir / "error.json").is_file() else None,
                 "videos": sorted(p.name for p in run_dir.glob("videos/*"))}
    artifact_mtime = (run_dir / "artifact" / "quantized.safetensors").stat().st_mtime_ns
    args = [*base, *moved_data, "timing.bf16_twin=true"]
    log = run_dir / "wanexp.log"
    seen = len(log.read_text())
    proc = wanexp(args, cwd, cache, popen=True)
    deadline = time.monotonic() + 300  # Ctrl-C as soon as this attempt starts generating
    while time.monotonic() < deadline and proc.poll() is None and "[3/5] generate" not in log.read_text()[seen:]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    interrupted = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    resumed = run_printed(lines(err)[-1].split("resume with: ", 1)[-1], cwd, cache)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    finished = (run_dir / "results.csv").is_file() and not (run_dir / "error.json").exists()
    return {"finished": finished, "dir": run_dir, "calibrated": calibrated, "nan": nan, "after_nan": after_nan, "args": args,
            "interrupted": interrupted, "resumed": resumed, "artifact_mtime": artifact_mtime, "refs": refs,
            "base": base}


# ---------------------------------------------------------------------------------------------
# 1. sweeps resume; they print their table; subfolders name the format chosen
# ---------------------------------------------------------------------------------------------
def test_the_same_command_resumes_the_same_sweep(sweep, tree):
    first, again = sweep["first"], sweep["again"]
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert sweep["advice"].endswith(" with: python -m wanexp " + shlex.join(SWEEP)), sweep["advice"]
    assert again is not None and again.returncode == 1 and "Traceback" not in again.stderr
    assert list((tree["outputs"] / "multirun").glob("*/*")) == [sweep["dir"]]  # the same sweep, not a new one
    point = sweep["point"]
    assert f"wanexp: nothing to do: every stage of {point} is finished" in again.stdout
    now = _mtimes(point)
    assert {p: t for p, t in now.items() if sweep["before"].get(p) != t} == {}  # the finished point: untouched
    assert sorted(p.name for p in sweep["dir"].iterdir() if p.is_dir() and p.name[0].isdigit()) == \
        ["0_rtn_mxfp4_ceil", "1_rtn_hif4"]
    # the failing point is reported, the finished one kept
    assert "error in sweep job 1" in first.stderr and "1 of 2 sweep runs failed" in first.stderr
    failed = pd.read_csv(sweep["dir"] / "ablation_failed.csv").iloc[0]
    assert failed["format"] == "hif4" and failed["stage"] == "setup" and "at most 2" in failed["error"]


def test_a_sweep_prints_its_table_and_every_row_names_its_run(sweep):
    out = sweep["first"].stdout
    assert re.search(r"^\| method +\| format .*\| run_dir +\|$", out, re.M), out[-3000:]
    assert re.search(r"^\| rtn +\| mxfp4\(scale_rule=ceil\) .*\| 0_rtn_mxfp4_ceil +\|$", out, re.M)
    table = pd.read_csv(sweep["dir"] / "ablation.csv")
    assert list(table["run_dir"]) == [str(sweep["point"])]
    # fidelity is already against each run's BF16 twin: no delta against BF16-vs-itself
    assert "psnr" in table and not {"Δpsnr", "Δssim", "Δlatent_rel_err"} & set(table)
    assert "carry no delta column" in (sweep["dir"] / "ablation.md").read_text()


def latex_problems(tex: str) -> list[str]:
    """What pdflatex would choke on: non-ASCII, and _ ^ # % & outside commands and math."""
    problems = []
    for n, line in enumerate(tex.splitlines(), 1):
        if any(ord(c) > 127 for c in line):
            problems.append(f"line {n}: non-ASCII {line!r}")
        bare = re.sub(r"\$[^$]*\$", "", re.sub(r"\\[A-Za-z]+|\\[^A-Za-z]", "", line))
        if re.search(r"[_^#%]", bare) or (bare.count("&") and "tabular" in line):
            problems.append(f"line {n}: unescaped special character {line!r}")
    return problems


def test_the_latex_table_compiles(sweep, tmp_path):
    tex = sweep["dir"] / "ablation.tex"
    assert latex_problems(tex.read_text()) == []
    assert "\\toprule" in tex.read_text() and "0\\_rtn\\_mxfp4\\_ceil" in tex.read_text()
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed (CI installs texlive-latex-base + texlive-latex-recommended)")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}"
                                      f"\\input{{{tex}}}\\end{{document}}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "doc.pdf").is_file(), proc.stdout[-2000:]


def test_written_files_follow_the_umask(sweep):
    point = sweep["point"]
    files = [point / "results.csv", point / "results.parquet", point / "summary.txt", point / "generate.json",
             point / "artifact" / "quantized.safetensors", *point.glob("videos/*.mp4"), *point.glob("latents/*"),
             *(sweep["dir"] / f"ablation.{ext}" for ext in ("csv", "md", "tex"))]
    assert len(files) == 10 and {str(p): mode(p) for p in files} == {str(p): 0o644 for p in files}


def test_the_results_row_says_what_made_it(sweep):
    from importlib.metadata import version

    import torch

    import wanexp
    row = pd.read_csv(sweep["point"] / "results.csv").iloc[0]
    assert row["wanexp_version"] == wanexp.__version__ and row["torch_version"] == torch.__version__
    assert row["diffusers_version"] == version("diffusers") and row["device_name"].startswith("cpu")
    cuda = None if pd.isna(row["cuda_version"]) else f"{row['cuda_version']}"
    assert cuda == torch.version.cuda and pd.Timestamp(row["date"]).year >= 2025
    repo = Path(wanexp.__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert str(row["git_commit"]).startswith(sha) if sha else pd.isna(row["git_commit"])
    assert len(row["artifact_sha256"]) == 64 and "in this run" in row["timing_source"]


def test_stages_say_what_they_did_and_the_log_holds_the_same_lines(sweep):
    point, out = sweep["point"], sweep["first"].stdout
    for k, stage in enumerate(("calibrate", "quantize", "generate", "evaluate", "report"), 1):
        assert f"[{k}/5] {stage}\n" in out
    assert re.search(r"^      calibrate done in [\d.]+ s; skipped: quant=rtn needs no calibration statistics$", out, re.M)
    assert re.search(r"^      quantize done in [\d.]+ s; wrote artifact/ \(3 files\)$", out, re.M)  # artifact, choices, layer seconds
    assert re.search(r"^      generate done in [\d.]+ s; wrote generate\.json, latents/, layer_calls\.rank0\.json, "
                     r"manifest\.jsonl, videos/;"
                     r" in .*reference_cache/\w+: latents/, manifest\.jsonl, videos/$", out, re.M)
    logged = [re.sub(r"^\[[\d\- :]+\] ", "", line) for line in (point / "wanexp.log").read_text().splitlines()]
    printed = (out + sweep["again"].stdout).splitlines()  # the log holds both attempts
    assert len(logged) > 12 and [line for line in logged if line not in printed] == []
    assert "[3/5] generate" in logged and any(line.startswith("wanexp  method=rtn") for line in logged)


# ---------------------------------------------------------------------------------------------
# 2. every setting checked at start; the per-stage resume rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["quant.bins=0"], "quant.bins=0 is not allowed: quant.bins takes an integer >= 1"),
    (["quant=tsclip", "quant.clip_candidates=[1.5,-0.2]"],
     "quant.clip_candidates=[1.5, -0.2] is not allowed: quant.clip_candidates takes a non-empty list, each a number in (0, 1]"),
    (["quant=svdquant_gptq", "quant.rank=-3"], "quant.rank=-3 is not allowed: quant.rank takes an integer >= 0"),
    (["model.generation.height=0"], "model.generation.height=0 is not allowed: model.generation.height takes an "
                                    "integer >= 16, a multiple of 16"),
    (["model.generation.num_inference_steps=0"], "model.generation.num_inference_steps=0 is not allowed"),
    (["+format.weight.scale_rule=round"], "format.weight={scale_rule: round} is not allowed for format.name=mxfp4: "
                                          "mxfp4: scale_rule must be 'floor' or 'ceil', got 'round'"),
    (["paths.reference_cache=/proc/nope"], "cannot write the reference video cache /proc/nope: /proc is not writable"),
])
def test_a_bad_setting_is_one_line_before_anything_loads(tree, args, message):
    run_dir = tree["root"] / "bad" / "_".join(re.sub(r"\W", "", a) for a in args)
    proc = wanexp([*args, "logger=none", "progress=false", f"hydra.run.dir={run_dir}"], tree["cwd"], tree["cache"])
    assert proc.returncode == 2 and len(lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert lines(proc.stderr)[0].startswith("wanexp: error: ") and message in proc.stderr
    assert json.loads((run_dir / "error.json").read_text())["stage"] == "setup"
    assert not (run_dir / "model.json").exists() and not (run_dir / "stages").exists()  # no model was loaded


def test_an_unwritable_run_directory_is_one_line(tree):
    proc = wanexp(["hydra.run.dir=/proc/nope/run", "progress=false"], tree["cwd"], tree["cache"])
    assert proc.returncode == 2 and len(lines(proc.stderr)) == 1  # as root, os.access would have said yes
    assert re.fullmatch(r"wanexp: error: cannot write the output directory /proc/nope/run: /proc is not writable "
                        r"\((No such file or directory|Permission denied)\); set paths\.output_root, WANEXP_OUTPUT_ROOT "
                        r"or hydra\.run\.dir", lines(proc.stderr)[0]), proc.stderr


def test_a_settings_change_no_finished_stage_depends_on_resumes(chain):
    run_dir = chain["dir"]
    assert chain["calibrated"].returncode == 0
    # data.root and data.eval changed after calibration finished: the calibration samples are the same
    nan = chain["nan"]
    assert "holds a run with a different configuration" not in nan.stderr
    assert "[1/5] calibrate: finished earlier" in nan.stdout and "[2/5] quantize" in nan.stdout
    inputs = json.loads((run_dir / "stages" / "calibrate.json").read_text())["inputs"]
    assert inputs["samples.calib"].startswith("1 samples, sha256 ") and "samples.eval" not in inputs
    assert "data.root" not in inputs and inputs["quant.bins"] == 1


def test_a_change_a_finished_stage_depends_on_is_refused_naming_it(chain, tree):
    proc = wanexp([*chain["args"], "quant.bins=2", "progress=false"], tree["cwd"], tree["cache"])
    assert proc.returncode == 2 and len(lines(proc.stderr)) == 1
    assert (f"wanexp: error: {chain['dir']}: quant.bins=1 when calibrate finished, now 2; calibrate cannot be redone "
            "in place (its outputs would mix with new ones)") in proc.stderr


# ---------------------------------------------------------------------------------------------
# 10. NaN/Inf; 9. Ctrl-C, progress without a terminal
# ---------------------------------------------------------------------------------------------
def test_a_nan_stops_the_run_naming_layer_expert_and_timestep_and_keeps_what_finished(chain):
    nan, run_dir = chain["nan"], chain["dir"]
    assert nan.returncode == 2 and "Traceback" not in nan.stderr
    # the first quantized forward of this process is its (1-step) warm-up generation
    assert re.fullmatch(r"wanexp: error: layer blocks\.1\.ffn\.net\.2 of the high_noise expert produced NaN at "
                        r"timestep 999 \(denoising step 1 of 1\); stopped there, finished work is kept \(.*\) "
                        r"\[during the 1-step warm-up generation\]", lines(nan.stderr)[-1]), lines(nan.stderr)[-1]
    after = chain["after_nan"]  # what was on disk right after: the finished stages and their files kept
    assert after["stages"] == ["calibrate.json", "quantize.json"] and after["videos"] == []
    assert after["error"]["stage"] == "generate" and after["error"]["type"] == "NonFiniteError"
    assert (run_dir / "artifact" / "quantized.safetensors").stat().st_mtime_ns == chain["artifact_mtime"]


def test_ctrl_c_ends_with_the_command_that_resumes(chain):
    stopped, run_dir = chain["interrupted"], chain["dir"]
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert lines(stopped.stderr)[-1] == ("wanexp: interrupted; resume with: python -m wanexp "
                                         + shlex.join(in_dir(chain["args"], run_dir.resolve())))
    resumed = chain["resumed"]
    assert "[1/5] calibrate: finished earlier" in resumed.stdout and "[2/5] quantize: finished earlier" in resumed.stdout
    assert (run_dir / "artifact" / "quantized.safetensors").stat().st_mtime_ns == chain["artifact_mtime"]
    assert chain["finished"]  # results written, the error of the attempt before cleared


def test_progress_without_a_terminal_is_plain_lines(chain):
    err = chain["resumed"].stderr  # stderr is a pipe here, as in CI logs
    assert "\r" not in err and re.search(r"^  fidelity: 0/1\n  fidelity: 1/1 \(\d+ s\)$", err, re.M), err[-2000:]


# ---------------------------------------------------------------------------------------------
# 3. timings measured in the run's own process
# ---------------------------------------------------------------------------------------------
def test_a_cached_reference_timing_does_not_leak_into_a_later_row(chain):
    assert {json.loads(line)["seconds"] for line in lines(chain["refs"].read_text())} == {999.0}
    row = pd.read_csv(chain["dir"] / "results.csv").iloc[0]
    assert 0 < row["sec_per_video_bf16"] < 999 and 0 < row["sec_per_video"] < 999
    assert row["timing_source_bf16"].startswith("1 video(s) timed again (made by another process) in this run, "
                                                 "after a 1-step warm-up, on cpu")


# ---------------------------------------------------------------------------------------------
# 6. absolute paths; a moved run directory
# ---------------------------------------------------------------------------------------------
def test_recorded_paths_are_absolute_and_an_evaluation_change_redoes_only_what_depends_on_it(chain, tree):
    gen = json.loads((chain["dir"] / "generate.json").read_text())
    assert all(Path(gen[k]).is_absolute() for k in ("reference_dir", "quant_dir", "run_dir"))
    elsewhere = tree["root"] / "B"  # another working directory: the recorded paths still lead to the videos
    elsewhere.mkdir(exist_ok=True)
    proc = wanexp([*chain["args"], "progress=false", "+evaluate.vbench.chunk_size=8"], elsewhere, tree["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("evaluate", "report"):
        assert (f"wanexp: {stage}: redone, evaluate.vbench.chunk_size=(unset) when {stage} finished, now 8"
                in proc.stdout), proc.stdout[-2000:]
    assert "[3/5] generate: finished earlier" in proc.stdout and "[4/5] evaluate\n" in proc.stdout


def test_a_moved_run_directory_reads_its_files_where_it_is_now(chain, tree):
    moved = tree["root"] / "moved"
    shutil.copytree(chain["dir"], moved)
    (moved / "eval" / "fidelity.jsonl").unlink()
    proc = wanexp(in_dir([*chain["base"], "stage=evaluate", "progress=false"], moved), tree["root"], tree["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wanexp: {moved} was recorded at {chain['dir']}; paths inside it are read from here" in proc.stdout
    assert len(lines((moved / "eval" / "fidelity.jsonl").read_text())) == 1


# ---------------------------------------------------------------------------------------------
# 4. checksums: artifact, calibration statistics, reference latents
# ---------------------------------------------------------------------------------------------
def _flip(path: Path, tensor: str | None = None) -> str:
    """Flip 64 data bytes in the middle of a tensor of a safetensors file (the largest by default)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    name = tensor or max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    lo, hi = header[name]["data_offsets"]
    mid = 8 + n + (lo + hi) // 2 - 32
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))
    return name


def test_a_corrupted_artifact_is_refused_naming_the_tensor_before_any_model_loads(chain, tree):
    bad = tree["root"] / "corrupt.safetensors"
    shutil.copy(chain["dir"] / "artifact" / "quantized.safetensors", bad)
    name = _flip(bad)
    run_dir = tree["root"] / "reuse_corrupt"
    proc = wanexp([*CALIB, *SMALL, "progress=false", f"quant.load={bad}", f"hydra.run.dir={run_dir}"],
                  tree["cwd"], tree["cache"])
    assert proc.returncode == 2 and lines(proc.stderr) == [
        f"wanexp: error: quantized artifact {bad}: tensor {name!r} does not match its checksum: the file was modified "
        "or damaged; re-run the quantize stage (or point quant.load at an intact copy)"]
    assert json.loads((run_dir / "error.json").read_text())["stage"] == "setup" and not (run_dir / "model.json").exists()


def test_a_reused_artifact_is_recorded_by_hash_and_cached_references_lend_no_timing(chain, tree):
    good = tree["root"] / "intact.safetensors"
    shutil.copy(chain["dir"] / "artifact" / "quantized.safetensors", good)
    run_dir = tree["root"] / "reuse"
    proc = wanexp([*CALIB, *SMALL, "progress=false", f"quant.load={good}", f"hydra.run.dir={run_dir}"],
                  tree["cwd"], tree["cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    quantized = json.loads((run_dir / "stages" / "quantize.json").read_text())
    made = json.loads((chain["dir"] / "stages" / "quantize.json").read_text())
    assert quantized["loaded"] == str(good) and quantized["artifact_sha256"] == made["artifact_sha256"]
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["artifact_sha256"] == made["artifact_sha256"]
    # its BF16 references came from the cache (with their old 999 s): not measured here, and not borrowed
    assert pd.isna(row["sec_per_video_bf16"]) and pd.isna(row["fps_bf16"]) and row["timing_source_bf16"].startswith(
        "not measured in this run: its BF16 references came from the cache (timing.bf16_twin=true")
    assert 0 < row["sec_per_video"] < 999 and row["timing_source"].startswith("1 video(s) generated in this run")


def test_corrupted_reference_latents_are_refused_naming_the_file(chain, tree):
    latents = chain["refs"].parent / json.loads(lines(chain["refs"].read_text())[0])["latents"]
    saved = latents.read_bytes()
    _flip(latents, "latents")
    copy = tree["root"] / "copy_for_latents"
    shutil.copytree(chain["dir"], copy)
    (copy / "eval" / "fidelity.jsonl").unlink()  # so that evaluate reads the latents again
    try:
        proc = wanexp(in_dir([*chain["base"], "stage=evaluate", "progress=false"], copy), tree["cwd"], tree["cache"])
    finally:
        latents.write_bytes(saved)
    assert proc.returncode == 2 and lines(proc.stderr)[-1] == (
        f"wanexp: error: latents {latents}: tensor 'latents' does not match its checksum: the file was modified or "
        f"damaged; delete it and the video beside it ({latents.stem}.mp4), then re-run stage=generate: that video "
        "alone is made again")
    assert json.loads((copy / "error.json").read_text())["stage"] == "evaluate"


def test_corrupted_calibration_statistics_are_refused_naming_the_tensor(chain, tree):
    stats = Path(json.loads((chain["dir"] / "stages" / "calibrate.json").read_text())["stats_dir"])
    part = next(stats.glob("stats-*part*.safetensors"))
    saved = part.read_bytes()
    name = _flip(part)
    run_dir = tree["root"] / "recalib"
    try:  # the same calibration settings: the cached (now damaged) part is reused, and checked when read
        proc = wanexp([*CALIB, *SMALL, "progress=false", f"hydra.run.dir={run_dir}"], tree["cwd"], tree["cache"])
    finally:
        part.write_bytes(saved)
    assert proc.returncode == 2 and lines(proc.stderr)[-1].startswith(
        f"wanexp: error: calibration statistics part {part}: tensor {name!r} does not match its checksum")
    parts = sorted(stats.glob("stats-*part*.safetensors"))
    assert len(parts) == 2  # one part per expert (experts are calibrated one after the other)
    assert json.loads((run_dir / "stages" / "calibrate.json").read_text())["parts_reused"] == len(parts)
    assert not (run_dir / "stages" / "quantize.json").exists()


# ---------------------------------------------------------------------------------------------
# smaller: --help, a fresh cache's mode
# ---------------------------------------------------------------------------------------------
def test_help_lists_only_groups_python_m_wanexp_accepts(tree):
    out = wanexp(["--help"], tree["cwd"], tree["cache"]).stdout
    assert re.search(r"^quant: ", out, re.M) and not re.search(r"^bench: ", out, re.M)
    bench = subprocess.run([sys.executable, "-m", "wanexp.bench", "--cfg", "job"], capture_output=True, text=True,
                           cwd=tree["cwd"], env=_env(tree["cache"]))
    assert bench.returncode == 0 and "name: bench_smoke" in bench.stdout


def test_a_fresh_cache_follows_the_umask(tree):
    fresh = tree["root"] / "fresh_cache"
    run_dir = tree["root"] / "fresh_run"
    proc = wanexp(["stage=report", "progress=false", f"hydra.run.dir={run_dir}"], tree["cwd"], fresh)
    assert proc.returncode == 2 and lines(proc.stderr) == [
        f"wanexp: error: {run_dir} has no evaluation yet (run stage=evaluate first)"]
    built = next(fresh.glob("opens2v-eval-tiny-*"))  # the fixture is read (and built) at setup
    assert mode(fresh) == 0o755 and mode(built) == 0o755 and mode(next(built.glob("*.json"))) == 0o644
