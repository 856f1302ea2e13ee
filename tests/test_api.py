"""The public Python API (issue 18, item 1) and LoRAs with short schedules (item 4), on the tiny model.

The README's snippet is run exactly as written (read from README.md, so the two cannot drift); the
other tests reuse the artifact it writes. LoRAs are written in both layouts the issue names (diffusers'
``transformer.``/``transformer_2.`` keys by diffusers' own writer, PEFT lora_A/lora_B naming) and
merged; the merge is checked element by element against W + scale·B·A computed in float64.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import wanexp
from wanexp.errors import WanexpError
from wanexp.models import experts, held_bytes, model_fingerprint
from wanexp.models.lora import merge_loras
from wanexp.quant.api import quant_layers
from wanexp.quant.linear import QuantLinear
from wanexp.quant.targets import select_targets

REPO = Path(__file__).resolve().parents[1]
SETTING = dict(height=64, width=64, num_frames=5, num_inference_steps=4)
IMAGE = Image.new("RGB", (64, 64), (90, 30, 200))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are small: one intra-op thread is fastest (two thrash on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def readme_snippet() -> str:
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def snippet(cache_dir, tmp_path_factory):
    """The README's snippet, run in a fresh directory holding its ``subject.png``; its namespace."""
    work = tmp_path_factory.mktemp("api_snippet")
    IMAGE.save(work / "subject.png")
    code = readme_snippet()
    here = os.getcwd()
    os.chdir(work)
    try:
        namespace = {"__name__": "readme_snippet"}
        exec(compile(code, "README.md: Python API", "exec"), namespace)
    finally:
        os.chdir(here)
    return work, code, namespace


