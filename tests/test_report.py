import json
from pathlib import Path

import pandas as pd
import pytest

from wanexp.errors import WanexpError
from wanexp.report.__main__ import main, report_dirs
from wanexp.report.paper import GIB, paper_table, render_markdown
from wanexp.report.table import ablation_table


def _row(method, fmt, err, psnr, seed=42, size=1.0, **extra):
    return {"method": method, "format": fmt, "expert_policy": "per_expert", "bins": 1, "rank": 0, "model": "tiny",
            "data": "tiny", "seed": seed, "psnr": psnr, "ssim": 1.0, "latent_rel_err": err, "model_size_gb": size,
            "peak_memory_gb": None, "sec_per_video": 2.0, **extra}


def _write_run(d, row=None, error=None, config=None):
    d.mkdir(parents=True)
    (d / "wanexp_config.json").write_text(json.dumps(config or {"quant": {"name": "rtn"}, "format": {"name": "int4"}}))
    if row is not None:
        pd.DataFrame([row]).to_csv(d / "results.csv", index=False)
    if error is not None:
        (d / "error.json").write_text(json.dumps(error))


def test_deltas_are_against_the_bf16_run_of_the_same_seed():
    rows = pd.DataFrame([_row("rtn", "mxfp4", 0.02, 38.0, size=0.3), _row("bf16", "bf16", 0.0, 100.0),
                         _row("tsclip", "mxfp4", 0.01, 39.0, size=0.35), _row("bf16", "bf16", 0.0, 100.0, seed=1, size=2.0),
                         _row("rtn", "mxfp4", 0.03, 30.0, seed=1)])
    t = ablation_table(rows)
    assert list(t["method"]) == ["bf16", "bf16", "rtn", "rtn", "tsclip"]  # the paper's ladder order
    by = {(r.method, r.seed): r._asdict() for r in t.itertuples()}
    assert by[("rtn", 42)]["Δmodel_size_gb"] == pytest.approx(-0.7)
    assert by[("rtn", 1)]["Δmodel_size_gb"] == pytest.approx(-1.0)
    assert by[("tsclip", 42)]["Δmodel_size_gb"] == pytest.approx(-0.65)
    assert by[("bf16", 42)]["Δmodel_size_gb"] == 0
    # fidelity is already each run against its own BF16 twin: a delta to BF16-vs-itself (100 dB) is left out
    assert {"psnr", "ssim", "latent_rel_err"} <= set(t) and not {"Δpsnr", "Δssim", "Δlatent_rel_err"} & set(t)


def test_without_a_bf16_run_deltas_use_the_twin_each_run_measured():
    rows = pd.DataFrame([_row("tsclip", "mxfp4", 0.02, 38.0, size=0.3, model_size_gb_bf16=1.2, vbench_avg=0.70,
                              vbench_avg_bf16=0.75, sec_per_video_bf16=1.5),
                         _row("tsclip", "mxfp4", 0.01, 39.0, size=0.4, model_size_gb_bf16=1.2, vbench_avg=0.74,
                              vbench_avg_bf16=0.75, sec_per_video_bf16=1.5, bins=8)])
    t = ablation_table(rows).set_index("bins")
    assert t.loc[1, "Δmodel_size_gb"] == pytest.approx(-0.9) and t.loc[8, "Δvbench_avg"] == pytest.approx(-0.01)
    assert t.loc[1, "Δsec_per_video"] == pytest.approx(0.5)
    assert "Δpsnr" not in t  # fidelity is already against BF16: no delta of a delta


