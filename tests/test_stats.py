"""Real differences from noise (issue 18, item 3): paired bootstrap intervals over samples, the
significance marks of the tables, and the sample-size estimates, checked on planted effects."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wanexp.report.stats import Bootstrap, compare, interval, samples_needed
from wanexp.report.table import report_dirs

N = 60
TRUE_PSNR_GAIN = 0.3      # planted: tsclip's PSNR exceeds rtn's by exactly this, sample by sample on average
TRUE_VBENCH_DROP = -0.02  # planted: tsclip's VBench avg is this far below BF16's


def _symmetric_noise(rng, n, sd):
    """Noise whose sample mean is exactly 0 (each draw and its negative), so the planted effect is the
    sample's true mean difference and the null's is exactly 0."""
    half = rng.normal(0, sd, n // 2)
    return rng.permutation(np.concatenate([half, -half]))


def _run(root: Path, name: str, method: str, fmt: str, per_sample: pd.DataFrame, seed=42) -> Path:
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "wanexp_config.json").write_text(json.dumps({"quant": {"name": method}, "format": {"name": fmt}}))
    means = {c: float(per_sample[c].mean()) for c in per_sample if c not in ("id", "category")}
    row = {"method": method, "format": fmt, "expert_policy": "per_expert", "bins": 1, "rank": 0, "model": "tiny",
           "data": "tiny", "seed": seed, "model_size_gb": 1.0, "run_dir": str(d), **means}
    pd.DataFrame([row]).to_csv(d / "results.csv", index=False)
    # rows shuffled: pairing must go by sample id, not by position
    per_sample.sample(frac=1.0, random_state=len(name)).to_csv(d / "eval" / "per_sample.csv", index=False)
    return d


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """BF16, RTN, TS-clip (a planted PSNR gain over RTN and VBench drop from BF16) and SVDQuant (a null:
    the same as RTN up to noise), over 60 samples whose difficulty varies far more than the effects."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("sweep")
    ids = [f"s{i:03d}" for i in range(N)]
    difficulty = rng.normal(0, 5.0, N)                  # between-sample spread: 5 dB
    quality = rng.uniform(0.6, 0.9, N)
    rtn_psnr = 35 + difficulty
    frame = lambda **cols: pd.DataFrame({"id": ids, "category": "x", **cols})  # noqa: E731
    _run(root, "0_bf16", "bf16", "bf16", frame(psnr=np.full(N, 100.0), ssim=1.0, latent_rel_err=0.0,
                                               vbench_avg=quality))
    _run(root, "1_rtn", "rtn", "mxfp4", frame(psnr=rtn_psnr, ssim=0.9, latent_rel_err=0.02,
                                              vbench_avg=quality - 0.05 + _symmetric_noise(rng, N, 0.01)))
    _run(root, "2_tsclip", "tsclip", "mxfp4",
         frame(psnr=rtn_psnr + TRUE_PSNR_GAIN + _symmetric_noise(rng, N, 0.2), ssim=0.9, latent_rel_err=0.02,
               vbench_avg=quality + TRUE_VBENCH_DROP + _symmetric_noise(rng, N, 0.01)))
    _run(root, "3_svdquant", "svdquant_rtn", "mxfp4",
         frame(psnr=rtn_psnr + _symmetric_noise(rng, N, 0.2), ssim=0.9, latent_rel_err=0.02,
               vbench_avg=quality + _symmetric_noise(rng, N, 0.01)))
    out = report_dirs([root], root, boot=Bootstrap(resamples=2000, seed=0))
    return {"root": root, "out": out, "table": pd.read_csv(root / "ablation.csv").set_index("method"),
            "stats": pd.read_csv(root / "ablation_stats.csv")}


def _stat(stats, method, metric, versus):
    line = stats[(stats["method"] == method) & (stats["metric"] == metric) & stats["versus"].str.startswith(versus)]
    assert len(line) == 1, line
    return line.iloc[0]


