"""The papers' diagnostic figures: their data (wanexp.analysis), what calibration and quantization
record for them, the drawing, stage=analyze, and notebooks/analysis.ipynb executed top to bottom."""

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wanexp import analysis as A
from wanexp.calib import ActivationCollector, CalibStats
from wanexp.calib.collect import load_traces
from wanexp.errors import WanexpError
from wanexp.quant.context import TimestepBins, TimestepContext

REPO = Path(__file__).resolve().parents[1]
MODULES = A.MODULE_TYPES


# ---------------------------------------------------------------------------------------------
# calibration: per-step traces
# ---------------------------------------------------------------------------------------------
def test_collector_traces_per_step_max_and_percentile(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4), nn.Linear(4, 4))
    ctx = TimestepContext(bins=TimestepBins((900.0,)))
    stats = CalibStats()
    col = ActivationCollector("high_noise", model, ["0", "1"], ctx, ["absmax"], stats, trace_layers=["0"],
                              trace_percentile=90.0, trace_tokens=1000)
    seen = {}
    for t in (999.0, 937.0, 833.0):
        for _ in range(2):  # the two CFG passes of one step share its timestep
            ctx.set_timestep(t)
            x = torch.randn(2, 50, 16) * (1 + t / 100)
            seen.setdefault(t, []).append(x.reshape(-1, 16))
            model(x)
    col.remove()
    assert list(stats.trace) == [("high_noise", "0")]  # only the traced layer
    stats.save(tmp_path / "s.safetensors")
    back = CalibStats.load(tmp_path / "s.safetensors")
    assert back.bins_of("high_noise", "0") == [0, 1]  # the trace does not pose as a bin
    tr = load_traces([tmp_path / "s.safetensors"])[("high_noise", "0")]
    assert torch.equal(tr["timestep"], torch.tensor([999.0, 937.0, 833.0], dtype=torch.float64))
    assert tr["absmax"].shape == tr["pct"].shape == (3, 16) and tr["count"].tolist() == [2, 2, 2]
    for s, t in enumerate((999.0, 937.0, 833.0)):
        xs = seen[t]
        assert torch.equal(tr["absmax"][s], torch.maximum(*[x.abs().amax(0) for x in xs]))
        # the percentile is numpy's inverted-CDF percentile of |x| per channel, averaged over the step's forwards
        want = np.mean([np.percentile(x.abs().numpy(), 90.0, axis=0, method="inverted_cdf") for x in xs], axis=0)
        np.testing.assert_allclose(tr["pct"][s].numpy(), want, rtol=1e-6)
    assert float(tr["percentile"]) == 90.0
    assert torch.equal(back.trace[("high_noise", "0")]["absmax"], tr["absmax"])


def test_trace_percentile_is_taken_over_a_strided_subsample():
    from wanexp.calib.collect import StepTrace
    x = torch.randn(1000, 8)
    tr = StepTrace(percentile=50.0, max_tokens=100)
    tr.observe(500.0, x)
    out = tr.tensors()
    sub = x[::10].abs().numpy()
    np.testing.assert_allclose(out["pct"][0].numpy(), np.percentile(sub, 50.0, axis=0, method="inverted_cdf"))
    assert torch.equal(out["absmax"][0], x.abs().amax(0))  # the max is over every token


def test_trace_spec_resolves_auto_for_tiny_and_a14b_and_refuses_unknown_layers():
    def names(n):
        return [f"blocks.{b}.{m}" for b in range(n) for m in MODULES]
    assert A.trace_spec({"layers": "auto"}, names(4))["layers"] == ["blocks.2.ffn.net.2"]
    spec = A.trace_spec({"layers": "auto", "percentile": 99.0, "trace_tokens": 512}, names(40))
    assert spec == {"layers": ["blocks.20.ffn.net.2"], "percentile": 99.0, "tokens": 512}
    assert A.trace_spec({"layers": ["blocks.1.attn1.to_q"]}, names(4))["layers"] == ["blocks.1.attn1.to_q"]
    assert A.trace_spec({"layers": []}, names(4)) == {}
    with pytest.raises(WanexpError, match="blocks.9.ffn.net.2"):
        A.trace_spec({"layers": ["blocks.9.ffn.net.2"]}, names(4))


