import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from wanexp.models import procedural
from wanexp.models import train_tiny as tt


def _weights(pipe):
    return {f"{c}.{k}": v for c in ("vae", "transformer", "transformer_2") for k, v in getattr(pipe, c).state_dict().items()}


def test_same_seed_gives_bit_identical_weights_and_the_pipelines_condition():
    """Two runs of one seed give the same weights, bit for bit, whether the experts train in two
    processes at once or one after the other."""
    from dataclasses import replace
    cfg = tt.TrainConfig().quick()
    assert cfg.parallel_experts
    a, rec = tt.train(cfg, log=None, evaluate_heldout=False)
    b, _ = tt.train(replace(cfg, parallel_experts=False), log=None, evaluate_heldout=False)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert a.vae.config.latents_mean == b.vae.config.latents_mean and a.vae.config.latents_std == b.vae.config.latents_std
    untrained = _weights(tt.build_untrained(cfg.seed))
    assert sum(not torch.equal(wa[k], untrained[k]) for k in wa) > 0.9 * len(wa)  # training moved the weights
    assert rec["vae_image_loss"]["steps"] == rec["vae_loss"]["steps"] == 2
    assert rec["high_noise_loss"]["steps"] == rec["low_noise_loss"]["steps"] == 2
    assert rec["cpu_seconds"] > 0 and len(rec["load_average"]) == 3

    # the batched condition is the pipeline's own prepare_latents, channel for channel
    clip = procedural.make_clip(5)
    video = tt.clips_tensor([clip])
    ours = tt.conditions(a, video)
    with torch.no_grad():
        _, theirs = a.prepare_latents(video[:, :, 0], 1, 16, 64, 64, 5, dtype=torch.float32, device="cpu",
                                      generator=torch.Generator().manual_seed(0))
    assert ours.shape == theirs.shape == (1, 20, 2, 8, 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_per_frame_init_codes_a_still_clip_as_five_equal_frames_and_keeps_frame_0():
    """After ``init_vae_per_frame`` an untrained VAE treats time as the identity: a clip of one frame
    held five times encodes to two equal latent frames and decodes to five equal frames; a moving clip's
    latent frames differ; and the first frame's path (what single-frame steps train) is untouched."""
    from diffusers import AutoencoderKLWan

    from wanexp.models.tiny import TINY_SPEC
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_SPEC["vae"]).eval()
    clip = tt.clips_tensor([procedural.make_clip(5, height=32, width=32)])
    with torch.no_grad():
        before = vae.decode(vae.encode(clip[:, :, :1]).latent_dist.mode()).sample
        tt.init_vae_per_frame(vae)
        after = vae.decode(vae.encode(clip[:, :, :1]).latent_dist.mode()).sample
        still = clip[:, :, :1].expand(-1, -1, 5, -1, -1).contiguous()
        z = vae.encode(still).latent_dist.mode()
        frames = vae.decode(z).sample
        moving = vae.encode(clip).latent_dist.mode()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert z.shape[2] == 2
    torch.testing.assert_close(z[:, :, 1], z[:, :, 0], rtol=1e-5, atol=1e-5)
    assert frames.shape[2] == 5
    for k in range(1, 5):
        torch.testing.assert_close(frames[:, :, k], frames[:, :, 0], rtol=1e-4, atol=1e-5)
    assert float((moving[:, :, 1] - moving[:, :, 0]).abs().max()) > 1e-3


def test_sigma_ranges_split_at_the_boundary():
    cfg, gen = tt.TrainConfig(), torch.Generator().manual_seed(0)
    high = tt.sample_sigmas(4000, "high_noise", cfg, 0.9, gen)
    low = tt.sample_sigmas(4000, "low_noise", cfg, 0.9, gen)
    assert float(high.min()) >= 0.9 and float(high.max()) <= 1.0
    assert float(low.max()) < 0.9 and float(low.min()) > 0.0
    # the shift puts most low-noise training sigmas above 0.5, as sampling with shift 5 visits them
    assert 0.5 < float((low > 0.5).float().mean()) < 0.9


