"""Per-layer micro-benchmark of the fused MXFP4 kernels on the Wan2.2-A14B linear shapes (GPU).

    python -m wanexp.bench.kernels [--tokens 57600] [--out kernels.json]

For each (in, out) shape of a Wan block at the given token count: torch bf16 ``F.linear``, the
reference QuantLinear path, the activation quantizer alone, each GEMM variant with each tile
config, and the fused QuantLinear forward (smoothing + rank-32 low-rank + bias). Milliseconds
(median of ``triton.testing.do_bench``) and TFLOP/s of the 2·M·N·K main product.
"""

from __future__ import annotations

import argparse
import json

import torch

from wanexp.models.a14b_random import A14B_TRANSFORMER

# The A14B's linear shapes (K, N): attention projections (dim 5120) and the FFN (5120 -> 13824 -> 5120).
_DIM = A14B_TRANSFORMER["num_attention_heads"] * A14B_TRANSFORMER["attention_head_dim"]
SHAPES = [(_DIM, _DIM), (_DIM, A14B_TRANSFORMER["ffn_dim"]), (A14B_TRANSFORMER["ffn_dim"], _DIM)]


def main() -> None:
    import triton
    from triton.testing import do_bench

    from wanexp.bench.synthetic import SyntheticTSClip
    from wanexp.kernels import fused_forward
    from wanexp.kernels import mxfp4 as K

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=57600)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    dev = torch.device("cuda")
    M = args.tokens
    builder = SyntheticTSClip(rank=args.rank, smooth=True, clip_table=(1.0, 0.9), seed=0)
    rows = []

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    for k, n in SHAPES:
        lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
        flops = 2 * M * n * k
        row = {"M": M, "K": k, "N": n}
        row["bf16_linear_ms"] = bench(lambda: torch.nn.functional.linear(x, lin.weight, lin.bias))
        layer = builder.build("blocks.0.x", lin)
        row["reference_ms"] = bench(lambda: layer.reference_forward(x))
        row["act_quant_ms"] = bench(lambda: K.act_quant(x, layer.clip_table, 0, layer.smooth_recip, write_xs=True))
        xq = K.act_quant(x, layer.clip_table, 0, layer.smooth_recip)["xq"]
        for cfg in K.CONFIGS:
            try:
                ms = bench(lambda: K._launch(cfg, xq, layer.wq_codes, layer.wq_scales, None, None, layer.bias,
                                             torch.empty(M, n, device=dev, dtype=torch.bfloat16), M, n, k, 0))
            except Exception as err:  # noqa: BLE001
                print(f"  cfg {cfg}: {type(err).__name__}: {str(err)[:160]}")
                continue
            row[f"gemm_v{cfg[0]}_{'x'.join(map(str, cfg[1:]))}_ms"] = ms
        best = min((v, key) for key, v in row.items() if key.startswith("gemm_"))
        row["gemm_best"] = best[1]
        xs = K.act_quant(x, layer.clip_table, 0, layer.smooth_recip, write_xs=True)["xs"]
        row["lowrank_down_ms"] = bench(lambda: torch.nn.functional.linear(xs, layer.lowrank_down))
        row["lowrank_down_fused_ms"] = bench(lambda: K.lowrank_down(x, layer.smooth_recip, layer.lowrank_down))
        row["fused_forward_ms"] = bench(lambda: fused_forward(layer, x))
        y, ref = fused_forward(layer, x), layer.reference_forward(x)
        row["fused_vs_reference_rel"] = float((y.float() - ref.float()).norm() / ref.float().norm())
        row["bf16_tflops"] = flops / row["bf16_linear_ms"] / 1e9
        row["gemm_best_tflops"] = flops / best[0] / 1e9
        rows.append(row)
        print(json.dumps(row))
        row["tuned"] = K.tuned_configs()
        del lin, x, layer, xq, xs
        torch.cuda.empty_cache()
    print(f"\n{'K':>6} {'N':>6} | {'bf16':>7} {'ref':>7} {'quant':>6} {'gemm':>7} {'fused':>7} ms | best")
    for r in rows:
        gb = r[r["gemm_best"]]
        print(f"{r['K']:>6} {r['N']:>6} | {r['bf16_linear_ms']:7.2f} {r['reference_ms']:7.2f} {r['act_quant_ms']:6.2f} "
              f"{gb:7.2f} {r['fused_forward_ms']:7.2f}    | {r['gemm_best']} ({r['gemm_best_tflops']:.0f} vs "
              f"{r['bf16_tflops']:.0f} TFLOP/s), rel {r['fused_vs_reference_rel']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":  # pragma: no cover
    main()
