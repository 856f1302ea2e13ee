"""One A14B linear at 720p (57,600 tokens): BF16 cuBLAS against the W4A4 MXFP4 FP8 path, piece by piece.

    python experiments/gpu/linear_bench.py [--out DIR] [--tokens 57600]

For each of Wan's linear shapes (K -> N: 5120 -> 5120, 5120 -> 13824, 13824 -> 5120) it builds a
TS-clip-shaped layer (wanexp.bench.synthetic: smoothing, rank 32, clip table) and times, with
``triton.testing.do_bench`` (median): the BF16 ``F.linear``; the FP8 layer's forward; its activation
path alone (``act_quant_fp8``: one kernel, whole rows in two passes, writing the E4M3 operand; and,
as before session 10, also writing x_s); the low-rank down-projection as the layer runs it
(``lowrank_down``: from x, smoothing in its load) and as before (``F.linear(x_s, L2)``); the
row-scaled FP8 GEMM alone (``torch._scaled_mm``) and its tensor-wise variant on the bare operands (with
the kernels each launches); the low-rank up-projection (``lowrank_add_``, with the row / column scales and
bias too, and ``addmm_``); the layer with the row-wise GEMM throughout (backend ``fp8_rowwise``; round 18a's
files, from before the tensor-wise form became "fp8", name it the other way round) and without
the fallback check's host sync (``fp8_unchecked``). The activation path's traffic (read x once from HBM, write the E4M3 operand) is printed
as GB/s. Results go to
``linear_bench.json`` in ``--out`` (default ``$OUT`` or ``.``), rewritten after each shape.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import gpu_record, save_record  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]


def _kernel_names(fn) -> list[str]:
    """The GPU kernels one call of ``fn`` launches (which library's GEMM a ``_scaled_mm`` variant runs)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:120] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600)
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp import kernels
    from wanexp.bench.synthetic import SyntheticTSClip
    from wanexp.kernels.mxfp4 import lowrank_down
    from wanexp.kernels.mxfp4_fp8 import HEADROOM, act_quant_fp8, fold_weight, lowrank_add_
    out_dir = Path(args.out)
    result = gpu_record(tokens=args.tokens, shapes={})
    m = args.tokens
    bench = lambda fn: do_bench(fn, warmup=10, rep=60, return_mode="median")  # noqa: E731
    for k, n in SHAPES:
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        layer = SyntheticTSClip().build(f"bench.{k}x{n}", lin).cuda()
        kernels.prepare(layer)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        rows = kernels.weight_rows(layer)
        w8 = fold_weight(layer.wq_codes, layer.wq_scales, rows["exponent"])
        w_scale = torch.ldexp(torch.ones(n, device="cuda"), (rows["exponent"] - HEADROOM).float())
        a = act_quant_fp8(x, layer.clip_table, 1, layer.smooth_recip, write_xs=True)
        a["t"] = torch.nn.functional.linear(a["xs"], layer.lowrank_down)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        with kernels.gemm_backend("fp8"):
            fp8_forward = bench(lambda: kernels.fused_forward(layer, x))
        with kernels.gemm_backend("fp8_rowwise"):
            fp8_rowwise_forward = bench(lambda: kernels.fused_forward(layer, x))
        with kernels.gemm_backend("fp8_unchecked"):
            fp8_unchecked_forward = bench(lambda: kernels.fused_forward(layer, x))
        one = torch.ones((), device="cuda")
        rowwise = lambda: torch._scaled_mm(a["values"], w8.t(), scale_a=a["scale"][:, None],  # noqa: E731
                                           scale_b=w_scale[None, :], bias=lin.bias, out_dtype=torch.bfloat16)
        tensorwise = lambda: torch._scaled_mm(a["values"], w8.t(), scale_a=one, scale_b=one,  # noqa: E731
                                              out_dtype=torch.bfloat16)
        entry = {
            "bf16_linear_ms": bench(lambda: torch.nn.functional.linear(x, lin.weight, lin.bias)),
            "fp8_layer_ms": fp8_forward,
            "fp8_layer_rowwise_ms": fp8_rowwise_forward,
            "fp8_layer_unchecked_ms": fp8_unchecked_forward,
            "act_path_ms": bench(lambda: act_quant_fp8(x, layer.clip_table, 1, layer.smooth_recip)),
            "act_path_with_xs_ms": bench(lambda: act_quant_fp8(x, layer.clip_table, 1, layer.smooth_recip, write_xs=True)),
            "act_path_no_smoothing_ms": bench(lambda: act_quant_fp8(x, layer.clip_table, 1, None)),
            "lowrank_down_ms": bench(lambda: lowrank_down(x, layer.smooth_recip, layer.lowrank_down)),
            "lowrank_down_cublas_xs_ms": bench(lambda: torch.nn.functional.linear(a["xs"], layer.lowrank_down)),
            "scaled_mm_ms": bench(rowwise),
            "scaled_mm_tensorwise_ms": bench(tensorwise),
            "lowrank_up_scaled_bias_ms": bench(lambda: lowrank_add_(y, a["t"], layer.lowrank_up, row_scale=a["scale"],
                                                                    col_scale=w_scale, bias=lin.bias)),
            "weight_fold_ms": bench(lambda: fold_weight(layer.wq_codes, layer.wq_scales, rows["exponent"])),
            "lowrank_up_ms": bench(lambda: lowrank_add_(y, a["t"], layer.lowrank_up)),
            "lowrank_up_addmm_ms": bench(lambda: y.addmm_(a["t"], layer.lowrank_up.t())),
        }
        t_ref = torch.nn.functional.linear(a["xs"], layer.lowrank_down).float()
        entry["lowrank_down_rel_err"] = float((lowrank_down(x, layer.smooth_recip, layer.lowrank_down).float() - t_ref).norm()
                                              / t_ref.norm())
        entry["gemm_kernels"] = {name: _kernel_names(fn) for name, fn in (("rowwise", rowwise), ("tensorwise", tensorwise))}
        traffic = m * k * 2 + m * k   # x once (the second pass reads L2), E4M3 out
        entry["act_path_GBps"] = traffic / entry["act_path_ms"] / 1e6
        entry["fp8_layer_x_bf16"] = entry["fp8_layer_ms"] / entry["bf16_linear_ms"]
        result["shapes"][f"{k}x{n}"] = entry
        print(f"{k}->{n}: " + ", ".join(f"{key} {val:.3f}" if isinstance(val, float) else f"{key} {val}"
                                       for key, val in entry.items()), flush=True)
        save_record(result, out_dir, "linear_bench.json")
        del layer, lin, x, a, w8, y
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
