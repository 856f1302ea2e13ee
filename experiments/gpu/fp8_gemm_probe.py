"""Does a Triton FP8 GEMM with the low-rank branch in its epilogue beat cuBLAS's ``_scaled_mm`` + ``lowrank_add_``?

    python experiments/gpu/fp8_gemm_probe.py [--out DIR] [--tokens 57600]

On Wan's linear shapes (K -> N: 5120 -> 5120, 5120 -> 13824, 13824 -> 5120) at 720p's token count, with
E4M3 operands and power-of-two row / column scales as the MXFP4 fold makes them, a rank-32 branch and a bias,
times (``triton.testing.do_bench``, median): cuBLAS ``torch._scaled_mm`` alone and followed by ``lowrank_add_``
(today's FP8 path), and :func:`wanexp.kernels.fp8_gemm.fp8_gemm` in every config of ``FP8_GEMM_CONFIGS``
(promotion to fp32 every BLOCK_K), then its two fastest configs with the whole K accumulated imprecisely
(diagnostic: what the promotion costs). Errors against the fp64 value on the first 1024 rows. Writes
``fp8_gemm_probe.json`` to ``--out`` after each shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import fp8_operands, gpu_record, save_record  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600)
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp.kernels.fp8_gemm import FP8_GEMM_CONFIGS, fp8_gemm, fp8_gemm_reference
    from wanexp.kernels.mxfp4_fp8 import lowrank_add_
    out_dir = Path(args.out)
    record = gpu_record(tokens=args.tokens, shapes={})
    m = args.tokens
    bench = lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in SHAPES:
        a8, w8, sa, sw, bias, t, up = fp8_operands(m, k, n, g)

        def cublas():
            return torch._scaled_mm(a8, w8.t(), scale_a=sa[:, None], scale_b=sw[None, :], bias=bias,
                                    out_dtype=torch.bfloat16)

        def cublas_lowrank():
            return lowrank_add_(cublas(), t, up)

        ref = fp8_gemm_reference(a8[:1024], w8, sa[:1024], sw, bias, t[:1024], up)
        rel = lambda y: float((y[:1024].double() - ref).norm() / ref.norm())  # noqa: E731
        flops = 2 * m * n * k
        entry = {"cublas_ms": bench(cublas), "cublas_lowrank_ms": bench(cublas_lowrank),
                 "cublas_lowrank_rel_err": rel(cublas_lowrank()), "triton": {}}
        for cfg in FP8_GEMM_CONFIGS:
            key = "x".join(map(str, cfg))
            try:
                ms = bench(lambda: fp8_gemm(a8, w8, sa, sw, bias, t, up, config=cfg))
                entry["triton"][key] = {"ms": ms, "rel_err": rel(fp8_gemm(a8, w8, sa, sw, bias, t, up, config=cfg)),
                                        "tflops": flops / ms / 1e9}
            except Exception as err:  # noqa: BLE001 (a config that does not compile or fit)
                entry["triton"][key] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"{k}->{n} {key}: {entry['triton'][key]}", flush=True)
            save_record(record, out_dir, "fp8_gemm_probe.json")
        timed = sorted((v["ms"], key) for key, v in entry["triton"].items() if "ms" in v)
        entry["best"] = timed[0][1] if timed else None
        entry["imprecise"] = {}
        for _, key in timed[:2]:
            cfg = tuple(int(v) for v in key.split("x"))
            entry["imprecise"][key] = bench(lambda: fp8_gemm(a8, w8, sa, sw, bias, t, up, config=cfg, imprecise=True))
        entry["cublas_tflops"] = flops / entry["cublas_ms"] / 1e9
        if timed:
            entry["best_over_cublas_lowrank"] = timed[0][0] / entry["cublas_lowrank_ms"]
        record["shapes"][f"{k}x{n}"] = entry
        print(f"{k}->{n}: cublas {entry['cublas_ms']:.3f} ms, cublas+lowrank_add_ {entry['cublas_lowrank_ms']:.3f} ms "
              f"(rel {entry['cublas_lowrank_rel_err']:.2e}); triton best {entry['best']} "
              f"{timed[0][0] if timed else float('nan'):.3f} ms; imprecise {entry['imprecise']}", flush=True)
        save_record(record, out_dir, "fp8_gemm_probe.json")
        del a8, w8, t, up, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
