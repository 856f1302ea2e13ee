"""vaecol19 probe: single-frame VAE training from scratch with train_tiny's loss, colour diagnostics."""
import argparse, json, sys, time
import numpy as np, torch, torch.nn.functional as F
from diffusers import AutoencoderKLWan
from wanexp.models import procedural, train_tiny as tt
from wanexp.models.tiny import TINY_SPEC

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--steps", type=int, default=800)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--noise", type=float, default=0.15)
p.add_argument("--noise-mode", default="global", choices=["global", "channel"])
p.add_argument("--unclamped", action="store_true")
p.add_argument("--overfit", type=int, default=0)  # N fixed frames
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--mean-penalty", type=float, default=1e-4)
p.add_argument("--l1", type=float, default=1.0)  # weight of the L1 term beside the MSE (train_tiny's vae_l1)
p.add_argument("--linfit", type=int, default=0)  # N: refit conv_out by least squares on N training frames' features
p.add_argument("--eval-shipped", action="store_true")  # no training: score the shipped VAE (tiny_weights, read only)
p.add_argument("--seed", type=int, default=0)  # VAE init and batch/noise draws (the data stay seed 0's)
p.add_argument("--head-lr-mult", type=float, default=1.0)
p.add_argument("--head-init-mult", type=float, default=1.0)  # x decoder.conv_out's initial weight
p.add_argument("--gamma-init-mult", type=float, default=1.0)  # x decoder.norm_out's initial gamma
p.add_argument("--lowpass", type=float, default=0.0)  # W: + W * L1(avg_pool(recon, P), avg_pool(x, P)), per frame
p.add_argument("--lowpass-pool", type=int, default=8)  # P: the pooling window (and stride), pixels
p.add_argument("--objweight", type=float, default=0.0)  # W: per-pixel recon loss x (1 + W) at the target's object pixels
a = p.parse_args()
torch.set_num_threads(1)
cfg = tt.TrainConfig(vae_lr=a.lr, vae_mean_penalty=a.mean_penalty, vae_latent_noise=a.noise, vae_l1=a.l1)
tr_seed, ho_seed = tt.split_seeds(0)
t0 = time.time()
videos = tt.clips_tensor(procedural.make_clips(tr_seed, 768))
held = tt.clips_tensor(procedural.make_clips(ho_seed, 32))[:, :, :1]  # 32 held-out first frames
obj_cols = torch.tensor(list(procedural.COLOURS.values()), dtype=torch.float32)

def object_mask(x):  # x [N,3,1,H,W] in [-1,1] -> pixels within 24/255 (L-inf) of an object colour
    px = ((x[:, :, 0] + 1) * 127.5).permute(0, 2, 3, 1)  # N,H,W,3
    d = (px[..., None, :] - obj_cols).abs().amax(-1).amin(-1)
    return d <= 24

def flat_squares():
    out = []
    for c in [(220, 40, 40), (40, 190, 60), (40, 80, 230)]:
        img = np.empty((64, 64, 3), np.float32); img[:] = (110, 100, 90)
        img[20:44, 20:44] = c
        out.append(img)
    return torch.from_numpy(np.stack(out) / 127.5 - 1).permute(0, 3, 1, 2).unsqueeze(2).contiguous()

torch.manual_seed(a.seed)
vae = AutoencoderKLWan(**TINY_SPEC["vae"])
with torch.no_grad():  # a larger output head at init (same architecture, same spec)
    vae.decoder.conv_out.weight.mul_(a.head_init_mult)
    vae.decoder.norm_out.gamma.mul_(a.gamma_init_mult)
if a.eval_shipped:
    import json as _j
    from safetensors import safe_open
    from safetensors.torch import load_file
    from wanexp.models.tiny import TRAINED_WEIGHTS
    with safe_open(str(TRAINED_WEIGHTS / "vae.safetensors"), framework="pt") as f:
        _c = _j.loads(f.metadata()["config"]); _c.pop("_use_default_values", None)
    vae = AutoencoderKLWan.from_config(_c); vae.load_state_dict(load_file(str(TRAINED_WEIGHTS / "vae.safetensors")), strict=True)
    a.steps = 0