def test_a_planted_effect_is_covered_and_called_significant_a_null_is_not(sweep):
    stats = sweep["stats"]
    gain = _stat(stats, "tsclip", "psnr", "rtn")       # fidelity: paired between two runs
    assert gain["n"] == N and gain["delta"] == pytest.approx(TRUE_PSNR_GAIN, abs=1e-9)
    assert gain["ci_low"] < TRUE_PSNR_GAIN < gain["ci_high"] and gain["ci_low"] > 0 and bool(gain["significant"])
    # pairing by sample removes the 5 dB between-sample spread: unpaired, the interval would be ~2.5 dB wide
    assert gain["ci_high"] - gain["ci_low"] < 0.15
    null = _stat(stats, "svdquant_rtn", "psnr", "rtn")
    assert null["delta"] == pytest.approx(0.0, abs=1e-9) and null["ci_low"] < 0 < null["ci_high"]
    assert not bool(null["significant"])
    drop = _stat(stats, "tsclip", "vbench_avg", "bf16")  # a delta of the table: paired with the BF16 run
    assert drop["delta"] == pytest.approx(TRUE_VBENCH_DROP, abs=1e-9)
    assert drop["ci_low"] < TRUE_VBENCH_DROP < drop["ci_high"] < 0 and bool(drop["significant"])
    assert not bool(_stat(stats, "svdquant_rtn", "vbench_avg", "bf16")["significant"])


def test_the_ablation_table_carries_and_marks_the_intervals(sweep):
    t = sweep["table"]
    assert t.loc["tsclip", "Δvbench_avg"] == pytest.approx(TRUE_VBENCH_DROP, abs=1e-9)
    assert t.loc["tsclip", "Δvbench_avg_ci_low"] < TRUE_VBENCH_DROP < t.loc["tsclip", "Δvbench_avg_ci_high"]
    assert bool(t.loc["tsclip", "Δvbench_avg_sig"]) and not bool(t.loc["svdquant_rtn", "Δvbench_avg_sig"])
    assert pd.isna(t.loc["bf16", "Δvbench_avg_sig"])  # BF16 against itself: no interval
    # fidelity has no delta column (issue 14): the interval is of the run's own mean over its samples
    assert "Δpsnr" not in t and t.loc["rtn", "psnr_ci_low"] < t.loc["rtn", "psnr"] < t.loc["rtn", "psnr_ci_high"]
    cols = list(t.reset_index().columns)
    assert cols.index("Δvbench_avg_ci_low") == cols.index("Δvbench_avg") + 1  # each interval beside its value
    md = (sweep["root"] / "ablation.md").read_text()
    row = lambda m: next(line for line in md.splitlines() if line.startswith(f"| {m} "))  # noqa: E731
    low, high = t.loc["tsclip", ["Δvbench_avg_ci_low", "Δvbench_avg_ci_high"]]
    assert f"{TRUE_VBENCH_DROP:.4f} [{low:.4f}, {high:.4f}]*" in row("tsclip")
    assert "*" not in row("svdquant_rtn") and "_ci_" not in md
    assert "paired by sample id" in md and "2000 resamples, seed 0" in md
    stats_md = (sweep["root"] / "ablation_stats.md").read_text()
    assert "n_needed" in stats_md and "mde" in stats_md and "normal approximation" in stats_md
    assert "paired comparisons significant" in sweep["out"]["text"]


def test_the_report_says_how_many_samples_a_difference_needs(sweep):
    boot = Bootstrap()
    assert boot.z == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert samples_needed(1.0, 0.5, boot) == 32                 # ((1.96 + 0.84) · 1 / 0.5)² = 31.4
    assert samples_needed(1.0, -0.25, boot) == 126 and samples_needed(0.0, 0.1, boot) == 1
    gain = _stat(sweep["stats"], "tsclip", "psnr", "rtn")
    assert gain["n_needed"] == samples_needed(gain["sd_diff"], gain["delta"], boot)
    assert gain["mde"] == pytest.approx(boot.z * gain["sd_diff"] / np.sqrt(N))
    assert gain["mde"] < TRUE_PSNR_GAIN and gain["n_needed"] < N  # detectable here, and the numbers agree


def test_coverage_false_alarms_and_power_match_their_nominal_rates():
    """On 300 simulated paired samples each: the 95% interval holds the true mean ~95% of the time, a
    null is called significant ~5% of the time, and n_needed samples detect the effect ~80% of the time."""
    rng = np.random.default_rng(11)
    boot = Bootstrap(resamples=1000, seed=3)
    cover = np.mean([lo < 0.5 < hi for lo, hi in (interval(rng.normal(0.5, 1, 40), boot) for _ in range(300))])
    alarms = np.mean([compare(rng.normal(0, 1, 40), boot)["significant"] for _ in range(300)])
    n = int(samples_needed(1.0, 0.5, boot))
    power = np.mean([compare(rng.normal(0.5, 1, n), boot)["significant"] for _ in range(300)])
    assert 0.90 <= cover <= 0.98 and alarms <= 0.09 and 0.70 <= power <= 0.90, (cover, alarms, power)