# ---------------------------------------------------------------------------------------------
# quantization: reconstruction errors, ranking, keep policy
# ---------------------------------------------------------------------------------------------
def _tsclip(fmt="mxfp4", **opts):
    from wanexp.quant.methods import method_config
    quant = {"name": "tsclip", "activations": True, "smoothing": "max", "alpha": 0.5, "rank": 0, "residual": "gptq",
             "gptq": {"block_size": 32}, "clip_search": True, "clip_candidates": [0.7, 0.8, 0.9, 1.0]}
    return method_config(quant, {"name": fmt, "weight": dict(opts), "act": dict(opts)}, num_bins=2,
                         compute_dtype=torch.float32)


def _layers(seed=0):
    """Seeded layers named like the model's, with calibration statistics (tokens in bins 0 and 1)."""
    from wanexp.quant.methods import LayerStats
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(2):
        for k, module in enumerate(MODULES[:4] + MODULES[-2:]):
            lin = nn.Linear(64, 32)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(32, 64, generator=g) * (0.5 + k / 4))
            tokens = {b: torch.randn(64, 64, generator=g) * (1 + k * torch.rand(64, generator=g) ** 4) for b in (0, 1)}
            x = torch.cat(list(tokens.values()))
            out[f"blocks.{block}.{module}"] = (lin, LayerStats(absmax=x.abs().amax(0), hessian=x.T @ x, tokens=tokens))
    return out


def _sensitivities(method):
    layers = _layers()
    method.stats = {n: s for n, (_, s) in layers.items()}
    for name, (lin, _) in layers.items():
        method.build(name, lin)
    return {"high_noise": dict(method.report)}


