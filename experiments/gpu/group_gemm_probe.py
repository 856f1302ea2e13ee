"""The group-scaled INT8 GEMM (wanexp.kernels.group_gemm) against cuBLAS on Wan's shapes: a probe, one process.

    python experiments/gpu/group_gemm_probe.py [--out DIR] [--tokens 57600] [--budget 140]
    python experiments/gpu/group_gemm_probe.py --dry [--out DIR]   # CPU: Triton's interpreter, tiny shapes

For M = ``--tokens`` and (N, K) = (5120, 5120), (13824, 5120), (5120, 13824) it times
(``triton.testing.do_bench``, median ms) the yardsticks: BF16 ``F.linear`` (what INT4 and HiF4
run today after their fused quantizer, wanexp.kernels.upcast), the row-wise-scaled FP8
``torch._scaled_mm`` (as wanexp.kernels.mxfp4_fp8.fp8_linear calls it) and ``torch._int_mm``
(INT8 without groups); then for G = 64 (HiF4) and 128 (INT4's default) ``group_scaled_mm`` on each
tile of ``group_gemm.TILES`` (bf16 out, group-major scales, operands in HiF4's / INT4's ranges),
and on the best tile the plain I2F conversion (``short_scales=False``) and row-major scales. It
prints TFLOP/s and the ratio to BF16, checks every tile's output bits against the first tile's
and the best tile's against the fp64 reference on two row slices (relative Frobenius error of the
bf16 output; fp32 output within ``rounding_bound``), and times the upcast path's activation
quantizers (``int_act_quant``, ``hif4_act_quant``) at each K, a stand-in for the cost of an
activation quantizer that would write this kernel's int8 operand. A time budget (``--budget``
seconds, default 110) skips what is left once spent, saying so in the record. Results:
``group_gemm_probe.json`` in ``--out`` (default ``$OUT``), rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if "--dry" in sys.argv:   # the interpreter flag must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import gpu_record, save_record  # noqa: E402

from wanexp.kernels import group_gemm as gg  # noqa: E402

SHAPES = [(5120, 5120), (13824, 5120), (5120, 13824)]      # (N, K)
GROUP_RANGES = {64: 28, 128: 7}                            # |int8| of HiF4 (G = 64) and INT4 (G = 128)
CHECK_ROWS = 256


def timer(dry: bool):
    """``do_bench`` median on the GPU; in a dry run one wall-clock call (the interpreter is slow)."""
    if dry:
        def once(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return once
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=10, rep=60, return_mode="median")


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def yardsticks(x, w, a8, b8, bench) -> dict:
    """BF16, FP8 row-wise and INT8 (no groups) GEMMs of the shape; an unsupported one says why."""
    m, n = x.shape[0], w.shape[0]
    fp8 = {"a": x.to(torch.float8_e4m3fn), "w": w.to(torch.float8_e4m3fn),
           "sa": torch.rand(m, 1, device=x.device) + 0.5, "sw": torch.rand(1, n, device=x.device) + 0.5}
    runs = {"bf16": lambda: torch.nn.functional.linear(x, w),
            "fp8_rowwise": lambda: torch._scaled_mm(fp8["a"], fp8["w"].t(), scale_a=fp8["sa"], scale_b=fp8["sw"],
                                                    out_dtype=torch.bfloat16),
            "int_mm": lambda: torch._int_mm(a8, b8.t())}
    out = {}
    for name, fn in runs.items():
        try:
            out[f"{name}_ms"] = bench(fn)
        except Exception as exc:  # noqa: BLE001  (e.g. _int_mm's shape rules, FP8 off Hopper)
            out[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def check_slices(a, sa, b, sb, group, tile) -> dict:
    """The best tile against the fp64 reference on the first and last CHECK_ROWS rows."""
    m = a.shape[0]
    worst_rel, worst_bound = 0.0, 0.0
    for rows in (slice(0, min(CHECK_ROWS, m)), slice(max(m - CHECK_ROWS, 0), m)):
        ar, sar = a[rows].contiguous(), sa[rows]
        ref = gg.group_scaled_mm_reference(ar, sar, b, sb, group)
        y16 = gg.group_scaled_mm(ar, sar, b, sb, group, tiles=tile)
        y32 = gg.group_scaled_mm(ar, sar, b, sb, group, out_dtype=torch.float32, tiles=tile)
        bound = gg.rounding_bound(ar, sar, b, sb, group)
        worst_rel = max(worst_rel, float((y16.double() - ref).norm() / ref.norm()))
        worst_bound = max(worst_bound, float(((y32.double() - ref).abs() / bound).max()))
    return {"rel_err_bf16": worst_rel, "max_err_over_bound_fp32": worst_bound, "within_bound": worst_bound <= 1.0}


def time_group_gemm(m, n, k, group, bench, tiles, device) -> dict:
    g = torch.Generator(device=device).manual_seed(group)
    q = GROUP_RANGES[group]
    a = torch.randint(-q, q + 1, (m, k), dtype=torch.int8, device=device, generator=g)
    b = torch.randint(-q, q + 1, (n, k), dtype=torch.int8, device=device, generator=g)
    sa = gg.group_major((torch.rand(m, k // group, device=device, generator=g) + 0.5).bfloat16().float())
    sb = gg.group_major((torch.rand(n, k // group, device=device, generator=g) * 0.01).bfloat16().float())
    entry, first = {"tiles": {}}, None
    for tile in tiles:
        key = json.dumps(list(tile))
        try:
            ms = bench(lambda: gg.group_scaled_mm(a, sa, b, sb, group, tiles=tile))
            y = gg.group_scaled_mm(a[:CHECK_ROWS], sa[:CHECK_ROWS], b, sb, group, tiles=tile)
        except Exception as exc:  # noqa: BLE001  (a tile that does not compile or fit)
            entry["tiles"][key] = f"{type(exc).__name__}: {str(exc)[:160]}"
            print(f"    tile {tile}: {type(exc).__name__}", flush=True)
            continue
        first = y if first is None else first
        entry["tiles"][key] = {"ms": ms, "tflops": tflops(m, n, k, ms), "same_bits_as_first": bool(torch.equal(y, first))}
        print(f"    tile {tile}: {ms:.3f} ms, {tflops(m, n, k, ms):.0f} TFLOP/s", flush=True)
    timed = {t: v for t, v in entry["tiles"].items() if isinstance(v, dict)}
    if not timed:
        return entry
    best = min(timed, key=lambda t: timed[t]["ms"])
    tile = tuple(json.loads(best))
    entry.update(best_tile=json.loads(best), best_ms=timed[best]["ms"], best_tflops=timed[best]["tflops"],
                 all_tiles_same_bits=all(v["same_bits_as_first"] for v in timed.values()))
    entry["i2f_ms"] = bench(lambda: gg.group_scaled_mm(a, sa, b, sb, group, tiles=tile, short_scales=False))
    sa_rows, sb_rows = sa.contiguous(), sb.contiguous()                   # row-major: [R, K/G] with stride (K/G, 1)
    entry["row_major_scales_ms"] = bench(lambda: gg.group_scaled_mm(a, sa_rows, b, sb_rows, group, tiles=tile))
    entry["check"] = check_slices(a, sa, b, sb, group, tile)
    return entry


def act_quant_proxy(m, k, bench, device) -> dict:
    """The upcast path's activation quantizers at this K (they write bf16; an int8 writer moves less)."""
    from wanexp.kernels.upcast import hif4_act_quant, int_act_quant
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    clip = torch.ones(1, device=device)
    return {"int4_g128_ms": bench(lambda: int_act_quant(x, clip, 0, None, 128)),
            "hif4_ms": bench(lambda: hif4_act_quant(x, clip, 0, None))}