def test_cli_writes_three_formats_and_errors_cleanly(tmp_path, capsys):
    for i, r in enumerate([_row("bf16", "bf16", 0.0, 100.0), _row("rtn", "int4", 0.05, 30.0)]):
        _write_run(tmp_path / f"run{i}", r)
    assert main([str(tmp_path)]) == 0
    assert len(pd.read_csv(tmp_path / "ablation.csv")) == 2
    assert "| rtn" in (tmp_path / "ablation.md").read_text()
    assert "\\toprule" in (tmp_path / "ablation.tex").read_text()
    # report.html beside the tables: the ablation table's numbers, and why there is no grid (no videos)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {tmp_path / 'report.html'}"
    html = (tmp_path / "report.html").read_text()
    assert 'data-col="psnr" data-value="30.0"' in html and 'data-col="Δsec_per_video" data-value="0.0"' in html
    assert 'data-col="Δpsnr"' not in html  # fidelity is already against BF16: no delta (issue 14)
    assert "has no generated videos (run stage=generate first)" in html
    assert (tmp_path / "analysis" / "quality_memory.png").is_file()
    assert main([str(tmp_path / "run0")]) == 0  # a run directory keeps its own report.html
    assert "report: not written" in capsys.readouterr().out and not (tmp_path / "run0" / "report.html").exists()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.csv" in capsys.readouterr().err
    with pytest.raises(WanexpError, match="does not exist"):
        report_dirs([tmp_path / "missing"], tmp_path)