@pytest.fixture
def one_thread():
    """These matrices are tiny: one intra-op thread is fastest, and on a busy 2-core machine two
    OpenMP threads wait on each other (15x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sensitivity_numbers_are_recorded_and_deterministic(one_thread):
    first, second = _sensitivities(_tsclip(scale_rule="ceil")), _sensitivities(_tsclip(scale_rule="ceil"))
    assert first == second  # two computations, same numbers
    for c in first["high_noise"].values():
        assert 0 < c["cos_err"] < 1 and 0 < c["w_cos_err"] < 1 and 0 < c["rel_err"] < 1
        assert len(c["cos_err_bins"]) == 2 and all(v is not None and v > 0 for v in c["cos_err_bins"])
    t1, t2 = A.sensitivity_table(first), A.sensitivity_table(second)
    assert t1.attrs["metric"] == "cos_err"
    pd.testing.assert_frame_equal(A.sensitivity_ranking(t1, "module"), A.sensitivity_ranking(t2, "module"))
    pd.testing.assert_frame_equal(A.sensitivity_ranking(t1, "block"), A.sensitivity_ranking(t2, "block"))
    assert A.keep_policy(t1) == A.keep_policy(t2)
    # a finer format reconstructs the same layers better: the numbers measure quantization error
    fine = A.sensitivity_table(_sensitivities(_tsclip("int8")))
    assert (fine.set_index("layer")["cos_err"] < t1.set_index("layer")["cos_err"]).all()


def test_sensitivity_without_tokens_is_weight_only():
    from wanexp.quant.methods import method_config
    rtn = method_config({"name": "rtn", "activations": True}, {"name": "mxfp4"}, num_bins=1)
    lin = nn.Linear(64, 32)
    rtn.build("blocks.0.ffn.net.2", lin)
    rep = rtn.report["blocks.0.ffn.net.2"]
    assert "cos_err" not in rep and 0 < rep["w_cos_err"] < 1
    table = A.sensitivity_table({"low_noise": rtn.report})
    assert table.attrs["metric"] == "w_cos_err" and table["error"].iloc[0] == rep["w_cos_err"]


def _table(errors: dict[str, float], experts=("high_noise", "low_noise")) -> pd.DataFrame:
    chosen = {e: {n: {"cos_err": v * (1.5 if e == "low_noise" else 1.0), "w_cos_err": v} for n, v in errors.items()}
              for e in experts}
    return A.sensitivity_table(chosen)


def test_keep_policy_turns_the_ranking_into_expert_overrides():
    from hydra import compose, initialize_config_dir
    from wanexp.quant.targets import kept
    errors = {f"blocks.{b}.{m}": (10.0 if m in ("attn1.to_out.0", "ffn.net.2") else 1.0) * (1 + b / 10)
              for b in range(6) for m in MODULES}
    table = _table(errors)
    grid = A.sensitivity_map(table, "high_noise")
    assert list(grid.index) == list(MODULES) and list(grid.columns) == list(range(6))
    ranking = A.sensitivity_ranking(table, "module")
    assert set(ranking["module"][:2]) == {"attn1.to_out.0", "ffn.net.2"} and list(ranking["rank"]) == list(range(1, 11))
    policy = A.keep_policy(table, modules=2, blocks=1)
    assert sorted(policy["keep_modules"]) == ["blocks.*.attn1.to_out.0", "blocks.*.ffn.net.2"]
    assert policy["keep_blocks"] == [5]  # the deepest block has the largest errors here
    assert {n for n in errors if kept(n, policy["keep_blocks"], policy["keep_modules"])} == \
        {n for n in errors if n.startswith("blocks.5.") or n.endswith(("attn1.to_out.0", "ffn.net.2"))}
    per = A.keep_policy(table, modules=1, per_expert=True)
    # the overrides are valid Hydra overrides of the expert group
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=policy["overrides"] + per["overrides"])
    assert sorted(cfg.expert.keep_modules) == sorted(policy["keep_modules"]) and list(cfg.expert.keep_blocks) == [5]
    assert len(cfg.expert.low_noise.keep_modules) == 1


# ---------------------------------------------------------------------------------------------
# clip distribution, quality vs memory
# ---------------------------------------------------------------------------------------------
def _fake_run(tmp_path, chosen, quant, bins, boundary=900.0):
    from wanexp.io import write_json
    from wanexp.quant.artifact import save_artifact
    run = tmp_path / "run"
    save_artifact(run / "artifact" / "quantized.safetensors", {"high_noise": nn.Module(), "low_noise": nn.Module()},
                  {"method": quant["name"], "boundary": boundary, "expert_policy": "per_expert", "quant": quant,
                   "bins": {e: {"edges": v} for e, v in bins.items()}, "fingerprint": "x"})
    write_json(run / "artifact" / "choices.json", chosen)
    write_json(run / "wanexp_config.json", {"quant": quant, "format": {"name": "mxfp4"}, "model": {"name": "tiny"}})
    return run


def test_clip_distribution_per_expert_and_bin(tmp_path):
    chosen = {"high_noise": {"blocks.0.ffn.net.2": {"clip": [0.8, 1.0]}, "blocks.0.attn1.to_q": {"clip": [0.8, 0.9]},
                             "blocks.1.ffn.net.2": {"clip": [0.9, 0.9]}},
              "low_noise": {"blocks.0.ffn.net.2": {"clip": [0.6, 0.8]}}}
    quant = {"name": "tsclip", "clip_search": True, "clip_candidates": [0.6, 0.8, 0.9, 1.0]}
    run = _fake_run(tmp_path, chosen, quant, {"high_noise": [950.0], "low_noise": [450.0]})
    df = A.clip_distribution(run)
    assert df.attrs["candidates"] == [0.6, 0.8, 0.9, 1.0] and df.attrs["clip_search"]
    assert set(df["expert"]) == {"high_noise", "low_noise"}
    assert sorted(df[df["expert"] == "high_noise"]["bin"].unique()) == [0, 1]
    np.testing.assert_allclose(df.groupby(["expert", "bin"])["share"].sum(), 1.0)
    share = df.set_index(["expert", "bin", "ratio"])["share"]
    assert share[("high_noise", 0, 0.8)] == pytest.approx(2 / 3) and share[("high_noise", 1, 0.9)] == pytest.approx(2 / 3)
    assert share[("low_noise", 1, 0.8)] == 1.0
    labels = df.drop_duplicates(["expert", "bin"]).set_index(["expert", "bin"])["bin_label"]
    assert labels[("high_noise", 0)] == "950–1000" and labels[("high_noise", 1)] == "900–950"
    assert labels[("low_noise", 0)] == "450–900" and labels[("low_noise", 1)] == "0–450"


def test_quality_memory_marks_the_pareto_front():
    rows = pd.DataFrame([
        {"method": "rtn", "format": "mxfp4", "model_size_gb": 1.0, "latent_rel_err": 0.30, "model": "m", "data": "d",
         "seed": 42, "model_size_gb_bf16": 4.0},
        {"method": "tsclip", "format": "mxfp4", "model_size_gb": 1.1, "latent_rel_err": 0.10, "model": "m",
         "data": "d", "seed": 42, "model_size_gb_bf16": 4.0},
        {"method": "svdquant_rtn", "format": "mxfp4", "model_size_gb": 1.2, "latent_rel_err": 0.20, "model": "m",
         "data": "d", "seed": 42, "model_size_gb_bf16": 4.0},
    ])
    df = A.quality_memory(rows)
    assert df.attrs == {"x": "model_size_gb", "y": "latent_rel_err", "lower_is_better": True}
    assert df[df["twin"]][["x", "y"]].values.tolist() == [[4.0, 0.0]]  # one BF16 twin for the three runs
    assert dict(zip(df["method"], df["pareto"])) == {"rtn": True, "tsclip": True, "svdquant_rtn": False, "bf16": True}
    rows["vbench_avg"] = [0.73, 0.80, 0.81]
    rows["vbench_avg_bf16"] = 0.806
    df = A.quality_memory(rows)
    assert df.attrs["y"] == "vbench_avg" and not df.attrs["lower_is_better"]
    # svdquant_rtn (1.2 GB, 0.81) beats the BF16 twin (4 GB, 0.806): the twin is off the front
    assert dict(zip(df["method"], df["pareto"])) == {"rtn": True, "tsclip": True, "svdquant_rtn": True, "bf16": False}
    assert A.pareto_mask([1, 2, 3], [3, 2, 1], y_lower_better=True).tolist() == [True, True, True]
    assert A.pareto_mask([1, 2], [1, 1], y_lower_better=True).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# drawing, and what a run without the data gets
# ---------------------------------------------------------------------------------------------
def test_figures_are_written_as_png_and_pdf_at_a14b_shape(tmp_path):
    from wanexp.report import plots
    rng = np.random.default_rng(0)
    steps, channels = 40, 13824
    t = np.linspace(999, 20, steps)
    trace = A.Trace(layer="blocks.20.ffn.net.2", timestep=t, expert=np.where(t >= 900, "high_noise", "low_noise"),
                    absmax=rng.gamma(2, size=(steps, channels)).astype(np.float32),
                    pct=rng.gamma(1, size=(steps, channels)).astype(np.float32), percentile=99.9,
                    count=np.full(steps, 2), boundary=900.0, bins={"high_noise": [950.0], "low_noise": [300.0, 600.0]})
    groups = A.trace_groups(trace, 8)
    assert len(groups) == steps * 8 and trace.switch_step == int((t >= 900).sum())
    assert groups.groupby("group")["channels"].first().iloc[-1] == f"{channels - channels // 8}-{channels - 1}"
    errors = {f"blocks.{b}.{m}": float(rng.random()) + 1e-3 for b in range(40) for m in MODULES}
    table = _table(errors)
    figs = {"trace": plots.draw_activation_trace(trace), "sens": plots.draw_sensitivity(table),
            "rank": plots.draw_sensitivity_ranking(table)}
    for name, fig in figs.items():
        paths = plots.save_figure(fig, tmp_path / name, dpi=50)
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["pdf"].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{e}" for n in figs for e in ("png", "pdf"))


def test_analyze_with_nothing_to_draw_writes_nothing_and_says_what_is_missing(tmp_path):
    from wanexp.io import write_json
    from wanexp.report.plots import analyze_run
    run = tmp_path / "run"
    write_json(run / "wanexp_config.json", {"quant": {"name": "rtn"}, "format": {"name": "mxfp4"}})
    write_json(run / "stages" / "calibrate.json", {"skipped": "quant=rtn needs no calibration statistics"})
    with pytest.raises(A.NothingToAnalyze) as caught:
        analyze_run(run, {}, logger={"name": "none"})
    err = caught.value
    assert str(err) == (f"nothing to analyze in {run}: no calibration trace, no quantized artifact, no results row, "
                        "no videos")
    assert err.stages == ["quantize", "report", "generate"]  # calibration was skipped: running it records nothing
    trace = str(err.reasons["activation_trace"])
    assert "calibration was skipped: quant=rtn needs no calibration statistics" in trace and "tsclip" not in trace
    assert "stage=quantize" in str(err.reasons["clip_distribution"])
    assert "stage=generate" in str(err.reasons["qualitative"])
    assert not (run / "analysis").exists()  # no index, no figures: nothing pretends the stage did something


def test_skip_reasons_are_true_of_the_run(tmp_path):
    from wanexp.io import write_json
    run = tmp_path / "run"
    write_json(run / "wanexp_config.json", {"quant": {"name": "tsclip"}, "format": {"name": "mxfp4"}})
    with pytest.raises(A.NotRecorded) as caught:  # a method that calibrates, before calibration ran
        A.activation_trace(run)
    assert "calibration has not run" in str(caught.value) and "quant=tsclip" in str(caught.value)
    assert "skipped" not in str(caught.value) and caught.value.stage == "calibrate"
    write_json(run / "stages" / "calibrate.json",
               {"skipped": "quant.load=/a/quantized.safetensors: the artifact is reused, nothing to calibrate"})
    with pytest.raises(A.NotRecorded) as caught:  # the same method reusing an artifact
        A.activation_trace(run)
    assert "skipped for quant=tsclip (quant.load=/a/quantized.safetensors" in str(caught.value)
    assert caught.value.stage is None  # re-running calibration would not record it
    write_json(run / "wanexp_config.json", {"quant": {"name": "bf16"}, "format": {"name": "mxfp4"}})
    with pytest.raises(A.NotRecorded, match="quant=bf16 quantizes nothing"):
        A.clip_distribution(run)


def test_stage_analyze_on_an_empty_directory_fails_naming_what_is_missing(cli, tmp_path):
    empty = tmp_path / "empty"
    proc = cli("quant=tsclip", "stage=analyze", "logger=none", f"hydra.run.dir={empty}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wanexp: error: nothing to analyze in {empty}: no calibration trace, no quantized artifact, no results row, "
        "no videos; run stage=calibrate first (stage=all runs every stage)")
    assert "wanexp: analyze" not in proc.stdout
    assert not (empty / "stages").exists() and not (empty / "analysis").exists()  # not marked done, nothing drawn
    assert json.loads((empty / "error.json").read_text())["stage"] == "analyze"


def test_qualitative_settings_are_checked_at_setup():
    from hydra import compose, initialize_config_dir
    from wanexp.run import validate
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        default = compose("config")
        assert A.qualitative_settings(default.analysis) == {"samples": "worst_best", "count": 1,
                                                            "fractions": [0.0, 0.25, 0.5, 0.75, 1.0]}
        validate(compose("config", overrides=["analysis.qualitative.samples=[singleobj_1,humanobj_1]"]))
        for override, message in (("samples=median", "'median' is not one of worst_best, per_category"),
                                  ("fractions=[0,1.5]", "each must lie in [0, 1]"), ("count=0", "at least 1")):
            with pytest.raises(WanexpError, match=re.escape(message)):
                validate(compose("config", overrides=[f"analysis.qualitative.{override}"]))


def test_analyze_is_an_opt_in_stage():
    from hydra import compose, initialize_config_dir
    from wanexp.run import OPTIONAL_STAGES, STAGES, validate
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["stage=analyze"])
    assert "analyze" not in STAGES and "analyze" in OPTIONAL_STAGES and cfg.analysis.auto is False
    validate(cfg)


# ---------------------------------------------------------------------------------------------
# end to end: the notebook's TS-clip run, stage=analyze, W&B images
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notebook(tmp_path_factory, cache_dir):
    """notebooks/analysis.ipynb executed top to bottom (nbclient); its run directory is checked below."""
    import nbformat
    from nbclient import NotebookClient
    work = tmp_path_factory.mktemp("analysis_nb")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    saved = {k: os.environ.get(k) for k in ("WANEXP_ANALYSIS_DIR", "WANEXP_CACHE")}
    os.environ.update(WANEXP_ANALYSIS_DIR=str(work), WANEXP_CACHE=str(cache_dir))
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"nb": nb, "run": work / "run", "seconds": time.perf_counter() - start}


@pytest.mark.slow
def test_notebook_executes_and_draws_every_figure(notebook):
    outputs = [o for c in notebook["nb"].cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6  # four figures, the ranking, a written PNG
    print(f"notebook: {notebook['seconds']:.0f} s")


@pytest.mark.slow
def test_the_figures_data_are_the_runs(notebook):
    from wanexp.quant.artifact import read_header
    run = notebook["run"]
    header = read_header(run / "artifact" / "quantized.safetensors")
    cfg = json.loads((run / "wanexp_config.json").read_text())
    steps = cfg["model"]["generation"]["num_inference_steps"]
    calib = json.loads((run / "stages" / "calibrate.json").read_text())
    assert calib["traced"] == ["blocks.2.ffn.net.2"] and A.trace_layers(run) == ["blocks.2.ffn.net.2"]
    # Fig. 1: every step of the trajectory, both experts in denoising order, split at the boundary
    trace = A.activation_trace(run)
    in_features = header["layers"]["high_noise"]["blocks.2.ffn.net.2"]["in_features"]
    assert trace.steps == steps and trace.channels == in_features and trace.boundary == header["boundary"]
    assert list(trace.timestep) == sorted(trace.timestep, reverse=True)
    assert list(trace.expert) == ["high_noise" if t >= header["boundary"] else "low_noise" for t in trace.timestep]
    assert {"high_noise", "low_noise"} == set(trace.expert) and (trace.count == 2).all()  # CFG × 1 sample
    assert (trace.absmax >= trace.pct).all() and (trace.pct > 0).all()
    assert trace.bins == {e: v["edges"] for e, v in header["bins"].items()}
    # Fig. 3: the run's experts, bins and candidates
    clip = A.clip_distribution(run)
    assert set(clip["expert"]) == {"high_noise", "low_noise"}
    for expert, b in header["bins"].items():
        assert sorted(clip[clip["expert"] == expert]["bin"].unique()) == list(range(len(b["edges"]) + 1))
    for expert, b in header["bins"].items():  # the bins follow the 4-step schedule: at most one a step (README)
        assert len(b["edges"]) + 1 == min(cfg["quant"]["bins"], list(trace.expert).count(expert))
    assert set(clip["ratio"]) == set(cfg["quant"]["clip_candidates"])
    np.testing.assert_allclose(clip.groupby(["expert", "bin"])["share"].sum(), 1.0)
    # Fig. 4: every targeted linear of both experts, output cosine errors, a stable ranking
    sens = A.sensitivity_table(run)
    n_blocks = 1 + max(int(n.split(".")[1]) for n in header["layers"]["high_noise"])
    assert sens.attrs["metric"] == "cos_err" and len(sens) == 2 * n_blocks * len(MODULES)
    assert np.isfinite(sens["cos_err"]).all() and (sens["cos_err"] > 0).all()
    assert A.sensitivity_map(sens, "low_noise").shape == (len(MODULES), n_blocks)
    visited = {e: {TimestepBins.from_json(header["bins"][e]).bin_of(t) for t, x in zip(trace.timestep, trace.expert)
                   if x == e} for e in ("high_noise", "low_noise")}
    chosen = json.loads((run / "artifact" / "choices.json").read_text())
    for e, layers in chosen.items():
        for c in layers.values():  # per-bin errors exactly where calibration visited the bin
            assert {b for b, v in enumerate(c["cos_err_bins"]) if v is not None} == visited[e]
    pd.testing.assert_frame_equal(A.sensitivity_ranking(A.sensitivity_table(run)), A.sensitivity_ranking(sens))
    # quality vs memory: the run and its BF16 twin
    from wanexp.report.results import read_rows
    qm = A.quality_memory(read_rows([run]))
    assert len(qm) == 2 and qm["twin"].tolist() == [False, True] and qm.attrs["y"] == "latent_rel_err"
    # what stage=analyze (analysis.auto=true) wrote
    index = json.loads((run / "analysis" / "index.json").read_text())
    assert index["skipped"] == {} and len(index["figures"]) == 7  # five diagnostic figures, two grids
    for files in index["figures"].values():
        assert all(Path(files[k]).stat().st_size > 0 for k in ("png", "pdf", "json"))


@pytest.fixture(scope="module")
def analyzed(notebook, cache_dir):
    """``stage=analyze`` (W&B offline) on the notebook's finished TS-clip run, as a user re-runs it."""
    import subprocess
    import sys
    run = notebook["run"]
    before = (run / "stages" / "quantize.json").stat().st_mtime_ns
    env = dict(os.environ, WANEXP_CACHE=str(cache_dir), OMP_NUM_THREADS="1",
               WANEXP_OUTPUT_ROOT=str(run.parent / "outputs"))
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-m", "wanexp", "quant=tsclip", "format=mxfp4_ceil", "+experiment=smoke",
                           "stage=analyze", "logger=wandb", "progress=false", f"hydra.run.dir={run}"],
                          cwd=run.parent, env=env, capture_output=True, text=True, timeout=600)
    return {"run": run, "proc": proc, "quantize_mtime": before}


