import pandas as pd
import pytest

from wanexp.errors import WanexpError
from wanexp.report.__main__ import main
from wanexp.report.table import ablation_table, build


def _row(method, fmt, err, psnr, seed=42, size=1.0):
    return {"method": method, "format": fmt, "expert_policy": "per_expert", "bins": 1, "rank": 0, "model": "tiny",
            "data": "tiny", "seed": seed, "psnr": psnr, "ssim": 1.0, "latent_rel_err": err, "model_size_gb": size,
            "peak_memory_gb": None, "sec_per_video": 2.0}


def test_deltas_are_against_the_bf16_run_of_the_same_seed():
    rows = pd.DataFrame([_row("rtn", "mxfp4", 0.02, 38.0, size=0.3), _row("bf16", "bf16", 0.0, 100.0),
                         _row("tsclip", "mxfp4", 0.01, 39.0, size=0.35), _row("bf16", "bf16", 0.0, 90.0, seed=1),
                         _row("rtn", "mxfp4", 0.03, 30.0, seed=1)])
    t = ablation_table(rows)
    assert list(t["method"]) == ["bf16", "bf16", "rtn", "rtn", "tsclip"]  # the paper's ladder order
    by = {(r.method, r.seed): r for r in t.itertuples()}
    assert by[("rtn", 42)]._asdict()["Δpsnr"] == pytest.approx(-62.0)
    assert by[("rtn", 1)]._asdict()["Δpsnr"] == pytest.approx(-60.0)
    assert by[("tsclip", 42)]._asdict()["Δmodel_size_gb"] == pytest.approx(-0.65)
    assert by[("bf16", 42)]._asdict()["Δlatent_rel_err"] == 0


def test_cli_writes_three_formats_and_errors_cleanly(tmp_path, capsys):
    for i, r in enumerate([_row("bf16", "bf16", 0.0, 100.0), _row("rtn", "int4", 0.05, 30.0)]):
        (tmp_path / f"run{i}").mkdir()
        pd.DataFrame([r]).to_csv(tmp_path / f"run{i}" / "results.csv", index=False)
    assert main([str(tmp_path)]) == 0
    assert len(pd.read_csv(tmp_path / "ablation.csv")) == 2
    assert "| rtn" in (tmp_path / "ablation.md").read_text()
    assert "\\toprule" in (tmp_path / "ablation.tex").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.csv" in capsys.readouterr().err
    with pytest.raises(WanexpError):
        build([tmp_path / "missing"], tmp_path)