def test_resamples_and_seed_are_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from wanexp.config import check_settings
    from wanexp.errors import WanexpError
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("config")
        bad = compose("config", overrides=["report.bootstrap.resamples=0"])
    assert Bootstrap.from_cfg(OmegaConf.to_container(cfg.report.bootstrap)) == Bootstrap()  # the yaml's = defaults
    with pytest.raises(WanexpError, match="report.bootstrap.resamples=0 is not allowed"):
        check_settings(bad)
    x = np.random.default_rng(0).normal(size=30)
    assert interval(x, Bootstrap(seed=1)) == interval(x, Bootstrap(seed=1))  # reproducible
    assert interval(x, Bootstrap(seed=1)) != interval(x, Bootstrap(seed=2))
    assert interval(x, Bootstrap(resamples=50)) != interval(x, Bootstrap(resamples=5000))


def test_the_paper_table_gives_the_gap_an_interval(sweep, tmp_path):
    from wanexp.report.paper import paper_table, render_markdown
    from wanexp.report.results import read_rows
    rows = read_rows([sweep["root"]])
    long = paper_table(rows, "table1", Bootstrap()).set_index(["method", "metric"])
    line = long.loc[("tsclip", "VBench avg")]
    assert line["ours_ci_low"] < line["ours"] < line["ours_ci_high"]
    assert line["gap_ci_low"] == pytest.approx(line["ours_ci_low"] - 0.799)
    assert bool(line["gap_significant"]) == (line["gap_ci_high"] < 0 or line["gap_ci_low"] > 0)
    md = render_markdown(paper_table(rows, "table1", Bootstrap()), "table1")
    assert f"{line['ours']:.4f} [{line['ours_ci_low']:.4g}, {line['ours_ci_high']:.4g}] / 0.799" in md
    assert "beyond our sampling noise" in md
    from wanexp.report.html import paper_wide
    html_cells = [c.text for r in paper_wide(paper_table(rows, "table1", Bootstrap()), "table1").rows for c in r]
    assert any(t.startswith(f"{line['ours']:.4f} [") and t.endswith("*)") for t in html_cells)


def test_the_tables_with_intervals_compile_and_render(sweep, tmp_path):
    from wanexp.report.html import frame_table
    tex = (sweep["root"] / "ablation.tex").read_text()
    assert "]*" in tex and "ci\\_low" not in tex
    wide = frame_table(pd.read_csv(sweep["root"] / "ablation.csv"), "ablation", "")
    assert "Δvbench_avg [95% CI]" in wide.columns and not any(c.endswith(("_ci_low", "_ci_high")) for c in wide.columns)
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}"
                                      f"\\input{{{sweep['root'] / 'ablation.tex'}}}\\end{{document}}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_per_sample_table_carries_the_twins_scores_for_pairing(tmp_path):
    from wanexp.io import append_jsonl
    from wanexp.rundir import FIDELITY_FILE, VBENCH_FILE
    from wanexp.stages.report import per_sample_table
    for i, (q, b) in enumerate(((0.61, 0.70), (0.52, 0.55))):
        append_jsonl(tmp_path / FIDELITY_FILE, {"id": f"s{i}", "category": "x", "psnr": 30.0 + i})
        append_jsonl(tmp_path / VBENCH_FILE, {"id": f"s{i}", "category": "x", "imaging_quality": q, "vbench_avg": q})
        append_jsonl(tmp_path / "twin.jsonl", {"id": f"s{1 - i}", "category": "x", "imaging_quality": b, "vbench_avg": b})
    table = per_sample_table(tmp_path, tmp_path / "twin.jsonl").set_index("id")
    assert table.loc["s0", "imaging_quality"] == 0.61 and table.loc["s0", "imaging_quality_bf16"] == 0.55  # by id
    assert table.loc["s1", "vbench_avg_bf16"] == 0.70 and list(table["category"]) == ["x", "x"]
    assert "imaging_quality_bf16" not in per_sample_table(tmp_path)