@pytest.mark.slow
def test_stage_analyze_on_an_existing_run_logs_the_figures_to_wandb(analyzed):
    run, proc = analyzed["run"], analyzed["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "stages" / "quantize.json").stat().st_mtime_ns == analyzed["quantize_mtime"]  # nothing else re-ran
    info = json.loads((run / "stages" / "analyze.json").read_text())
    assert info["skipped"] == {} and info["wandb"]
    sensitivity = ["clip_distribution", "quality_memory", "sensitivity", "sensitivity_ranking"]
    grids = sorted(n for n in info["figures"] if n.startswith("qualitative_"))
    assert sorted(info["figures"]) == sorted(["activation_trace_blocks.2.ffn.net.2", *sensitivity, *grids])
    assert len(grids) == 2  # the worst and the best of the two videos
    images = list(Path(info["wandb"]).rglob("media/images/analysis/*.png"))
    assert len(images) == 7
    # a full TS-clip run: nothing skipped, one line saying what was drawn, the summary ends with the report
    lines = proc.stdout.strip().splitlines()
    assert not [l for l in lines if "skipped" in l]
    assert f"wanexp: analyze: 7 figures in {run / 'analysis'}; report: {run / 'report.html'}" in lines
    assert lines[-1] == f"  report:  {run / 'report.html'}"


@pytest.mark.slow
def test_the_grid_shows_the_written_mp4s_and_a_planted_difference(analyzed, tmp_path):
    from wanexp.generate import read_mp4, write_mp4
    from wanexp.report.qualitative import draw_grid
    run = analyzed["run"]
    reference, method = A.run_videos(run)
    errors = A.sample_errors([run])
    sid = errors.sort_values("latent_rel_err").iloc[-1]["id"]
    index = json.loads((run / "analysis" / "index.json").read_text())
    drawn = json.loads((run / "analysis" / f"qualitative_{sid}.json").read_text())
    assert drawn["picked"].startswith("worst latent error") and drawn["labels"] == ["BF16", method.label]
    assert f"qualitative_{sid}" in index["figures"]
    # a variant equal to BF16 but for a square planted in the middle frame
    ref_frames = read_mp4(reference.path(sid))
    mid = A.frame_indices(len(ref_frames))[2]
    planted = ref_frames.copy()
    square = (slice(16, 32), slice(24, 40))
    planted[(mid, *square)] = np.where(planted[(mid, *square)] > 127, 0, 255)
    write_mp4(tmp_path / "videos" / f"{sid}.mp4", planted, fps=16)
    variant = A.Videos("planted", tmp_path, {sid: {"video": f"videos/{sid}.mp4"}})
    grid = A.qualitative_grid(reference, [method, variant], sid)
    assert grid.index == [0, 1, 2, 3, 4] and grid.num_frames == len(ref_frames) == 5
    # every pixel of the grid is a pixel of the written mp4s
    assert np.array_equal(grid.frames[0], ref_frames[grid.index])
    assert np.array_equal(grid.frames[1], read_mp4(method.path(sid))[grid.index])
    np.testing.assert_allclose(grid.diff[0], np.abs(grid.frames[1].astype(int) - grid.frames[0]).mean(-1), rtol=1e-6)
    diff = grid.diff[1]  # the planted variant's |Δ| maps
    inside = np.zeros(diff.shape[1:], bool)
    inside[square] = True
    assert diff[2][inside].mean() > 100 and diff[2][~inside].mean() < 5  # the square, and only the square
    assert np.unravel_index(diff.argmax(), diff.shape)[0] == 2 and inside[np.unravel_index(diff[2].argmax(), inside.shape)]
    assert max(diff[c].mean() for c in (0, 1, 3, 4)) < 5  # re-encoding alone moves a few grey levels
    # the figure draws those maps, every one on the grid's one colour scale
    fig = draw_grid(grid)
    maps = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(maps) == 2 * 5 and {im.get_clim() for im in maps} == {(0.0, grid.vmax)}
    assert grid.vmax == pytest.approx(diff.max())
    assert any(np.array_equal(np.asarray(im.get_array()), diff[2]) for im in maps)


def test_samples_are_chosen_by_the_config_key():
    records = {f"s{k}": {"category": c, "prompt": f"p{k}"} for k, c in enumerate("aabbc")}
    errors = pd.DataFrame({"id": ["s0", "s1", "s2", "s3", "s4", "s0"], "latent_rel_err": [0.1, 0.5, 0.2, 0.05, 0.3, 0.3],
                           "category": list("aabbca")})  # s0 measured by two methods: mean 0.2
    assert A.pick_samples(records, ["s3", "s1", "s3"]) == [("s3", "chosen"), ("s1", "chosen")]
    assert A.pick_samples(records, "per_category") == [("s0", "category a"), ("s2", "category b"), ("s4", "category c")]
    picks = A.pick_samples(records, "worst_best", 1, errors)
    assert picks == [("s1", "worst latent error (0.5)"), ("s3", "best latent error (0.05)")]
    assert [p for p, _ in A.pick_samples(records, "worst_best", 2, errors)] == ["s1", "s4", "s3", "s0"]  # s0/s2 tie
    with pytest.raises(WanexpError, match="names s9, which have no video here"):
        A.pick_samples(records, ["s9"])
    with pytest.raises(WanexpError, match="'median' is not one of worst_best, per_category"):
        A.pick_samples(records, "median")
    with pytest.raises(A.NotRecorded, match="stage=evaluate"):
        A.pick_samples(records, "worst_best", 1, errors.iloc[0:0])
    assert A.frame_indices(61) == [0, 15, 30, 45, 60] and A.frame_indices(5) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_report_html_loads_in_chromium_and_holds_the_runs_numbers(analyzed, render_report, keep_artifact, tmp_path):
    from wanexp.report.html import fmt
    run = analyzed["run"]
    assert analyzed["proc"].returncode == 0, analyzed["proc"].stderr[-3000:]
    html = run / "report.html"
    page = render_report(html, tmp_path / "report_run.png")
    figures = json.loads((run / "analysis" / "index.json").read_text())["figures"]
    assert len(page["images"]) == len(figures) == 7
    assert all(i["complete"] and i["width"] > 0 for i in page["images"]), page["images"]
    per_sample = pd.read_csv(run / "eval" / "per_sample.csv")
    assert len(page["videos"]) == 2 * len(per_sample)  # BF16 beside TS-clip for each video
    assert all(v["ready"] >= 2 and v["width"] == 64 and v["error"] is None for v in page["videos"]), page["videos"]
    assert page["remote"] == []  # nothing but local files
    assert all((run / v["src"]).is_file() for v in page["videos"])
    cells = {(c["table"], c["col"], c["row"]): c for c in page["cells"]}
    row = pd.read_csv(run / "results.csv").iloc[0]
    for metric in ("psnr", "ssim", "latent_rel_err", "model_size_gb", "sec_per_video", "fps"):
        held = [c for c in page["cells"] if c["table"] == "results" and c["col"] == metric]
        assert len(held) == 1 and float(held[0]["value"]) == row[metric], metric
        assert held[0]["text"] == fmt(float(row[metric]))
    delta = [c for c in page["cells"] if c["col"] == "Δmodel_size_gb"][0]
    assert float(delta["value"]) == pytest.approx(row["model_size_gb"] - row["model_size_gb_bf16"])
    for k, rec in enumerate(per_sample.to_dict("records"), start=1):
        assert float(cells[("per_video", "psnr", k)]["value"]) == rec["psnr"]
        assert cells[("per_video", "id", k)]["text"] == rec["id"]
    shot = keep_artifact(tmp_path / "report_run.png")
    from PIL import Image
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[0] > 2000 and pixels.std() > 10  # the whole page, not a blank one