def test_shipped_weights_beat_random_weights_and_the_mean_on_held_out_clips():
    """The package's trained tiny model denoises unseen clips better than the random tiny model and
    than predicting the training mean, for each expert on its own timestep range."""
    from wanexp.models.tiny import build_tiny_pipeline
    trained, random = build_tiny_pipeline("trained"), build_tiny_pipeline("random")
    clips = procedural.make_clips(12345, 8)
    captions = [c.caption for c in clips]
    held = tt.prepare_expert_data(trained, tt.clips_tensor(clips), captions)
    boundary = float(trained.config.boundary_ratio)
    for name, ours, theirs in (("high_noise", trained.transformer, random.transformer),
                               ("low_noise", trained.transformer_2, random.transformer_2)):
        loss = tt.heldout_losses(ours, name, held, boundary, seed=0)
        assert loss < 0.8 * tt.heldout_losses(theirs, name, held, boundary, seed=0)
        assert loss < 0.8 * tt.mean_prediction_loss(held, held, name, boundary, seed=0)
    # measured 19.5 dB on the 64 held-out clips of training (the random VAE: 10.1 dB)
    assert tt.reconstruction_psnr(trained.vae, tt.clips_tensor(clips)) > tt.reconstruction_psnr(random.vae.float(), tt.clips_tensor(clips)) + 4.0


def test_caption_attribute_labels_bind_each_token_to_its_object_and_the_caption():
    """An object's tokens carry its motion, colour and kind; every token carries the pan and texture;
    the camera's " left" carries no object; padding carries nothing."""
    from wanexp.models.tiny import _build_tokenizer, tokenizer_corpus
    tok = _build_tokenizer(tokenizer_corpus())
    scene = procedural.random_scene(np.random.default_rng(3))
    scene = replace(scene, things=(procedural.Thing("ring", "red", "moves right", 30, 30, 8),
                                   procedural.Thing("cross", "cyan", "grows", 20, 20, 8)),
                    texture="dotted", pan="the camera pans left")
    ids, mask, labels = tt.caption_attribute_labels(tok, [scene])
    words = [tok.decode([i]).strip() for i in ids[0]]
    field = {f: k for k, f in enumerate(tt.CAPTION_FIELDS)}

    def label(word, f, nth=0):
        pos = [k for k, w in enumerate(words) if w == word][nth]
        v = int(labels[0, pos, field[f]])
        return None if v < 0 else tt.CAPTION_FIELDS[f][v]
    assert label("red", "motion") == "moves right" and label("cyan", "motion") == "grows"
    assert label("right", "colour") == "red" and label("cross", "kind") == "cross"
    assert label("left", "motion") is None and label("left", "pan") == "the camera pans left"
    assert label("red", "texture") == "dotted"
    assert int(mask[0].sum()) < tt.CAPTION_TOKENS and bool((labels[0, int(mask[0].sum()):] == -100).all())


def test_text_encoder_pretraining_learns_is_seeded_and_ships_through_model_tiny(tmp_path, monkeypatch):
    """A short caption-attribute pre-training lowers its loss, gives the same weights for the same seed, and
    ``save`` + ``model=tiny``'s loader carry the trained UMT5 (absent without pre-training)."""
    cfg = replace(tt.TrainConfig(), text_pretrain_steps=60, text_pretrain_batch=32, text_pretrain_captions=512)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # as train() runs it: tiny steps on two threads of a shared CPU crawl
    try:
        _pretrain_and_ship(cfg, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _pretrain_and_ship(cfg, tmp_path, monkeypatch):
    from wanexp.models import tiny
    pipe = tt.build_untrained(cfg.seed)
    untrained = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    twin = copy.deepcopy(pipe.text_encoder)
    losses = tt.pretrain_text_encoder(pipe.text_encoder, pipe.tokenizer, cfg, log=lambda m: None)
    tt.pretrain_text_encoder(twin, pipe.tokenizer, cfg, log=lambda m: None)
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5])  # measured 9.1 -> 2.6
    a, b = pipe.text_encoder.state_dict(), twin.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["shared.weight"], untrained["shared.weight"])

    tt.save(pipe, {"config": {"text_pretrain_steps": cfg.text_pretrain_steps}}, tmp_path)
    monkeypatch.setattr(tiny, "TRAINED_WEIGHTS", tmp_path)
    loaded = tiny.build_tiny_pipeline("trained").text_encoder.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
    tt.save(pipe, {"config": {"text_pretrain_steps": 0}}, tmp_path)  # without pre-training: the random UMT5 again
    assert not (tmp_path / tiny.TEXT_ENCODER_FILE).exists()
    assert torch.equal(tiny.build_tiny_pipeline("trained").text_encoder.state_dict()["shared.weight"],
                       untrained["shared.weight"])


