"""Row-wise-scaled cuBLAS FP8 GEMM + the branch's pass, or the tensor-wise GEMM + the branch's pass with the scales?

    python experiments/gpu/epilogue_probe.py [--out DIR] [--tokens 57600] [--rounds 5]

On Wan's linear shapes at 720p's token count, with E4M3 operands, power-of-two row / column scales (as the
MXFP4 fold makes them), a bias and a rank-32 branch, times (``triton.testing.do_bench`` medians, the variants
interleaved over ``--rounds`` rounds so that clock drift falls on all of them alike):
- ``rowwise``: ``torch._scaled_mm`` with the row and column scales and the bias, then ``lowrank_add_``
  (the FP8 path's default until round 18b; backend ``fp8_rowwise``);
- ``tensorwise``: ``torch._scaled_mm`` on the bare operands, then ``lowrank_add_`` with the scales and bias
  (the default of backend ``fp8`` for layers with a branch since round 18b);
- each GEMM alone, and ``lowrank_add_`` with and without the scales in each tile of ``TILES``;
- the 1x128-by-1x128 block-scaled FP8 GEMM (``F.scaled_mm``, cuBLAS; INT4 group-128 codes are exact in E4M3)
  in the scale layouts torch takes, with its error to fp64.
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

from records import fp8_operands, gpu_record, save_record  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]
TILES = [(64, 128, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (128, 128, 8), (32, 256, 4)]


class _Blockwise:
    """One layout of the 1x128-by-1x128 block-scaled FP8 GEMM (an INT4 group-128 W4A4 candidate), checked
    once against the fp64 value on the first 256 rows."""

    def __init__(self, a8, w8, sa, sw):
        import torch.nn.functional as F
        self.call = lambda: F.scaled_mm(a8, w8.t(), sa, F.ScalingType.BlockWise1x128, sw, F.ScalingType.BlockWise1x128,
                                        output_dtype=torch.bfloat16)
        y = self.call()
        ka = sa.float().repeat_interleave(128, dim=1)
        kw = sw.float().repeat_interleave(128, dim=1)
        ref = (a8[:256].double() * ka[:256].double()) @ (w8.double() * kw.double()).T
        self.rel_err = float((y[:256].double() - ref).norm() / ref.norm())

    def __call__(self):
        return self.call()


def _blockwise_variants(a8, w8, g) -> dict:
    """The block-scaled GEMM in each scale layout torch might take (those it refuses are printed and left out)."""
    m, k = a8.shape
    n = w8.shape[0]
    sa = 2.0 ** torch.randint(-6, 0, (m, k // 128), device="cuda", generator=g).float()
    sw = 2.0 ** torch.randint(-6, 0, (n, k // 128), device="cuda", generator=g).float()
    layouts = {"a_mmajor_b_nmajor": (sa.t().contiguous().t(), sw.t().contiguous().t()),
               "a_mmajor_b_kmajor": (sa.t().contiguous().t(), sw.contiguous()),
               "a_kmajor_b_kmajor": (sa.contiguous(), sw.contiguous())}
    out = {}
    for name, (s_a, s_w) in layouts.items():
        try:
            out[f"blockwise_{name}"] = _Blockwise(a8, w8, s_a, s_w)
        except Exception as err:  # noqa: BLE001 (a layout or recipe this torch / cuBLAS does not take)
            print(f"blockwise {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    return out


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
        a8, w8, sa, sw, bias, t, up = fp8_operands(m, k, n, g)
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
        blockwise = _blockwise_variants(a8, w8, g)
        variants.update(blockwise)
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
        entry["blockwise_rel_err"] = {name: fn.rel_err for name, fn in blockwise.items()}
        record["shapes"][f"{k}x{n}"] = entry
        print(f"{k}->{n}: " + ", ".join(f"{name} {v:.3f}" for name, v in entry.items() if isinstance(v, float)),
              flush=True)
        save_record(record, out_dir, "epilogue_probe.json")
        del a8, w8, t, up, y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
