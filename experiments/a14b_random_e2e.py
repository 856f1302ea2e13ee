"""One full-size run end to end on the GPU (issue 13 item 4), killed and resumed.

``python experiments/a14b_random_e2e.py OUT_DIR [overrides...]`` runs ``python -m wanexp
model=a14b_random quant=tsclip …`` (full width; reduced depth, steps, samples and video length so it
fits one command), SIGKILLs it once in calibration (as soon as the first expert's pass is on disk)
and once in generation (as soon as the first video is), re-runs the same command to the end, then
rebuilds the W4A4 outputs from the artifact with ``quant.load=``. It writes ``OUT_DIR/a14b_e2e.json``:
what each attempt found done and redid (the calibrate stage's own record, file modification times),
that every video is in its manifest exactly once, and the reload's latent difference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("WANEXP_E2E_ROOT", "/tmp/a14b_e2e"))
# all four attempts end by this many seconds after the start (a device command has 10 minutes)
DEADLINE = time.time() + float(os.environ.get("WANEXP_E2E_DEADLINE_S", "1e9"))
# WANEXP_E2E_MODEL=tiny: the same kill/resume choreography with the tiny model (a CPU check of this script)
MODEL = (["model=a14b_random", "model.num_layers=2"] if os.environ.get("WANEXP_E2E_MODEL", "a14b_random") == "a14b_random"
         else [f"model={os.environ['WANEXP_E2E_MODEL']}"])
ARGS = [*MODEL, "quant=tsclip", "data=tiny", "data.calib.num_samples=2",
        "data.eval.num_samples=2", "model.generation.num_inference_steps=4", "model.generation.height=480",
        "model.generation.width=832", "model.generation.num_frames=17", "logger=none", "progress=false",
        f"paths.output_root={ROOT}"]


def command(run_dir: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "wanexp", *ARGS, *sys.argv[2:], *extra, f"hydra.run.dir={run_dir}"]


def attempt(run_dir: Path, log, kill_when=None, extra=(), timeout=900) -> dict:
    start = time.time()
    timeout = min(timeout, DEADLINE - start)
    proc = subprocess.Popen(command(run_dir, extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    while proc.poll() is None and time.time() - start < timeout:
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = round(time.time() - start, 1)
            break
        time.sleep(0.2)
    cut = proc.poll() is None
    if cut:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"rc": proc.returncode, "seconds": round(time.time() - start, 1), "killed_at_s": killed,
            "cut_at_deadline": cut and killed is None}


def files(pattern_root: Path, pattern: str) -> dict[str, float]:
    return {str(p.relative_to(ROOT)): p.stat().st_mtime for p in pattern_root.rglob(pattern)} if pattern_root.exists() else {}


def manifest_counts(path_glob: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for manifest in ROOT.rglob(path_glob):
        for line in manifest.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            counts[f"{manifest.parent.name}/{rec['id']}"] = counts.get(f"{manifest.parent.name}/{rec['id']}", 0) + 1
    return counts


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    import shutil
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    run_dir = ROOT / "run"
    record: dict = {"command": " ".join(command(run_dir)[1:]), "attempts": []}

    def keep() -> None:  # after every attempt: a command cut off at its limit keeps what it ran
        (out / "a14b_e2e.json").write_text(json.dumps(record, indent=1, default=str))
    with open(out / "a14b_e2e.log", "w") as log:
        # 1. killed in calibration: once the high-noise expert's pass is written
        first_pass = lambda: any(ROOT.rglob("stats-high_noise-part000-of001.safetensors"))  # noqa: E731
        a = attempt(run_dir, log, kill_when=first_pass)
        a["after"] = {"stats_parts": files(ROOT / "calib_cache", "stats-*.safetensors"),
                      "quant_parts": files(run_dir / "artifact" / "parts", "*.safetensors")}
        record["attempts"].append({"name": "killed in calibration", **a})
        keep()
        # 2. killed in generation: once the first video is in a manifest
        def first_video():
            return any(p.read_text().strip() for p in ROOT.rglob("manifest*.jsonl"))
        a = attempt(run_dir, log, kill_when=first_video)
        a["calibrate"] = json.loads((run_dir / "stages" / "calibrate.json").read_text()) \
            if (run_dir / "stages" / "calibrate.json").is_file() else None
        if a["calibrate"]:
            a["calibrate"].pop("step_times", None)
        a["after"] = {"stats_parts": files(ROOT / "calib_cache", "stats-*.safetensors"),
                      "videos": files(ROOT, "*.mp4")}
        record["attempts"].append({"name": "killed in generation", **a})
        keep()
        # 3. the same command to the end
        a = attempt(run_dir, log)
        a["after"] = {"videos": files(ROOT, "*.mp4"), "stages": sorted(p.stem for p in (run_dir / "stages").glob("*.json"))}
        record["attempts"].append({"name": "resumed to the end", **a})
        keep()
        # 4. the artifact rebuilds the same W4A4 outputs
        reload_dir = ROOT / "reload"
        a = attempt(reload_dir, log, extra=[f"quant.load={run_dir / 'artifact' / 'quantized.safetensors'}"])
        record["attempts"].append({"name": "quant.load of the artifact", **a})
        keep()
    record["manifest_lines_per_video"] = manifest_counts("manifest*.jsonl")
    record["videos_made_twice"] = {k: v for k, v in record["manifest_lines_per_video"].items() if v > 1}
    try:
        from safetensors.torch import load_file
        diffs = {}
        for p in sorted((run_dir / "latents").glob("*.safetensors")):
            q = ROOT / "reload" / "latents" / p.name
            a, b = load_file(str(p))["latents"], load_file(str(q))["latents"]
            diffs[p.stem] = float((a - b).abs().max())
        record["reload_max_abs_latent_diff"] = diffs
    except Exception as err:  # noqa: BLE001  (recorded, not hidden)
        record["reload_error"] = repr(err)
    for name in ("results.csv", "summary.txt"):
        if (run_dir / name).is_file():
            record[name] = (run_dir / name).read_text()
    (out / "a14b_e2e.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps({k: v for k, v in record.items() if k not in ("results.csv",)}, indent=1, default=str)[-6000:])


if __name__ == "__main__":
    main()
