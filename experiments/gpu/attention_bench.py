"""One A14B attention call: cuDNN BF16 SDPA against the Triton quantized-attention kernels.

    python experiments/gpu/attention_bench.py [--out DIR] [--shapes 720p,480p] [--repeats 10]

For each shape (B = 1, H = 40, D = 128; 720p: S = 57,600 tokens, 480p: S = 24,960) it times PyTorch's
SDPA with the cuDNN backend (BF16, what Wan runs today) and each kernel of
``wanexp.kernels.attention`` (fp8; int8_sage with fp16 P·V; int8_sage with fp8 P·V), whole calls
(quantizers included) with CUDA events after a warm-up call that also runs Triton's autotuning,
and prints ms, TFLOP/s (4·S²·D·H per call), the ratio to SDPA and the relative Frobenius error vs
SDPA's output. ``attention_bench.json`` (in ``--out``, default ``$OUT`` or ``.``) is rewritten after
every measurement, so a cut-off run keeps what it measured. Inputs: random bf16, K with an offset
every token shares (as Wan's K has).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

SHAPES = {"720p": 57600, "480p": 24960}
VARIANTS = [("fp8", "fp16"), ("int8_sage", "fp16"), ("int8_sage", "fp8")]
CUDNN_ONLY = os.environ.get("WANEXP_ATTN_BENCH_CUDNN_ONLY") == "1"   # skip the Triton variants


def _inputs(s: int, h: int = 40, d: int = 128):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    k = k + torch.randn(1, 1, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    # [B, S, H, D] storage seen as [B, H, S, D], as diffusers' Wan attention hands it to SDPA
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and Triton's autotune on the first call of a shape)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_shape(name: str, repeats: int, entry: dict, save) -> None:
    """SDPA (cuDNN) and each kernel at one shape, into ``entry``; ``save()`` after each."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wanexp.kernels.attention import quantized_attention, supports
    from wanexp.quant.attention import k_mean
    s = SHAPES[name]
    q, k, v = _inputs(s)
    flops = 4.0 * s * s * q.shape[-1] * q.shape[1]
    entry.update({"B": 1, "H": q.shape[1], "S": s, "D": q.shape[-1], "flops": flops})
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v)
        ms = _time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    entry["sdpa_cudnn_bf16"] = {"ms": ms, "tflops": flops / ms / 1e9}
    print(f"{name} S={s}: SDPA cuDNN bf16 {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    save()
    cudnn_fp8(q, k, v, ref, ms, flops, repeats, name, entry)
    save()
    assert supports(q, k, v, 128, 64)
    mean = k_mean(k)
    for att, pv in VARIANTS if not CUDNN_ONLY else ():
        key = att if att == "fp8" else f"{att}_pv_{pv}"
        km = mean if att == "int8_sage" else None
        try:
            def fn(att=att, pv=pv, km=km):
                return quantized_attention(q, k, v, att, q.shape[-1] ** -0.5, 128, 64, km, pv)
            out = fn()
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            del out
            ms_k = _time(fn, repeats)
            entry[key] = {"ms": ms_k, "tflops": flops / ms_k / 1e9, "ratio_to_sdpa": ms_k / ms, "rel_err_vs_sdpa": err}
            print(f"{name} S={s}: {key} {ms_k:.2f} ms, {flops / ms_k / 1e9:.0f} TFLOP/s, "
                  f"{ms_k / ms:.3f}x SDPA, rel err vs SDPA {err:.4f}", flush=True)
        except Exception as exc:  # keep the other variants' numbers
            entry[key] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        save()


def cudnn_fp8(q, k, v, ref, ms, flops, repeats, name, entry) -> None:
    """cuDNN's FP8 SDPA (``wanexp.kernels.attention_cudnn``), and its error against the plain-torch
    reference on the first 1,024 queries of two heads (the reference's S x S scores do not fit whole)."""
    from wanexp.kernels import attention_cudnn
    from wanexp.quant.attention import cudnn_fp8_reference
    if not attention_cudnn.available(q.device):
        entry["cudnn_fp8"] = {"error": "cudnn-frontend or Hopper missing"}
        return
    try:
        fn = lambda: attention_cudnn.cudnn_fp8_attention(q, k, v)  # noqa: E731
        out = fn()
        err = float((out.float() - ref.float()).norm() / ref.float().norm())
        sub = cudnn_fp8_reference(q[:, :2], k[:, :2], v[:, :2])[:, :, :1024]
        kernel_sub = attention_cudnn.cudnn_fp8_attention(q[:, :2], k[:, :2], v[:, :2])[:, :, :1024]
        err_ref = float((kernel_sub.float() - sub.float()).norm() / sub.float().norm())
        del out, sub, kernel_sub
        ms_k = _time(fn, repeats)
        entry["cudnn_fp8"] = {"ms": ms_k, "tflops": flops / ms_k / 1e9, "ratio_to_sdpa": ms_k / ms,
                              "rel_err_vs_sdpa": err, "rel_err_vs_reference": err_ref}
        print(f"{name}: cudnn_fp8 {ms_k:.2f} ms, {flops / ms_k / 1e9:.0f} TFLOP/s, {ms_k / ms:.3f}x SDPA, "
              f"rel err vs SDPA {err:.4f}, vs its reference {err_ref:.4f}", flush=True)
    except Exception as exc:  # noqa: BLE001  (keep the other variants' numbers)
        entry["cudnn_fp8"] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()


def autotuned() -> dict:
    """The configs Triton's autotune picked, by its key (Sq, Sk, KIND, D, BLOCK_N, dtypes)."""
    from wanexp.kernels.attention import _attention_tuned
    return {str(key): str(cfg) for key, cfg in getattr(_attention_tuned, "cache", {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="720p,480p")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import triton
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "date": str(datetime.date.today()), "torch": torch.__version__,
              "triton": triton.__version__, "shapes": {}}

    def save() -> None:
        tmp = out_dir / "attention_bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out_dir / "attention_bench.json")

    for name in args.shapes.split(","):
        result["shapes"][name] = {}
        bench_shape(name, args.repeats, result["shapes"][name], save)
        result["autotuned"] = autotuned()
        save()
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