init_absmax = vae.decoder.conv_out.weight.abs().max().item()
gen = torch.Generator().manual_seed(a.seed)
if a.overfit:
    g2 = torch.Generator().manual_seed(123)
    pool = []
    while len(pool) < a.overfit:  # frames that have an object
        f = tt._frames_batch(videos, 1, g2)
        if object_mask(f).float().mean() > 0.05: pool.append(f)
    pool = torch.cat(pool)
    batches = lambda: pool[torch.randint(len(pool), (a.batch,), generator=gen)]
else:
    batches = lambda: tt._frames_batch(videos, a.batch, gen)

def decode_raw(z):  # decode without diffusers' final clamp (single latent frame only)
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = vae.decoder(x[:, :, :1], feat_cache=vae._feat_map, feat_idx=[0], first_chunk=True)
    vae.clear_cache()
    return out

head = [vae.decoder.conv_out.weight, vae.decoder.conv_out.bias, vae.decoder.norm_out.gamma]
hid = {id(q) for q in head}
opt = torch.optim.AdamW([{"params": [q for q in vae.parameters() if id(q) not in hid], "mult": 1.0},
                         {"params": head, "mult": a.head_lr_mult}], lr=cfg.vae_lr, weight_decay=0.0)
vae.train()
clip_log = []
for step in range(a.steps):
    tt._set_lr(opt, cfg.vae_lr, step, a.steps)
    for g in opt.param_groups: g["lr"] *= g["mult"]
    x = batches()
    mean = vae.encode(x).latent_dist.mode()
    if a.noise_mode == "global":
        s = mean.detach().std()
    else:
        s = mean.detach().std(dim=(0, 2, 3, 4), keepdim=True)
    noise = torch.randn(mean.shape, generator=gen) * (cfg.vae_latent_noise * s)
    raw = decode_raw(mean + noise)
    recon = raw if a.unclamped else raw.clamp(-1, 1)
    if a.objweight:  # object-weighted recon loss: mean over elements of w * (d^2 + l1 |d|), w = 1 + W at object pixels
        # (object_mask on the TARGET x: within 24/255 L-inf of an object colour); not renormalised by the weights
        d = recon - x
        w = 1 + a.objweight * object_mask(x).to(d.dtype)[:, None, None]  # N,H,W -> N,1,1,H,W
        loss = (w * (d.pow(2) + cfg.vae_l1 * d.abs())).mean() + cfg.vae_mean_penalty * mean.pow(2).mean()
    else:  # W = 0: the original loss, nothing new computed
        loss = F.mse_loss(recon, x) + cfg.vae_l1 * F.l1_loss(recon, x) + cfg.vae_mean_penalty * mean.pow(2).mean()
    if a.lowpass:  # low-frequency (colour) term: L1 between P x P block means of each frame (W = 0: not computed)
        lp = lambda v: F.avg_pool2d(v.transpose(1, 2).flatten(0, 1), a.lowpass_pool)  # [N,C,T,H,W] -> [N*T,C,H/P,W/P]
        loss = loss + a.lowpass * F.l1_loss(lp(recon), lp(x))
    tt._step(opt, loss, vae.parameters())
    if step in (0, 10, 50, 100, 200, 400) or step == a.steps - 1:
        om = object_mask(x)
        out = (raw.detach().abs() > 1)[:, :, 0].any(1)  # pixels with any channel outside [-1,1]
        clip_log.append(dict(step=step, loss=round(loss.item(), 4), out_frac=round(out.float().mean().item(), 4),
                             out_frac_obj=round((out & om).float().sum().item() / max(1, om.sum().item()), 4),
                             raw_min=round(raw.min().item(), 2), raw_max=round(raw.max().item(), 2),
                             lr_body=opt.param_groups[0]["lr"], lr_head=opt.param_groups[1]["lr"]))
        print(clip_log[-1], flush=True)
vae.eval()

@torch.no_grad()
def rec(x):
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)

with torch.no_grad():
    ev = pool if a.overfit else held
    r = rec(ev)
    mse = F.mse_loss((r + 1) * 127.5, (ev + 1) * 127.5)
    psnr = float(10 * torch.log10(255.0 ** 2 / mse))
    om = object_mask(ev)
    err = ((r - ev).abs() * 127.5)[:, :, 0].mean(1)  # N,H,W mean over channels
    # low-pass error (eval only): 8-bit MAE between 8x8 block means, all blocks and blocks at least half object pixels
    bm = lambda v: F.avg_pool2d(v[:, :, 0], 8) * 127.5
    lp_err = (bm(r) - bm(ev)).abs().mean(1)  # N, H/8, W/8
    lp_obj = F.avg_pool2d(om.float()[:, None], 8)[:, 0] >= 0.5
    sq = flat_squares(); rs = rec(sq)
    cols = [[int(round(v)) for v in ((rs[i, :, 0, 24:40, 24:40] + 1) * 127.5).mean((1, 2)).tolist()] for i in range(3)]
    z = vae.encode(torch.cat([held, sq])).latent_dist.mode()
    ch_std = z.std(dim=(0, 2, 3, 4))
    # where the colour lives: latent difference red square vs green vs blue, per channel, inside the square region
    zs = vae.encode(sq).latent_dist.mode()[:, :, 0, 3:5, 3:5].mean((2, 3))  # 3 x 16
    col_spread = zs.std(0)  # per channel spread across the three colours
