import subprocess
import sys

import pytest
import torch

from wanexp.errors import WanexpError
from wanexp.models import EXPERTS, boundary_timestep, expert_for_timestep, experts, install_timestep_hooks
from wanexp.models.loading import check_model_dir, model_fingerprint
from wanexp.models.tiny import build_tiny_pipeline, ensure_tiny_checkpoint


def _state(pipe):
    out = {}
    for comp in ("transformer", "transformer_2", "vae", "text_encoder"):
        for k, v in getattr(pipe, comp).state_dict().items():
            out[f"{comp}.{k}"] = v
    return out


@pytest.mark.parametrize("weights", ["trained", "random"])
def test_tiny_build_is_deterministic_and_roundtrips_bit_identically(cache_dir, weights):
    from diffusers import WanImageToVideoPipeline
    a, b = _state(build_tiny_pipeline(weights)), _state(build_tiny_pipeline(weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    path = ensure_tiny_checkpoint(cache_dir, weights)
    loaded = _state(WanImageToVideoPipeline.from_pretrained(str(path), local_files_only=True))
    assert loaded.keys() == a.keys()
    mismatched = [k for k in a if a[k].dtype != loaded[k].dtype or not torch.equal(a[k], loaded[k])]
    assert mismatched == []
    # the two experts are different networks with the real model's structure
    assert not torch.equal(a["transformer.blocks.0.attn1.to_q.weight"], a["transformer_2.blocks.0.attn1.to_q.weight"])


def test_model_tiny_is_the_trained_one_and_tiny_random_the_random_one(cache_dir):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from wanexp.models import load_pipeline
    from wanexp.models.tiny import TRAINED_WEIGHTS, ensure_tiny_checkpoint
    assert ensure_tiny_checkpoint(cache_dir, "trained") != ensure_tiny_checkpoint(cache_dir, "random")
    shipped = load_file(str(TRAINED_WEIGHTS / "transformer.safetensors"))
    random = _state(build_tiny_pipeline("random"))
    with safe_open(str(TRAINED_WEIGHTS / "vae.safetensors"), framework="pt") as f:
        trained_config = json.loads(f.metadata()["config"])
    random_vae_std = list(build_tiny_pipeline("random").vae.config.latents_std)
    for name, expect_trained in (("tiny", True), ("tiny_random", False)):
        pipe = load_pipeline({"name": name, "dtype": "fp32"}, cache_dir)
        got = pipe.transformer.state_dict()
        same_as_shipped = all(torch.equal(got[k], shipped[k]) for k in shipped)
        same_as_random = all(torch.equal(v, random[f"transformer.{k}"]) for k, v in got.items())
        assert (same_as_shipped, same_as_random) == (expect_trained, not expect_trained)
        if expect_trained:  # the VAE's latent statistics of training survive save_pretrained/from_pretrained
            assert pipe.vae.config.latents_std == trained_config["latents_std"] != random_vae_std
    # the trained tokenizer knows the clips' words: a caption is far fewer tokens than under the random one
    caption = "a purple triangle moves right on a checkered background, the camera pans left"
    assert len(pipe.tokenizer(caption).input_ids) > 2 * len(build_tiny_pipeline("trained").tokenizer(caption).input_ids)


def test_tiny_checkpoint_is_written_once(cache_dir):
    path = ensure_tiny_checkpoint(cache_dir)
    mtime = (path / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(cache_dir) == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime


def test_high_noise_expert_runs_exactly_at_or_above_boundary(tiny_pipe):
    pipe = tiny_pipe
    boundary = boundary_timestep(pipe)
    assert boundary == pytest.approx(900.0)
    calls = []
    hooks = install_timestep_hooks(pipe, lambda name, t: calls.append((name, t)))
    try:
        from PIL import Image
        pipe(image=Image.new("RGB", (64, 64), (90, 120, 30)), prompt="a dog", height=64, width=64, num_frames=5,
             num_inference_steps=10, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [t for _, t in calls] == pytest.approx(timesteps)
    assert {n for n, _ in calls} == set(EXPERTS)  # both experts ran in a 10-step trajectory
    for name, t in calls:
        assert name == expert_for_timestep(t, boundary)
        assert (name == "high_noise") == (t >= boundary)


def test_fingerprint_tells_experts_apart(tiny_pipe):
    fp = model_fingerprint(tiny_pipe)
    assert fp == model_fingerprint(tiny_pipe)
    with torch.no_grad():
        w = experts(tiny_pipe)["low_noise"].blocks[0].attn1.to_q.weight
        old = w[0, 0].clone()
        w[0, 0] += 1.0
        try:
            assert model_fingerprint(tiny_pipe) != fp
        finally:
            w[0, 0] = old


def test_incomplete_model_dir_names_every_missing_part(tmp_path):
    with pytest.raises(WanexpError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(WanexpError) as err:
        check_model_dir(tmp_path)
    msg = str(err.value)
    for part in ("model_index.json", "transformer/*.safetensors", "transformer_2/", "vae/", "text_encoder/",
                 "tokenizer/", "scheduler/"):
        assert part in msg


def test_a14b_without_path_fails_with_one_clear_line(cli):
    proc = cli("model=wan22_i2v_a14b", env={"WANEXP_WAN22_I2V_A14B": ""})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "model.path" in lines[0] and "WANEXP_WAN22_I2V_A14B" in lines[0]


def test_a14b_with_incomplete_dir_fails_before_loading(cli, tmp_path):
    ckpt = tmp_path / "A14B"
    (ckpt / "vae").mkdir(parents=True)
    proc = cli("model=wan22_i2v_a14b", f"model.path={ckpt}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "incomplete" in proc.stderr and "transformer_2/" in proc.stderr


def test_fingerprint_ignores_the_order_of_diffusers_default_value_list(tiny_pipe):
    """diffusers records the config keys it defaulted in ``_use_default_values``, a list built from a
    set, so its order changes from one process to the next (string hashing): an A14B run killed and
    resumed in a new process was refused as "started with another base model"."""
    expert = experts(tiny_pipe)["high_noise"]
    before = expert._internal_dict
    fps = []
    try:
        for order in (["pos_embed_seq_len", "added_kv_proj_dim"], ["added_kv_proj_dim", "pos_embed_seq_len"],
                      ["pos_embed_seq_len"]):
            expert._internal_dict = type(before)({**before, "_use_default_values": order})
            fps.append(model_fingerprint(tiny_pipe))
    finally:
        expert._internal_dict = before
    assert fps[0] == fps[1] != fps[2]   # the same set in either order; another set differs