def test_a_failed_and_an_unfinished_run_are_listed_and_the_rest_kept(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _write_run(sweep / "0_bf16", _row("bf16", "bf16", 0.0, 100.0))
    _write_run(sweep / "1_rtn", _row("rtn", "int4", 0.05, 30.0))
    _write_run(sweep / "2_rtn_hif4", error={"stage": "quantize", "error": "CUDA out of memory", "type": "OutOfMemoryError"},
               config={"quant": {"name": "rtn"}, "format": {"name": "hif4"}})
    _write_run(sweep / "3_tsclip", config={"quant": {"name": "tsclip"}, "format": {"name": "mxfp4"}})
    (sweep / "3_tsclip" / "stages").mkdir()
    (sweep / "3_tsclip" / "stages" / "calibrate.json").write_text("{}")
    assert main([str(sweep), "--paper", "table1"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) without results" in out and "CUDA out of memory" in out
    table = pd.read_csv(sweep / "ablation.csv")
    assert sorted(table["method"]) == ["bf16", "rtn"]
    failed = pd.read_csv(sweep / "ablation_failed.csv").set_index("method")
    assert failed.loc["rtn", "stage"] == "quantize" and failed.loc["rtn", "format"] == "hif4"
    assert failed.loc["tsclip", "stage"] == "unfinished" and "calibrate" in failed.loc["tsclip", "error"]
    assert "CUDA out of memory" in (sweep / "ablation.md").read_text()
    assert (sweep / "paper_table1.md").is_file()


def test_paper_table_sets_our_numbers_beside_the_papers():
    rows = pd.DataFrame([
        _row("bf16", "bf16", 0.0, 100.0, vbench_avg=0.80, imaging_quality=0.70),
        _row("tsclip", "mxfp4", 0.01, 39.0, vbench_avg=0.79, imaging_quality=0.69),
        _row("tsclip", "mxfp4", 0.01, 39.0, seed=1, vbench_avg=0.77, imaging_quality=0.67),
    ])
    long = paper_table(rows, "table1").set_index(["method", "metric"])
    assert long.loc[("tsclip", "VBench avg"), "ours"] == pytest.approx(0.78)     # seeds averaged
    assert long.loc[("tsclip", "VBench avg"), "gap"] == pytest.approx(0.78 - 0.799)
    assert long.loc[("tsclip", "VBench avg"), "runs"] == 2
    assert pd.isna(long.loc[("rtn", "Imaging"), "ours"]) and long.loc[("rtn", "Imaging"), "paper"] == 0.389
    assert pd.isna(long.loc[("bf16", "Subject cons."), "gap"])   # not measured: no gap invented
    md = render_markdown(paper_table(rows, "table1"), "table1")
    assert "| Ours (SVDQuant + GPTQ + TS-clip) | 4 | 4 | yes | 0.7800 / 0.799 (-0.019)" in md
    assert "| RTN | 4 | 4 | no | n/a / 0.733 |" in md

    eff = pd.DataFrame([_row("bf16", "bf16", 0, 100, pipeline_size_gb=68.7, fps=0.12),
                        _row("w4a16", "mxfp4", 0.01, 40, pipeline_size_gb=28.3)])
    long2 = paper_table(eff, "table2").set_index(["method", "metric"])
    assert long2.loc[("bf16", "model size (GB)"), "ours"] == pytest.approx(68.7 * GIB)  # GiB, as the paper
    assert long2.loc[("bf16", "model size (GB)"), "gap"] == pytest.approx(68.7 * GIB - 64.0)

    five = dict(imaging_quality=0.6, aesthetic_quality=0.5, overall_consistency=0.2, subject_consistency=0.9,
                motion_smoothness=0.98)
    hif = paper_table(pd.DataFrame([_row("hif4_tailaware", "hif4", 0.02, 35, **five)]), "hif4")
    cell = hif.set_index(["method", "metric"]).loc[("hif4_tailaware", "mean of 5")]
    assert cell["ours"] == pytest.approx(0.636) and cell["gap"] == pytest.approx(0.636 - 0.588)
    with pytest.raises(WanexpError, match="unknown paper table"):
        paper_table(rows, "table9")


def test_wandb_offline_run_holds_group_flat_config_videos_and_artifact(tmp_path, monkeypatch):
    import numpy as np

    from wanexp.generate import write_mp4
    from wanexp.report.wandb_log import log_run
    monkeypatch.delenv("WANDB_MODE", raising=False)
    write_mp4(tmp_path / "v.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=8)
    (tmp_path / "quantized.safetensors").write_bytes(b"\0" * 64)
    where = log_run({"name": "wandb", "mode": "auto", "group": "multirun/2026-11-23/10-00-00"}, tmp_path,
                    {"quant": {"name": "tsclip", "bins": 4}}, {"psnr": 30.0, "vbench_avg": None},
                    {"results": pd.DataFrame([{"psnr": 30.0}])}, videos=[("singleobj_1", tmp_path / "v.mp4")],
                    artifact=tmp_path / "quantized.safetensors")
    assert where and "offline-run-" in where  # no project, no credentials: offline, never a network wait
    log = next(Path(where).glob("*.wandb")).read_bytes()
    assert b"multirun/2026-11-23/10-00-00" in log and b"quant.bins" in log  # grouped; config flattened
    assert b"quantized-" in log  # the artifact was logged
    assert len(list(Path(where).rglob("media/videos/*.mp4"))) == 1


def test_report_html_shows_confidence_intervals_where_the_rows_have_them():
    from wanexp.report.html import frame_table, results_table
    row = _row("rtn", "mxfp4", 0.02, 38.0, psnr_ci_low=37.5, psnr_ci_high=38.5, model_size_gb_bf16=4.0)
    table = results_table(row)
    assert table.columns == ["metric", "value", "BF16 (twin)", "Δ vs BF16", "95% CI"]
    lines = {r[0].text: r for r in table.rows}
    assert [c.text for c in lines["psnr"]] == ["psnr", "38.0000", "–", "–", "[37.5000, 38.5000]"]
    assert float(lines["model_size_gb"][3].value) == -3.0 and lines["model_size_gb"][4].text == "–"
    assert "psnr_ci_low" not in lines  # the bounds are the interval, not metrics of their own
    wide = frame_table(pd.DataFrame([row, _row("bf16", "bf16", 0.0, 100.0)]), "ablation", "")
    assert "psnr [95% CI]" in wide.columns and not any("_ci_" in c for c in wide.columns)
    col = wide.columns.index("psnr [95% CI]")
    assert wide.rows[0][col].text == "38.0000 [37.5000, 38.5000]" and float(wide.rows[0][col].value) == 38.0
    assert wide.rows[1][col].text == "100.0000"  # a row without an interval shows the value alone
    assert [c.text for c in results_table(_row("rtn", "mxfp4", 0.02, 38.0)).rows[0]] == ["psnr", "38.0000", "–", "–"]