res = dict(name=a.name, args=vars(a), psnr=round(psnr, 2), obj_mae=round(err[om].mean().item(), 1),
           bg_mae=round(err[~om].mean().item(), 1), lp8_mae=round(lp_err.mean().item(), 1),
           lp8_obj_mae=round(lp_err[lp_obj].mean().item(), 1) if lp_obj.any() else None, obj_frac=round(om.float().mean().item(), 3), red_green_blue=cols,
           latent_ch_std=[round(v, 3) for v in ch_std.tolist()], global_std=round(z.std().item(), 3),
           colour_spread_per_ch=[round(v, 3) for v in col_spread.tolist()], clip_log=clip_log,
           seconds=round(time.time() - t0), conv_out_w_absmax_init=round(init_absmax, 3), conv_out_w_absmax=round(vae.decoder.conv_out.weight.abs().max().item(), 3), conv_out_w_norm=round(vae.decoder.conv_out.weight.norm().item(), 3), norm_out_gamma=[round(v, 2) for v in vae.decoder.norm_out.gamma.flatten().tolist()])
if a.linfit:
    # Is the head the limit? Freeze the trained decoder body, capture conv_out's input (norm_out + SiLU features;
    # a first frame's causal taps on past frames see zeros, so only the current-frame 3x3 taps count) and fit the
    # best conv_out (72 weights + bias per output channel) by least squares on N training frames; then score it.
    feats = {}
    hk = vae.decoder.conv_out.register_forward_hook(lambda m, inp, out: feats.__setitem__("x", inp[0].detach()))
    def unfold(x):  # [N,8,1,H,W] -> [N*H*W, 72]
        f = F.unfold(x[:, :, -1], 3, padding=1)  # N, 72, HW
        return f.transpose(1, 2).reshape(-1, f.shape[1])
    with torch.no_grad():
        gf = torch.Generator().manual_seed(7)
        fit_x = tt._frames_batch(videos, a.linfit, gf)
        rows, tgt = [], []
        for i in range(0, len(fit_x), 16):
            xb = fit_x[i:i + 16]; rec(xb); rows.append(unfold(feats["x"])); tgt.append(xb[:, :, 0].permute(0, 2, 3, 1).reshape(-1, 3))
        A = torch.cat(rows).double(); A = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], 1); Y = torch.cat(tgt).double()
        Wb = torch.linalg.lstsq(A, Y).solution  # 73 x 3
        def rec_fit(x):
            rec(x); f = unfold(feats["x"]).double(); f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
            return (f @ Wb).float().clamp(-1, 1).reshape(x.shape[0], x.shape[3], x.shape[4], 3).permute(0, 3, 1, 2).unsqueeze(2)
        r2 = rec_fit(held)
        psnr2 = float(10 * torch.log10(255.0 ** 2 / F.mse_loss((r2 + 1) * 127.5, (held + 1) * 127.5)))
        err2 = ((r2 - held).abs() * 127.5)[:, :, 0].mean(1); om2 = object_mask(held)
        rs2 = rec_fit(sq)
        cols2 = [[int(round(v)) for v in ((rs2[i, :, 0, 24:40, 24:40] + 1) * 127.5).mean((1, 2)).tolist()] for i in range(3)]
    hk.remove()
    res["linfit"] = dict(frames=a.linfit, psnr=round(psnr2, 2), obj_mae=round(err2[om2].mean().item(), 1),
                         bg_mae=round(err2[~om2].mean().item(), 1), red_green_blue=cols2,
                         w_absmax=round(Wb[:-1].abs().max().item(), 3))
print(json.dumps(res))
json.dump(res, open(f"/tmp/vaecol19/{a.name}.json", "w"))