def _bf16_pipe():
    from diffusers import WanImageToVideoPipeline
    pipe = WanImageToVideoPipeline.from_pretrained(wanexp.tiny_checkpoint(), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(pipe, prompt="a cat jumps onto a wooden table"):
    return pipe(image=IMAGE, prompt=prompt, **SETTING, output_type="pt",
                generator=torch.Generator().manual_seed(0)).frames[0]


def _expected_bytes(layer: QuantLinear, bins: int) -> int:
    """What a TS-clip MXFP4 layer holds: E2M1 codes (4 bits) and E8M0 scales (1 byte per 32), bf16
    bias and rank-r branch, fp32 smoothing, its fp32 reciprocal (the multiplier every path smooths with) and
    the clip table."""
    n, k, r = layer.out_features, layer.in_features, layer.lowrank_up.shape[1]
    return n * k // 2 + n * k // 32 + 2 * n + 2 * r * (n + k) + 4 * k + 4 * k + 4 * bins


def test_readme_snippet_runs_and_the_loaded_pipeline_holds_packed_weights(snippet):
    work, code, ns = snippet
    assert len(code.strip().splitlines()) <= 12
    video = ns["video"]
    assert video.shape == (5, 64, 64, 3) and np.isfinite(video).all() and 0 <= video.min() and video.max() <= 1
    from wanexp.quant.artifact import read_header
    header = read_header(work / "q.safetensors")
    bf16 = _bf16_pipe()
    assert header["method"] == "tsclip" and header["fingerprint"] == model_fingerprint(bf16)
    # the 4-step schedule: two steps per expert, one bin per step (README "LoRAs and short schedules")
    assert header["bins"] == {"high_noise": {"edges": [968.0]}, "low_noise": {"edges": [729.0]}}
    pipe = ns["pipe"]
    saved = 0
    for name, model in experts(pipe).items():
        targets = select_targets(experts(bf16)[name])
        layers = quant_layers(model)
        assert sorted(layers) == sorted(targets) and len(targets) == 40
        for lname, layer in layers.items():
            assert layer.weight_meta["format"] == "mxfp4" and layer.act_format_spec["name"] == "mxfp4"
            assert layer.wq_codes.dtype == torch.uint8 and layer.wq_codes.numel() * 2 == layer.in_features * layer.out_features
            assert layer.nbytes() == _expected_bytes(layer, bins=2)
            dense = experts(bf16)[name].get_submodule(lname)
            saved += held_bytes(dense) - layer.nbytes()
    # held bytes as the bench counts them: the experts shrink by exactly the swapped layers' difference
    before, after = held_bytes(*experts(bf16).values()), held_bytes(*experts(pipe).values())
    assert before - after == saved and after < 0.8 * before


def test_the_loaded_pipeline_moves_offloads_and_saves_its_other_components(snippet, tmp_path):
    work, _, ns = snippet
    pipe = wanexp.load_quantized(_bf16_pipe(), work / "q.safetensors")
    layer = pipe.transformer_2.blocks[1].ffn.net[2]
    ref = _frames(pipe)
    assert layer.calls["reference"] > 0 and layer.context.timestep is not None  # the hooks fed its bins
    pipe.to("cpu")
    assert torch.equal(_frames(pipe), ref)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks on every component (a GPU's on CUDA)
    assert hasattr(pipe.transformer, "_hf_hook") and torch.equal(_frames(pipe), ref)
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import AutoTokenizer, UMT5EncoderModel
    for name, cls in (("vae", AutoencoderKLWan), ("text_encoder", UMT5EncoderModel)):
        getattr(pipe, name).save_pretrained(tmp_path / name)
        back = cls.from_pretrained(tmp_path / name).state_dict()
        mine = getattr(pipe, name).state_dict()
        assert back.keys() == mine.keys() and all(torch.equal(back[k], mine[k]) for k in mine)
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    assert dict(UniPCMultistepScheduler.from_pretrained(tmp_path / "scheduler").config) == dict(pipe.scheduler.config)
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer")("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    # dtype casts reach the rest of the pipeline (diffusers' own fp32 rope tables become bf16 too), never
    # the quantized layers: they keep the tensors they were built with
    cast = wanexp.load_quantized(_bf16_pipe(), work / "q.safetensors")
    built = {(e, n, k): b.clone() for e, m in experts(cast).items() for n, l in quant_layers(m).items()
             for k, b in l.named_buffers()}
    cast.to(torch.float32)
    assert cast.vae.dtype == torch.float32 and torch.isfinite(_frames(cast)).all()
    cast.to(torch.bfloat16)
    after = {(e, n, k): b for e, m in experts(cast).items() for n, l in quant_layers(m).items() for k, b in l.named_buffers()}
    assert after.keys() == built.keys() and all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in built.items())
    assert torch.isfinite(_frames(cast)).all()


def test_a_mismatched_base_model_or_recipe_is_refused(snippet):
    work, _, _ = snippet
    other = _bf16_pipe()
    with torch.no_grad():
        other.transformer.blocks[0].attn1.to_q.weight.mul_(1.01)
    with pytest.raises(WanexpError, match="made for base model .* but the loaded model is"):
        wanexp.load_quantized(other, work / "q.safetensors")
    assert not quant_layers(other.transformer)  # nothing was swapped in
    with pytest.raises(WanexpError, match=r"recipe 'tsclp' does not exist; available: .*svdquant_gptq, .*tsclip,"):
        wanexp.recipe("tsclp")
    with pytest.raises(WanexpError, match="format 'mxfp5' does not exist; available: .*nvfp4"):
        wanexp.recipe("rtn", format="mxfp5")
    with pytest.raises(WanexpError, match="Could not override 'quant.binz'"):
        wanexp.recipe("rtn", overrides=["quant.binz=3"])
    with pytest.raises(WanexpError, match="does not exist"):
        wanexp.load_quantized(other, work / "missing.safetensors")
    with pytest.raises(WanexpError, match="gives the low_noise expert no denoising step"):  # 1 step: t=999 only
        wanexp.calibrate_and_quantize(other, "tsclip", ["a cat"], IMAGE, **dict(SETTING, num_inference_steps=1))
    with pytest.raises(WanexpError, match="calibration needs a non-empty list of non-empty prompts"):
        wanexp.calibrate_and_quantize(other, "tsclip", [], IMAGE, **SETTING)
    with pytest.raises(WanexpError, match="unknown generation settings"):
        wanexp.calibrate_and_quantize(other, "rtn", steps=4)
    assert not quant_layers(other.transformer)


# ---------------------------------------------------------------------------------------------
# LoRAs
# ---------------------------------------------------------------------------------------------
RANK = 4
HIGH_LAYERS = ("blocks.0.attn1.to_q", "blocks.2.ffn.net.2", "blocks.3.attn2.to_k")
LOW_LAYERS = ("blocks.1.attn1.to_out.0", "blocks.3.ffn.net.0.proj")


def _factors(model, names, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        lin = model.get_submodule(n)
        out[n] = (torch.randn(RANK, lin.in_features, generator=g).to(dtype) * 0.3,    # A [r, in]
                  torch.randn(lin.out_features, RANK, generator=g).to(dtype) * 0.3)   # B [out, r]
    return out


def _write_diffusers(path_dir, factors, alpha):
    """High-noise factors with diffusers' own LoRA writer (``transformer.`` keys, PEFT adapter metadata)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    layers = {f"{n}.lora_{p}.weight": t for n, (a, b) in factors.items() for p, t in (("A", a), ("B", b))}
    WanLoraLoaderMixin.save_lora_weights(path_dir, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": alpha})
    return Path(path_dir) / "pytorch_lora_weights.safetensors"


def _write_peft(path, factors, prefix):
    save_file({f"{prefix}{n}.lora_{p}.weight": t.contiguous() for n, (a, b) in factors.items()
               for p, t in (("A", a), ("B", b))}, str(path))
    return path


def _assert_merged(before, after, factors, scale):
    """``after`` = W + scale·B·A rounded once to bf16: within half a bf16 ulp of the float64 value, up to
    the fp32 accumulation error (2⁻²¹ of |W| + |scale|·|B|·|A|); and the change is real."""
    for n, (a, b) in factors.items():
        w0, w1 = before.get_submodule(n).weight, after.get_submodule(n).weight
        exact = w0.double() + scale * (b.double() @ a.double())
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
        fp32 = 2.0 ** -21 * (w0.double().abs() + abs(scale) * (b.double().abs() @ a.double().abs()))
        assert ((w1.double() - exact).abs() <= ulp / 2 + fp32).all(), n
        assert (w1 != w0).float().mean() > 0.9, n


def test_lora_merge_is_w_plus_scale_ba_in_both_layouts(tiny_pipe, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    high = _factors(experts(pipe)["high_noise"], HIGH_LAYERS, seed=1)
    low = _factors(experts(pipe)["low_noise"], LOW_LAYERS, seed=2)
    diffusers_file = _write_diffusers(tmp_path / "high", high, alpha=2 * RANK)  # alpha / r = 2
    peft_file = _write_peft(tmp_path / "low.safetensors", low, "transformer_2.")
    records = merge_loras(pipe, [f"{diffusers_file}@0.5", {"path": str(peft_file), "scale": 0.75}])
    assert [(r["experts"], r["layers"]) for r in records] == [(["high_noise"], 3), (["low_noise"], 2)]
    _assert_merged(experts(tiny_pipe)["high_noise"], experts(pipe)["high_noise"], high, 0.5 * 2)
    _assert_merged(experts(tiny_pipe)["low_noise"], experts(pipe)["low_noise"], low, 0.75)
    for expert, touched in (("high_noise", HIGH_LAYERS), ("low_noise", LOW_LAYERS)):  # nothing else moved
        mine, base = experts(pipe)[expert].state_dict(), experts(tiny_pipe)[expert].state_dict()
        assert all(torch.equal(mine[k], base[k]) for k in base if k.rpartition(".")[0] not in touched)
    assert model_fingerprint(pipe) != model_fingerprint(tiny_pipe)
    # the fingerprint holds the LoRA itself, not only the weight rows it samples: B's first row zero
    # leaves every sampled row (row 0 of each matrix) as it was, and the fingerprint still moves
    a, b = high[HIGH_LAYERS[0]]
    hidden = _write_peft(tmp_path / "row0.safetensors", {HIGH_LAYERS[0]: (a, torch.cat([torch.zeros_like(b[:1]), b[1:]]))},
                         "transformer.")
    quiet = copy.deepcopy(tiny_pipe)
    merge_loras(quiet, [str(hidden)])
    assert not torch.equal(quiet.transformer.get_submodule(HIGH_LAYERS[0]).weight,
                           tiny_pipe.transformer.get_submodule(HIGH_LAYERS[0]).weight)
    assert model_fingerprint(quiet) != model_fingerprint(tiny_pipe)
    # The same PEFT file retargeted: {expert: both} puts an unprefixed file into both experts.
    bare = _write_peft(tmp_path / "bare.safetensors", {"blocks.1.attn1.to_out.0": low["blocks.1.attn1.to_out.0"]},
                       "base_model.model.")
    both = copy.deepcopy(tiny_pipe)
    merge_loras(both, [{"path": str(bare), "expert": "both"}])
    pair = {"blocks.1.attn1.to_out.0": low["blocks.1.attn1.to_out.0"]}
    for expert in ("high_noise", "low_noise"):
        _assert_merged(experts(tiny_pipe)[expert], experts(both)[expert], pair, 1.0)
    with pytest.raises(WanexpError, match="already merged"):
        merge_loras(both, [{"path": str(bare), "expert": "both"}])


def test_bad_loras_fail_with_one_clear_error_and_change_nothing(tiny_pipe, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    fingerprint = model_fingerprint(pipe)
    good = _factors(experts(pipe)["high_noise"], HIGH_LAYERS[:1], seed=3)
    a, b = good[HIGH_LAYERS[0]]
    cases = {  # what the error says → the LoRA entries
        "does not exist": [str(tmp_path / "missing.safetensors")],
        "matches no layer of the model": [_write_peft(tmp_path / "nomatch.safetensors",
                                                      {"single_blocks.0.linear1": (a, b)}, "transformer.")],
        # a 5120-wide LoRA (the A14B's) on the 64-wide tiny model; the good entry before it is not merged either
        "a LoRA for another architecture": [_write_peft(tmp_path / "good.safetensors", good, "transformer."),
                                            _write_peft(tmp_path / "a14b.safetensors",
                                                        {HIGH_LAYERS[1]: (torch.zeros(RANK, 5120), torch.zeros(5120, RANK))},
                                                        "transformer.")],
        "not a readable safetensors file": [tmp_path / "junk.safetensors"],
        "the scale after @ must be a number": [f"{tmp_path / 'good.safetensors'}@strong"],
    }
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for message, entries in cases.items():
        with pytest.raises(WanexpError, match=message):
            merge_loras(pipe, [str(e) for e in entries])
        assert model_fingerprint(pipe) == fingerprint, message  # no weight changed


def test_the_runner_merges_model_lora_after_loading_and_refuses_a_missing_file_first(cache_dir, tmp_path):
    from wanexp.api import compose
    from wanexp.run import Run, validate
    base = _bf16_pipe()
    lora = _write_peft(tmp_path / "l.safetensors", _factors(experts(base)["low_noise"], LOW_LAYERS, 4), "transformer_2.")
    cfg = compose(["logger=none", f"model.lora=[{lora}@0.5]"])
    validate(cfg)
    run = Run(cfg, tmp_path / "run")
    pipe = run.bf16_pipe()
    _assert_merged(experts(base)["low_noise"], experts(pipe)["low_noise"], _factors(experts(base)["low_noise"], LOW_LAYERS, 4), 0.5)
    assert run.fingerprint == model_fingerprint(pipe) != model_fingerprint(base)
    with pytest.raises(WanexpError, match="LoRA file .*gone.safetensors does not exist"):
        validate(compose(["logger=none", f"model.lora=[{tmp_path / 'gone.safetensors'}]"]))


def test_a_lora_artifact_at_4_steps_bins_every_step_and_is_refused_without_the_lora(tiny_pipe, tmp_path):
    """A 4-step "distilled" setting with a LoRA: TS-clip calibrates every bin of both experts (each
    step in a bin of the expert that runs it), and the artifact loads only with the same LoRA."""
    pipe = _bf16_pipe()
    lora = _write_peft(tmp_path / "l.safetensors", _factors(experts(pipe)["high_noise"], HIGH_LAYERS, 5), "transformer.")
    ran = []  # (expert, timestep) of every expert forward, calibration and generation
    for name, model in experts(pipe).items():
        model.blocks[0].register_forward_pre_hook(lambda m, a, _n=name: ran.append(_n))
    q = wanexp.calibrate_and_quantize(pipe, wanexp.recipe("tsclip"), prompts=["a dog and a ball on green grass"],
                                      images=IMAGE, out=tmp_path / "q.safetensors", lora=[f"{lora}@1.0"], **SETTING)
    from wanexp.calib.trajectory import expert_steps
    from wanexp.quant.context import TimestepBins
    steps = expert_steps(pipe, 4)
    boundary = q.header["boundary"]
    for expert, ts in steps.items():
        bins = TimestepBins.from_json(q.header["bins"][expert])
        assert sorted(bins.bin_of(t) for t in ts) == list(range(bins.num_bins)) == [0, 1]  # one step a bin
        assert all((t >= boundary) == (expert == "high_noise") for t in ts)
        for layer, chosen in q.choices[expert].items():  # every bin got calibration tokens
            assert len(chosen["clip"]) == 2 and all(e is not None for e in chosen["cos_err_bins"]), layer
    # each expert ran exactly its own steps: 2 steps × (cond, uncond), high-noise pass then low-noise pass
    assert ran == ["high_noise"] * 4 + ["low_noise"] * 4
    assert q.header["lora"] == [{"expert": "high_noise", "file": "l.safetensors", "scale": 1.0,
                                 "sha256": q.header["lora"][0]["sha256"]}]
    with pytest.raises(WanexpError, match=r"with LoRAs \['l.safetensors@1'\], but this pipeline .* with LoRAs none"):
        wanexp.load_quantized(_bf16_pipe(), tmp_path / "q.safetensors")
    loaded = wanexp.load_quantized(_bf16_pipe(), tmp_path / "q.safetensors", lora=[f"{lora}@1.0"])
    assert torch.equal(_frames(loaded), _frames(pipe))  # the artifact is the model calibrated in place


def test_bins_follow_the_step_schedule(tiny_pipe):
    """README "LoRAs and short schedules": equal width when every bin holds a step, else cut by steps."""
    from wanexp.calib.trajectory import expert_steps, timestep_contexts
    from wanexp.quant.context import expert_bins
    table = {40: (4, 4), 8: (3, 4), 4: (2, 2)}
    for n, (high, low) in table.items():
        contexts = timestep_contexts(tiny_pipe, 4, num_inference_steps=n)
        assert (contexts["high_noise"].bins.num_bins, contexts["low_noise"].bins.num_bins) == (high, low)
        for expert, ts in expert_steps(tiny_pipe, n).items():
            bins = contexts[expert].bins
            assert {bins.bin_of(t) for t in ts} == set(range(bins.num_bins))  # no bin without a step
    assert timestep_contexts(tiny_pipe, 4, num_inference_steps=40)["low_noise"].bins == expert_bins(900.0, 1000.0, 4)["low_noise"]
    low8 = timestep_contexts(tiny_pipe, 4, num_inference_steps=8)["low_noise"].bins  # 893 833 | 750 | 625 | 418
    assert low8.edges == pytest.approx(((625 + 418) / 2, (750 + 625) / 2, (833 + 750) / 2), abs=1.0)
    assert [low8.bin_of(t) for t in expert_steps(tiny_pipe, 8)["low_noise"]] == [0, 0, 1, 2, 3]
    shared = timestep_contexts(tiny_pipe, 8, policy="shared", num_inference_steps=4)  # one set over all 4 steps
    assert shared["high_noise"].bins == shared["low_noise"].bins and shared["high_noise"].bins.num_bins == 4


def test_transient_hessians_in_passes_of_blocks_build_the_same_layers():
    """The A14B setting (Hessians used in the pass that collected them, never kept; two passes of
    blocks per expert) against the tiny default (all statistics first): the same layers, bit for bit."""
    built = {}
    for name, overrides in (("stored", []), ("transient", ["model.calib.store_hessians=false",
                                                            "quant.calib_blocks_per_pass=2"])):
        pipe = _bf16_pipe()
        q = wanexp.calibrate_and_quantize(pipe, wanexp.recipe("tsclip", overrides=overrides), ["a cat"], IMAGE, **SETTING)
        assert q.path is None and q.layers == {"high_noise": 40, "low_noise": 40}
        built[name] = {(e, n, k): b for e, m in experts(pipe).items() for n, layer in quant_layers(m).items()
                       for k, b in layer.named_buffers()}
    stored, transient = built["stored"], built["transient"]
    assert stored.keys() == transient.keys() and all(torch.equal(stored[k], transient[k]) for k in stored)
