"""One Wan2.2-I2V-A14B expert at full size with random weights on a GPU: BF16 vs W4A4 through wanexp's
QuantLinear reference path (the module swap every method uses).

Reports: bytes the expert holds (BF16 vs packed), one denoiser forward's time and peak memory, and the
relative error of the W4A4 output. No checkpoint is needed (nothing can be downloaded here).

    python experiments/a14b_expert_gpu.py --height 480 --width 832 --frames 17 --format mxfp4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

A14B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                        rope_max_seq_len=1024)


def build_expert(device: torch.device) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        model = WanTransformer3DModel(**A14B_TRANSFORMER)
    model = model.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def held_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def timed_forward(model, inputs, repeats: int = 2) -> tuple[torch.Tensor, float, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = model(**inputs, return_dict=False)[0]  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = model(**inputs, return_dict=False)[0]
    torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--format", default="mxfp4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from wanexp.quant.api import quantize_
    from wanexp.quant.methods import MethodConfig
    from wanexp.quant.targets import select_targets

    device = torch.device("cuda")
    model = build_expert(device)
    lat_f, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    g = torch.Generator(device=device).manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 36, lat_f, lat_h, lat_w, device=device, dtype=torch.bfloat16, generator=g),
                  timestep=torch.tensor([950.0], device=device),
                  encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16, generator=g))
    tokens = lat_f * (lat_h // 2) * (lat_w // 2)
    bf16_bytes = held_bytes(model)
    ref, bf16_s, bf16_peak = timed_forward(model, inputs)

    fmt = {"name": args.format, "opts": {}}
    targets = select_targets(model)
    start = time.perf_counter()
    quantize_(model, MethodConfig("rtn", fmt, fmt, compute_dtype=torch.bfloat16), targets)
    torch.cuda.synchronize()
    quant_s = time.perf_counter() - start
    torch.cuda.empty_cache()
    q_bytes = held_bytes(model)
    out, w4a4_s, w4a4_peak = timed_forward(model, inputs)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "format": args.format,
        "video": f"{args.height}x{args.width}x{args.frames}", "tokens": tokens, "targeted_linears": len(targets),
        "expert_bytes_bf16": bf16_bytes, "expert_bytes_w4a4": q_bytes, "bytes_ratio": q_bytes / bf16_bytes,
        "forward_s_bf16": bf16_s, "forward_s_w4a4_reference_path": w4a4_s, "time_ratio": w4a4_s / bf16_s,
        "peak_bytes_bf16": bf16_peak, "peak_bytes_w4a4": w4a4_peak, "quantize_s": quant_s,
        "output_rel_err": rel,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
