import pytest
import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.formats import get_format
from wanexp.quant.api import quant_layers, quantize_
from wanexp.quant.artifact import load_artifact, read_header, save_artifact
from wanexp.quant.context import TimestepBins, TimestepContext, expert_bins
from wanexp.quant.linear import QuantLinear
from wanexp.quant.methods import MethodConfig
from wanexp.quant.targets import pattern_regex, select_targets, targeted_linears

MX = {"name": "mxfp4", "opts": {}}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(64, 64)
        self.attn1.to_out = nn.ModuleList([nn.Linear(64, 64)])
        self.ffn = nn.Module()
        self.ffn.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(64, 48)])


class Toy(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Linear(64, 64)  # outside the blocks: never targeted
        self.blocks = nn.ModuleList([Block() for _ in range(n)])

    def forward(self, x):
        x = self.patch(x)
        for b in self.blocks:
            x = b.attn1.to_out[0](b.attn1.to_q(x)) + x
        return self.blocks[-1].ffn.net[2](x)


def test_bins_cover_each_expert_range_and_count_from_the_noisy_end():
    bins = expert_bins(900.0, 1000.0, 4)
    hi, lo = bins["high_noise"], bins["low_noise"]
    assert hi.edges == pytest.approx((925.0, 950.0, 975.0)) and lo.edges == pytest.approx((225.0, 450.0, 675.0))
    assert [hi.bin_of(t) for t in (999, 975, 974.9, 900)] == [0, 0, 1, 3]
    assert [lo.bin_of(t) for t in (899, 675, 10, 0)] == [0, 0, 3, 3]
    assert TimestepBins().bin_of(500) == 0 and TimestepBins().num_bins == 1
    ctx = TimestepContext(bins=lo)
    ctx.set_timestep(300.0)
    assert ctx.bin == 2
    with pytest.raises(ValueError):
        TimestepBins.equal_width(0, 1, 0)


def test_targets_and_keep_patterns():
    model = Toy()
    names = targeted_linears(model)
    assert "patch" not in names and len(names) == 12
    assert pattern_regex("blocks.1-2.ffn.net.2").match("blocks.2.ffn.net.2")
    assert not pattern_regex("blocks.1-2.ffn.net.2").match("blocks.3.ffn.net.2")
    kept = set(names) - set(select_targets(model, keep_blocks=[0], keep_patterns=["blocks.*.attn1.to_out.0"]))
    assert kept == {"blocks.0.attn1.to_q", "blocks.0.attn1.to_out.0", "blocks.0.ffn.net.2",
                    "blocks.1.attn1.to_out.0", "blocks.2.attn1.to_out.0", "blocks.3.attn1.to_out.0"}


def test_quantlinear_matches_the_equation():
    torch.manual_seed(1)
    lin = nn.Linear(96, 40)
    fmt = get_format("mxfp4")
    ctx = TimestepContext(bins=TimestepBins((500.0,)))
    table = torch.tensor([0.7, 0.9])  # bin 0 = t >= 500
    q = MethodConfig("rtn", MX, MX, num_bins=2, compute_dtype=torch.float32).build("l", lin)
    q.clip_table = table
    q.context = ctx
    x = torch.randn(3, 5, 96)
    w_ref = fmt.quantize_dequantize(lin.weight.detach().float())
    for t, rho in ((800.0, 0.7), (100.0, 0.9)):
        ctx.set_timestep(t)
        ref = torch.nn.functional.linear(fmt.quantize_dequantize(x, clip_ratio=rho), w_ref, lin.bias.detach())
        assert torch.equal(q(x), ref)
    # weights are held packed: far fewer bytes than the fp32 original
    assert q.nbytes() < lin.weight.numel() * 4 / 6


def test_weight_only_and_lowrank_smoothing_paths():
    torch.manual_seed(2)
    lin = nn.Linear(64, 32, bias=False)
    fmt = get_format("mxfp4")
    s = torch.rand(64) + 0.5
    up, down = torch.randn(32, 4), torch.randn(4, 64)
    q = QuantLinear(64, 32, weight=fmt.encode(lin.weight.detach()), bias=None, act_format=None,
                    smooth=s, lowrank=(up, down), compute_dtype=torch.float32)
    x = torch.randn(7, 64)
    xs = x * (1.0 / s)
    ref = xs @ fmt.quantize_dequantize(lin.weight.detach()).T + xs @ down.T @ up.T
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_smoothing_multiplies_by_the_fp32_reciprocal_and_the_reciprocal_is_derived_not_stored():
    """x_s = bf16(x · r), r = 1/s rounded once in fp32: a product, not a quotient (which an fp32 layer
    tells apart); r is a non-persistent buffer that moves with the layer,
    stays fp32 under a dtype cast, and is rebuilt from s by an artifact round trip."""
    g = torch.Generator().manual_seed(4)
    s = torch.rand(256, generator=g) * 3 + 0.3
    fmt = get_format("mxfp4")
    q = QuantLinear(256, 16, weight=fmt.encode(torch.randn(16, 256, generator=g)), bias=None, act_format=MX, smooth=s)
    x = (torch.randn(64, 256, generator=g) * 4).to(torch.bfloat16)
    r = 1.0 / s                                                   # fp32 IEEE division, once
    assert torch.equal(q.smooth_recip, r) and q.smooth_recip.dtype == torch.float32
    assert torch.equal(q.smoothed(x), (x.float() * r).to(torch.bfloat16))
    # in fp32 the product and the quotient part on a quarter of the elements (in bf16 almost never)
    q32 = QuantLinear(256, 16, weight=fmt.encode(torch.randn(16, 256, generator=g)), bias=None, act_format=MX,
                      smooth=s, compute_dtype=torch.float32)
    x32 = torch.randn(64, 256, generator=g)
    assert torch.equal(q32.smoothed(x32), x32 * r) and float((x32 * r != x32 / s).float().mean()) > 0.1
    assert "smooth_recip" not in q.state_dict() and "smooth" in q.state_dict()
    q.to(torch.bfloat16)
    assert q.smooth_recip.dtype == torch.float32 and torch.equal(q.smooth_recip, r)
    rebuilt = QuantLinear.from_description(q.describe(), dict(q.state_dict()))
    assert torch.equal(rebuilt.smooth_recip, r) and torch.equal(rebuilt(x), q(x))


def test_quantize_swaps_only_selected_layers_and_rtn_error_is_small():
    model = Toy()
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        ref = model(x)
    targets = select_targets(model, keep_patterns=["blocks.3.ffn.net.2"])
    swapped = quantize_(model, MethodConfig("rtn", MX, MX, compute_dtype=torch.float32), targets)
    assert swapped == targets and set(quant_layers(model)) == set(targets)
    assert isinstance(model.patch, nn.Linear) and isinstance(model.blocks[3].ffn.net[2], nn.Linear)
    with torch.no_grad():
        out = model(x)
    rel = float((out - ref).norm() / ref.norm())
    assert 0.01 < rel < 0.3  # really quantized, yet close


def test_artifact_roundtrip_reproduces_outputs_and_refuses_other_models(tmp_path):
    model = Toy()
    ctx = TimestepContext()
    quantize_(model, MethodConfig("rtn", MX, MX, compute_dtype=torch.float32), select_targets(model), ctx)
    model.blocks[0].attn1.to_q.clip_table = torch.tensor([0.8])
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        out = model(x)
    path = save_artifact(tmp_path / "a.safetensors", {"high_noise": model}, {"fingerprint": "abc", "method": "rtn"})
    assert read_header(path)["method"] == "rtn"
    fresh = Toy()
    load_artifact(path, {"high_noise": fresh}, "abc")
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert float(fresh.blocks[0].attn1.to_q.clip_table[0]) == pytest.approx(0.8)
    with pytest.raises(WanexpError, match="base model"):
        load_artifact(path, {"high_noise": Toy()}, "other")
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(WanexpError, match="corrupt"):
        load_artifact(tmp_path / "bad.safetensors", {"high_noise": Toy()}, "abc")
    with pytest.raises(WanexpError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")
