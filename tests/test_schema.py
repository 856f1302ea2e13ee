"""The config schema (wanexp.schema): every yaml composes onto it, an unknown key or a wrong type is
refused in one line before anything loads, and run directories of the version before it still resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from wanexp.api import compose
from wanexp.config import (DEAD_KEYS, check_legacy_config, check_settings, resume_plan, schema_error,
                           stage_inputs)
from wanexp.errors import WanexpError
from wanexp.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
OPTIONS = [f"{d.name}={f.stem}" for d in sorted(CONF.iterdir()) if d.is_dir() and d.name not in ("hydra",)
           for f in sorted(d.glob("*.yaml")) if d.name not in ("experiment", "ablation")]
OPTIONS += [f"+{g}={f.stem}" for g in ("experiment", "ablation") for f in sorted((CONF / g).glob("*.yaml"))]


def cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), WANEXP_OUTPUT_ROOT=str(cwd / "outputs"))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "wanexp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_yaml_composes_onto_the_schema():
    assert len(OPTIONS) > 40
    for option in OPTIONS:
        cfg = compose([option])
        assert OmegaConf.get_type(cfg.quant).__name__ == "QuantSchema", option
        check_settings(cfg)  # and its values are in range
    # a method's yaml names what it sets; the rest are the schema's defaults, once
    assert compose(["quant=rtn"]).quant.calib_tokens == 256 and compose(["quant=awq"]).quant.calib_tokens == 512
    assert "weights" not in compose(["quant=bf16"]).quant and "needs" not in compose(["quant=w4a16"]).quant


@pytest.mark.parametrize("args,message", [
    (["quant.rnak=8"], "quant.rnak is not a setting (quant has no key 'rnak'; did you mean quant.rank?)"),
    (["quant=svdquant_rtn", "quant.rank=abc"], "quant.rank=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["+quant.rnak=8"], "quant.rnak is not a setting (quant has no key 'rnak'; did you mean quant.rank?)"),
    (["+sede=3"], "sede is not a setting (the top level has no key 'sede'; did you mean seed?)"),
    (["-m", "quant.rnak=1,2"], "quant.rnak is not a setting (quant has no key 'rnak'; did you mean quant.rank?)"),
])
def test_an_unknown_key_or_a_wrong_type_is_one_line_before_anything_loads(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc = cli([*args, "logger=none", "progress=false", f"hydra.run.dir={run_dir}"], tmp_path)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("wanexp: error: ") and message in err[0], err[0]
    assert not (run_dir / "model.json").exists() and not (run_dir / "stages").exists()  # no model was loaded
    if args[0].startswith("+"):  # composed (Hydra lets + add a key): refused by the schema at setup
        assert json.loads((run_dir / "error.json").read_text())["stage"] == "setup"


def test_a_yaml_with_an_unknown_key_is_refused_naming_it(tmp_path):
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "typo.yaml").write_text("defaults:\n  - rtn\n  - _self_\nname: rtn\nclip_candidate: [0.9]\n")
    with pytest.raises(WanexpError, match=r"In 'quant/typo'.*quant\.clip_candidate is not a setting .*"
                                          r"did you mean quant\.clip_candidates\?"):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "quant=typo"])


def test_help_and_cfg_job_still_work(tmp_path):
    assert "== Configuration groups ==" in cli(["--help"], tmp_path).stdout
    job = cli(["--cfg", "job", "quant=tsclip"], tmp_path)
    assert job.returncode == 0 and OmegaConf.create(job.stdout).quant.clip_search is True


def test_schema_errors_are_one_line():
    from omegaconf.errors import ConfigKeyError
    err = ConfigKeyError("Key 'bnis' not in 'QuantSchema'")
    err.full_key = "quant.bnis"
    assert schema_error(err) == "quant.bnis is not a setting (quant has no key 'bnis'; did you mean quant.bins?)"


# ---------------------------------------------------------------------------------------------
# resuming a run directory of the version before the schema
# ---------------------------------------------------------------------------------------------
def _old_record(option: str) -> tuple[dict, dict]:
    """(what the older version recorded, what this one records) for ``option``: the older version's
    config had the dead keys and only the quant and model keys their yaml named."""
    cfg = compose([option])
    now = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    yaml_keys = set(OmegaConf.load(CONF / "quant" / f"{cfg.quant.name}.yaml")) | {"name", "bins", "load"}
    old = json.loads(json.dumps(now))
    old["quant"] = {k: v for k, v in old["quant"].items() if k in yaml_keys}
    old["quant"].update(weights=True, needs=[])
    old["model"] = {k: v for k, v in old["model"].items() if k in OmegaConf.load(CONF / "model" / "tiny.yaml")}
    return old, now


@pytest.mark.parametrize("option", ["quant=rtn", "quant=w4a16", "quant=bf16"])
def test_a_run_directory_of_the_older_version_resumes(tmp_path, option):
    old, now = _old_record(option)
    samples = {"calib": "2 samples, sha256 x", "eval": "6 samples, sha256 y"}
    recorded, current = stage_inputs(old, samples), stage_inputs(now, samples)
    assert {"quant.weights", "quant.needs"} & set(recorded["calibrate"]) | set(recorded["quantize"])
    assert set(current["quantize"]) - set(recorded["quantize"])  # keys the schema added
    assert "model.vae_tiling" in current["calibrate"] and "model.vae_tiling" not in recorded["calibrate"]
    finished = {s: {"inputs": recorded[s]} for s in ("calibrate", "quantize", "generate")}
    plan = resume_plan(finished, current, ("calibrate", "quantize", "generate", "evaluate", "report"), tmp_path,
                       explicit=False)
    assert plan.redo == [] and plan.notes == []  # nothing redone, nothing refused
    # a real change is still seen: the older run's bins against new ones
    changed = stage_inputs(dict(now, quant=dict(now["quant"], bins=2)), samples)
    with pytest.raises(WanexpError, match="quant.bins=1 when calibrate finished, now 2; calibrate cannot be redone"):
        resume_plan(finished, changed, ("calibrate",), tmp_path, explicit=False)
    # a run directory older still (markers without inputs): the whole-config rule, migrated the same way
    RunDir(tmp_path).config.write_text(json.dumps(old))
    check_legacy_config(now, tmp_path, {"calibrate": {}})
    with pytest.raises(WanexpError, match=r"holds a run with a different configuration \(quant.bins differ\)"):
        check_legacy_config(dict(now, quant=dict(now["quant"], bins=3)), tmp_path, {"calibrate": {}})


def test_the_dead_keys_are_gone_from_the_yaml_and_the_readers():
    for f in (CONF / "quant").glob("*.yaml"):
        assert not {k.split(".")[1] for k in DEAD_KEYS} & set(OmegaConf.load(f)), f.name
