"""The papers' diagnostic figures: their data (wanexp.analysis), what calibration and quantization
record for them, the drawing, stage=analyze, and notebooks/analysis.ipynb executed top to bottom."""

import json
import math
import os
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


def test_analyze_says_what_a_run_without_the_data_lacks(tmp_path):
    from wanexp.io import write_json
    from wanexp.report.plots import analyze_run
    run = tmp_path / "run"
    write_json(run / "wanexp_config.json", {"quant": {"name": "rtn"}, "format": {"name": "mxfp4"}})
    write_json(run / "stages" / "calibrate.json", {"skipped": "quant=rtn needs no calibration statistics"})
    info = analyze_run(run, {}, logger={"name": "none"})
    assert info["figures"] == {} and info["wandb"] is None
    assert "skips calibration" in info["skipped"]["activation_trace"]
    assert "stage=quantize" in info["skipped"]["clip_distribution"] and "results" in info["skipped"]["quality_memory"]
    assert json.loads((run / "analysis" / "index.json").read_text())["skipped"] == info["skipped"]


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
    assert len(header["bins"]["high_noise"]["edges"]) + 1 == cfg["quant"]["bins"]
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
    qm = A.quality_memory([run])
    assert len(qm) == 2 and qm["twin"].tolist() == [False, True] and qm.attrs["y"] == "latent_rel_err"
    # what stage=analyze (analysis.auto=true) wrote
    index = json.loads((run / "analysis" / "index.json").read_text())
    assert index["skipped"] == {} and len(index["figures"]) == 5
    for files in index["figures"].values():
        assert all(Path(files[k]).stat().st_size > 0 for k in ("png", "pdf", "json"))


@pytest.mark.slow
def test_stage_analyze_on_an_existing_run_logs_the_figures_to_wandb(notebook, cli):
    run = notebook["run"]
    before = (run / "stages" / "quantize.json").stat().st_mtime_ns
    proc = cli("quant=tsclip", "format=mxfp4_ceil", "+experiment=smoke", "stage=analyze", "logger=wandb",
               f"hydra.run.dir={run}", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "stages" / "quantize.json").stat().st_mtime_ns == before  # nothing else re-ran
    info = json.loads((run / "stages" / "analyze.json").read_text())
    assert info["skipped"] == {} and info["wandb"]
    images = list(Path(info["wandb"]).rglob("media/images/analysis/*.png"))
    assert len(images) == 5
