import pytest
import torch
from torch import nn

from wanexp.calib import ActivationCollector, CalibStats
from wanexp.errors import WanexpError
from wanexp.io import append_jsonl, atomic_path, read_jsonl, write_json
from wanexp.quant.context import TimestepBins, TimestepContext


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text().strip().startswith("{") and list(tmp_path.iterdir()) == [target]


def test_jsonl_ignores_a_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"id": 1})
    append_jsonl(p, {"id": 2})
    with open(p, "a") as f:
        f.write('{"id": 3, "vid')
    assert [r["id"] for r in read_jsonl(p)] == [1, 2]


def test_collector_statistics_per_bin(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    stats = CalibStats()
    col = ActivationCollector("high_noise", model, ["0"], ctx, ["absmax", "hessian", "tokens", "sumsq"], stats,
                              max_tokens=5)
    xs = {0: [], 1: []}
    for t in (900.0, 100.0, 800.0, 50.0):
        ctx.set_timestep(t)
        x = torch.randn(3, 4, 8)
        xs[ctx.bin].append(x.reshape(-1, 8))
        model(x)
    col.remove()
    for b in (0, 1):
        X = torch.cat(xs[b])
        d = stats.get("high_noise", "0", b)
        assert torch.equal(d["absmax"], X.abs().amax(0))
        assert float(d["count"]) == 24 and d["tokens"].shape == (5, 8)
        rows = {tuple(r.tolist()) for r in X.to(torch.bfloat16).float()}
        assert all(tuple(r.tolist()) in rows for r in d["tokens"].float())  # the sample holds real rows
    X = torch.cat(xs[0] + xs[1])
    torch.testing.assert_close(stats.get("high_noise", "0", -1)["hessian"], X.T @ X)  # pooled over bins
    stats.save(tmp_path / "s.safetensors")
    back = CalibStats.load(tmp_path / "s.safetensors")
    assert back.bins_of("high_noise", "0") == [0, 1]
    assert torch.equal(back.get("high_noise", "0", 1)["absmax"], stats.get("high_noise", "0", 1)["absmax"])
    model(torch.randn(1, 8))  # hooks removed: nothing recorded, nothing raised


def test_collector_refuses_non_finite_activations():
    model = nn.Sequential(nn.Linear(4, 4))
    ActivationCollector("low_noise", model, ["0"], TimestepContext(), ["absmax"], CalibStats())
    with pytest.raises(WanexpError, match="non-finite activations entering low_noise:0"):
        model(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