def header(dry: bool, **fields) -> dict:
    if not dry:
        return gpu_record(**fields)
    import triton
    return {"gpu": "none: dry run in Triton's interpreter", "date": str(datetime.datetime.now(datetime.timezone.utc)),
            "torch": torch.__version__, "triton": triton.__version__, **fields}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600, help="24,960 for 480p")
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; what is left after it is skipped")
    ap.add_argument("--dry", action="store_true", help="CPU, Triton's interpreter, tiny shapes: checks the script runs")
    args = ap.parse_args(argv)
    start = time.monotonic()
    dry = args.dry
    device = "cpu" if dry else "cuda"
    m = 130 if dry else args.tokens
    shapes = [(96, 256), (64, 512)] if dry else SHAPES
    tiles = gg.TILES[:2] if dry else gg.TILES
    bench = timer(dry)
    out_dir = Path(args.out)
    result = header(dry, tokens=m, tiles=[list(t) for t in tiles], shapes={}, act_quant_proxy={}, skipped=[])
    for n, k in shapes:
        label = f"N={n},K={k}"
        if time.monotonic() - start > args.budget:
            result["skipped"].append(label)
            continue
        g = torch.Generator(device=device).manual_seed(n + k)
        x = torch.randn(m, k, device=device, generator=g).bfloat16()
        w = (torch.randn(n, k, device=device, generator=g) * 0.02).bfloat16()
        a8 = torch.randint(-7, 8, (m, k), dtype=torch.int8, device=device, generator=g)
        b8 = torch.randint(-7, 8, (n, k), dtype=torch.int8, device=device, generator=g)
        entry = yardsticks(x, w, a8, b8, bench)
        del x, w, a8, b8
        base = entry.get("bf16_ms")
        for name in ("bf16", "fp8_rowwise", "int_mm"):
            if f"{name}_ms" in entry:
                ms = entry[f"{name}_ms"]
                entry[f"{name}_tflops"] = tflops(m, n, k, ms)
                print(f"{label} {name}: {ms:.3f} ms, {entry[f'{name}_tflops']:.0f} TFLOP/s"
                      + (f", {ms / base:.2f}x bf16" if base else ""), flush=True)
            else:
                print(f"{label} {name}: {entry[f'{name}_error']}", flush=True)
        entry["groups"] = {}
        result["shapes"][label] = entry
        for group in GROUP_RANGES:
            if time.monotonic() - start > args.budget:
                result["skipped"].append(f"{label},G={group}")
                continue
            print(f"{label} G={group}:", flush=True)
            ge = time_group_gemm(m, n, k, group, bench, tiles, device)
            if "best_ms" in ge and base:
                ge["ratio_to_bf16"] = ge["best_ms"] / base
                print(f"{label} G={group}: best {ge['best_tile']} {ge['best_ms']:.3f} ms = {ge['ratio_to_bf16']:.2f}x bf16; "
                      f"I2F {ge['i2f_ms']:.3f} ms, row-major scales {ge['row_major_scales_ms']:.3f} ms; "
                      f"rel. err {ge['check']['rel_err_bf16']:.1e}, within bound {ge['check']['within_bound']}, "
                      f"tiles same bits {ge['all_tiles_same_bits']}", flush=True)
            entry["groups"][str(group)] = ge
            result["elapsed_s"] = time.monotonic() - start
            save_record(result, out_dir, "group_gemm_probe.json")
        if str(k) not in result["act_quant_proxy"] and time.monotonic() - start <= args.budget:
            result["act_quant_proxy"][str(k)] = act_quant_proxy(m, k, bench, device)
            print(f"K={k} upcast quantizers: {result['act_quant_proxy'][str(k)]}", flush=True)
        result["elapsed_s"] = time.monotonic() - start
        save_record(result, out_dir, "group_gemm_probe.json")
        if not dry:
            torch.cuda.empty_cache()
    result["elapsed_s"] = time.monotonic() - start
    save_record(result, out_dir, "group_gemm_probe.json")
    print(f"done in {time.monotonic() - start:.0f} s; skipped: {result['skipped'] or 'nothing'}", flush=True)


if __name__ == "__main__":
    main()