def test_data_options_reach_the_clips_and_bad_ones_fail_early():
    """``TrainConfig``'s data options become ``procedural.DataOptions`` (defaults: the shipped data); an unknown
    motion fails when the config is made, before anything is drawn."""
    assert tt.TrainConfig().data_options() == procedural.DataOptions()
    cfg = replace(tt.TrainConfig(), object_speed=8.0, motions="moves left, stays still", max_objects=1)
    assert cfg.data_options() == procedural.DataOptions(speed=8.0, motions=("moves left", "stays still"), max_objects=1)
    with pytest.raises(ValueError, match="motions"):
        tt.TrainConfig(motions="moves sideways")
    with pytest.raises(ValueError, match="max_objects"):
        tt.main(["--quick", "--max-objects", "3", "--out", "/nonexistent/never-written"])


def _old_vae_phase(vae, opt, batches, steps, cfg, gen):
    """``_vae_phase`` as it was before ``vae_object_weight`` (the loss written out), for the W = 0 check."""
    import torch.nn.functional as F
    losses = []
    for step in range(steps):
        tt._set_lr(opt, cfg.vae_lr, step, steps)
        x = batches()
        mean = vae.encode(x).latent_dist.mode()
        noise = torch.randn(mean.shape, generator=gen) * (cfg.vae_latent_noise * mean.detach().std())
        recon = vae.decode(mean + noise).sample
        loss = (F.mse_loss(recon, x) + cfg.vae_l1 * F.l1_loss(recon, x)
                + cfg.vae_mean_penalty * mean.pow(2).mean())
        tt._step(opt, loss, vae.parameters())
        losses.append(loss.item())
    return losses


def test_vae_object_weight_0_is_the_old_loss_bit_for_bit_and_draws_nothing_more(monkeypatch):
    """With ``vae_object_weight`` 0 (the default) two VAE steps give the losses, weights and generator state of
    the loss as written before the option, bit for bit, and never build the object mask; W > 0 trains
    differently from the same batches and noise (the mask draws no random numbers)."""
    from diffusers import AutoencoderKLWan
    from wanexp.models.tiny import TINY_SPEC
    torch.set_num_threads(1)
    videos = tt.clips_tensor(procedural.make_clips(3, 4))
    cfg = tt.TrainConfig()
    assert cfg.vae_object_weight == 0.0

    def run(phase, cfg):
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**TINY_SPEC["vae"]).train()
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        batches = lambda: tt._frames_batch(videos, 2, gen)
        if phase is _old_vae_phase:
            losses = phase(vae, opt, batches, 2, cfg, gen)
        else:
            losses = phase(vae, opt, batches, 2, cfg, gen, "vae frames", lambda m: None)
        return losses, vae.state_dict(), gen.get_state()

    old_losses, old_state, old_gen = run(_old_vae_phase, cfg)
    with monkeypatch.context() as m:
        m.setattr(tt, "object_mask", lambda x: pytest.fail("object_mask built at vae_object_weight 0"))
        new_losses, new_state, new_gen = run(tt._vae_phase, cfg)
    assert new_losses == old_losses
    assert [k for k in old_state if not torch.equal(old_state[k], new_state[k])] == []
    assert torch.equal(new_gen, old_gen)

    w_losses, w_state, w_gen = run(tt._vae_phase, replace(cfg, vae_object_weight=4.0))
    assert torch.equal(w_gen, old_gen)  # the same batches and noise were drawn
    assert w_losses[0] > old_losses[0] and sum(not torch.equal(old_state[k], w_state[k]) for k in old_state) > 0


