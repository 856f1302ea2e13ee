"""Row-wise-scaled cuBLAS FP8 GEMM + the branch's pass, or the tensor-wise GEMM + the branch's pass with the scales?

    python experiments/gpu/epilogue_probe.py [--out DIR] [--tokens 57600] [--rounds 5]

On Wan's linear shapes at 720p's token count, with E4M3 operands, power-of-two row / column scales (as the
MXFP4 fold makes them), a bias and a rank-32 branch, times (``triton.testing.do_bench`` medians, the variants
interleaved over ``--rounds`` rounds so that clock drift falls on all of them alike):
- ``rowwise``: ``torch._scaled_mm`` with the row and column scales and the bias, then ``lowrank_add_``
  (the FP8 path's default);
- ``tensorwise``: ``torch._scaled_mm`` on the bare operands, then ``lowrank_add_`` with the scales and bias
  (backend ``fp8_tensorwise``);
- each GEMM alone, and ``lowrank_add_`` with and without the scales in each tile of ``TILES``.
Prints the medians over the rounds and the two chains' output difference; writes ``epilogue_probe.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import gpu_record, save_record  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]
TILES = [(64, 128, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8), (32, 256, 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp.kernels.mxfp4_fp8 import lowrank_add_
    out_dir = Path(args.out)
    record = gpu_record(tokens=args.tokens, rounds=args.rounds, shapes={})
    m = args.tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in SHAPES:
        a8 = (torch.randn(m, k, device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
        w8 = (torch.randn(n, k, device="cuda", generator=g) * 40).to(torch.float8_e4m3fn)
        sa = 2.0 ** torch.randint(-14, -8, (m,), device="cuda", generator=g).float()
        sw = 2.0 ** torch.randint(-14, -8, (n,), device="cuda", generator=g).float()
        bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        t = (torch.randn(m, 32, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        up = (torch.randn(n, 32, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        one = torch.ones((), device="cuda")
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def rowwise_gemm():
            return torch._scaled_mm(a8, w8.t(), scale_a=sa[:, None], scale_b=sw[None, :], bias=bias,
                                    out_dtype=torch.bfloat16)

        def tensorwise_gemm():
            return torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        variants = {"rowwise": lambda: lowrank_add_(rowwise_gemm(), t, up),
                    "tensorwise": lambda: lowrank_add_(tensorwise_gemm(), t, up, row_scale=sa, col_scale=sw, bias=bias),
                    "rowwise_gemm": rowwise_gemm, "tensorwise_gemm": tensorwise_gemm}
        for tiles in TILES:
            key = "x".join(map(str, tiles))
            variants[f"add_{key}"] = lambda tiles=tiles: lowrank_add_(y, t, up, tiles)
            variants[f"add_scaled_{key}"] = lambda tiles=tiles: lowrank_add_(y, t, up, tiles, row_scale=sa,
                                                                           col_scale=sw, bias=bias)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                try:
                    times[name].append(do_bench(fn, warmup=5, rep=25, return_mode="median"))
                except Exception as err:  # noqa: BLE001 (a tile that does not compile or fit)
                    times[name].append(float("nan"))
                    print(f"{k}->{n} {name}: {type(err).__name__}: {str(err)[:160]}", flush=True)
        diff = (variants["tensorwise"]().double() - variants["rowwise"]().double())
        entry = {name: statistics.median(v) for name, v in times.items()}
        entry["spread"] = {name: max(v) - min(v) for name, v in times.items()}
        entry["rel_diff_chains"] = float(diff.norm() / variants["rowwise"]().double().norm())
        record["shapes"][f"{k}x{n}"] = entry
        print(f"{k}->{n}: " + ", ".join(f"{name} {v:.3f}" for name, v in entry.items() if isinstance(v, float)),
              flush=True)
        save_record(record, out_dir, "epilogue_probe.json")
        del a8, w8, t, up, y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