def test_vae_object_weight_scales_the_loss_at_object_pixels_only():
    """On a constructed batch (2 x 2 pixels, one of them red): the object pixel's MSE and L1 terms count 1 + W
    times, the others once, still divided by the element count; the mask is the probe's (within 24 8-bit
    levels of a ``procedural.COLOURS`` colour in every channel), per frame."""
    red, grey = procedural.COLOURS["red"], (110, 100, 90)
    img = np.array([[red, grey], [grey, grey]], np.float32)  # [H, W, 3]
    x = torch.from_numpy(img / 127.5 - 1).permute(2, 0, 1)[None, :, None].contiguous()  # [1, 3, 1, 2, 2]
    assert tt.object_mask(x)[0, 0, 0].tolist() == [[True, False], [False, False]]
    cfg, cfg4 = tt.TrainConfig(), tt.TrainConfig(vae_object_weight=4.0)

    on_object = x.clone()
    on_object[..., 0, 0] += 0.5  # error 0.5 in all 3 channels of the red pixel, 0 elsewhere
    plain = (0.5 ** 2 + 0.5) * 3 / 12  # 0.1875
    assert float(tt.vae_recon_loss(on_object, x, cfg)) == pytest.approx(plain, rel=1e-6)
    assert float(tt.vae_recon_loss(on_object, x, cfg4)) == pytest.approx(5 * plain, rel=1e-6)  # 0.9375
    assert float(tt.vae_recon_loss(on_object, x, replace(cfg4, vae_l1=0.0))) == pytest.approx(5 * 0.25 * 3 / 12, rel=1e-6)

    off_object = x.clone()
    off_object[..., 1, 1] -= 0.5  # the same error at a background pixel: weight 1 at any W
    assert float(tt.vae_recon_loss(off_object, x, cfg4)) == pytest.approx(plain, rel=1e-6)
    assert float(tt.vae_recon_loss(off_object, x, cfg)) == pytest.approx(plain, rel=1e-6)

    everywhere = x + 0.1  # uniform error: 1 + W x (object fraction 1/4) = 2 at W = 4
    assert float(tt.vae_recon_loss(everywhere, x, cfg4)) == pytest.approx(2 * (0.01 + 0.1), rel=1e-5)

    # the tolerance: 24 levels off in one channel is still the object, 25 is not; every colour counts; per frame
    px = np.array([[(244, 40, 40), (245, 40, 40), procedural.COLOURS["cyan"], (60, 60, 70)]], np.uint8)
    frames = np.stack([px, np.full_like(px, 110)])  # frame 1: all background
    v = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(3, 0, 1, 2)[None]  # [1, 3, 2, 1, 4]
    assert tt.object_mask(v)[0, 0].tolist() == [[[True, False, True, False]], [[False, False, False, False]]]

    # real clips: the objects' pixels are a few percent, backgrounds alone have none
    scene = procedural.random_scene(np.random.default_rng(0))
    as_video = lambda s: torch.from_numpy(procedural.render(s)[None].astype(np.float32) / 127.5 - 1).permute(0, 4, 1, 2, 3)
    assert 0.005 < float(tt.object_mask(as_video(scene)).float().mean()) < 0.3
    assert not tt.object_mask(as_video(procedural.without_objects(scene))).any()


@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), float("inf"), "4", True])
def test_a_bad_vae_object_weight_fails_when_the_config_is_made(bad):
    with pytest.raises(ValueError, match="vae_object_weight"):
        tt.TrainConfig(vae_object_weight=bad)


def test_vae_object_weight_from_the_command_line():
    assert tt.TrainConfig(vae_object_weight=4).vae_object_weight == 4
    with pytest.raises(ValueError, match="vae_object_weight"):
        tt.main(["--quick", "--vae-object-weight", "-1", "--out", "/nonexistent/never-written"])
