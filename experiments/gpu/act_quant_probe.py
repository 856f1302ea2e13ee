"""What bounds the FP8 path's activation quantizer on the GPU: a probe, one process.

    python experiments/gpu/act_quant_probe.py [--out DIR] [--tokens 57600]

At 57,600 tokens and K = 5120 and 13824, with the TS-clip layer's smoothing (wanexp.bench.synthetic),
it times (``triton.testing.do_bench``, median, best tile of each kernel's candidates):

* ``copy``: a bf16 clone of x, the bandwidth yardstick (read 2 B + write 2 B an element);
* ``rowmax`` / ``quant``: today's two kernels of :func:`wanexp.kernels.mxfp4_fp8.act_quant_fp8`
  (the row maximum; the quantizer writing E4M3 bits and x_s), with the IEEE division (``div_rn``),
  with ``FAST_DIV`` (reciprocal + one Markstein correction) and without smoothing (no division: the
  lower bound on what the division costs);
* ``rows``: one kernel a block of whole rows, two passes over K (the row maximum, then the quantizer,
  its second read mostly from L2), which writes the spread and S directly (no atomics, no torch ops
  after it): 5 bytes an element of HBM traffic where today's pair moves 7.

Each variant's outputs are compared byte for byte with today's path (``equal`` in the JSON), and
the fast division is compared with ``div_rn`` over every finite bf16 x against 8,192 smoothing
divisors (``fast_div_mismatches``). Results: ``act_quant_probe.json`` in ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from wanexp.kernels.mxfp4 import (ACT_TILES, ROWMAX_TILES, _act_quant_kernel, _block_exponent,  # noqa: E402
                                  _e4m3_bits, _row_absmax_kernel, _smooth_div, _to_bf16_rne)

ROWS_TILES = [(4, 8, 4), (8, 8, 4), (8, 16, 8), (16, 8, 8), (4, 16, 4), (16, 4, 4), (2, 32, 4), (8, 4, 4)]


@triton.jit
def _rows_kernel(x_ptr, smooth_ptr, clip_ptr, bin_idx, xs_ptr, a8_ptr, spread_ptr, exp_ptr, M, K, stride_xm,
                 HAS_SMOOTH: tl.constexpr, WRITE_XS: tl.constexpr, CEIL: tl.constexpr, FAST_DIV: tl.constexpr,
                 BLOCK_M: tl.constexpr, NB: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = rm[:, None, None]
    rb = tl.arange(0, NB)
    re = tl.arange(0, 32)
    rho = tl.load(clip_ptr + bin_idx)
    top = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, NB * 32):                                   # pass 1: max |x_s| of each row
        cols = k0 + rb[None, :, None] * 32 + re[None, None, :]
        mask = (rows < M) & (cols < K)
        x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
            x = _to_bf16_rne(_smooth_div(x, s, FAST_DIV)).to(tl.float32)
        top = tl.maximum(top, tl.max(tl.max(tl.abs(x), axis=2), axis=1))
    S = _block_exponent(top * rho, CEIL)
    spread = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, NB * 32):                                   # pass 2: the quantizer (x from L2)
        cols = k0 + rb[None, :, None] * 32 + re[None, None, :]
        mask = (rows < M) & (cols < K)
        x = tl.load(x_ptr + rows.to(tl.int64) * stride_xm + cols, mask=mask, other=0.0)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
            xs = _to_bf16_rne(_smooth_div(x.to(tl.float32), s, FAST_DIV))
            if WRITE_XS:
                tl.store(xs_ptr + rows.to(tl.int64) * K + cols, xs, mask=mask)
            v = xs.to(tl.float32)
        else:
            v = x.to(tl.float32)
        amax = tl.max(tl.abs(v), axis=2) * rho
        e = _block_exponent(amax, CEIL)
        inv = tl.where(e == 127, 1 << 22, (127 - e) << 23).to(tl.float32, bitcast=True)
        y = v * inv[:, :, None]
        t = tl.minimum(tl.abs(y), 8.0)
        step = tl.where(t < 2.0, 0.5, tl.where(t < 4.0, 1.0, 2.0))
        r = (t * (1.0 / step) + 8388608.0) - 8388608.0
        q = tl.minimum(r * step, 6.0)
        neg = y.to(tl.int32, bitcast=True) < 0
        d = tl.maximum(S[:, None] - e, 0)
        live = (tl.max(q, axis=2) > 0) & ((k0 // 32 + rb)[None, :] < K // 32)
        spread = tl.maximum(spread, tl.max(tl.where(live, d, 0), axis=1))
        tl.store(a8_ptr + rows.to(tl.int64) * K + cols, _e4m3_bits(q, d[:, :, None], neg), mask=mask)
    tl.store(spread_ptr + rm, spread, mask=rm < M)
    tl.store(exp_ptr + rm, S, mask=rm < M)


@triton.jit
def _div_check_kernel(x_ptr, s_ptr, bad_ptr, NX, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < NX, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + tl.program_id(1))
    a = _to_bf16_rne(_smooth_div(x, s, False)).to(tl.int16, bitcast=True)
    b = _to_bf16_rne(_smooth_div(x, s, True)).to(tl.int16, bitcast=True)
    tl.atomic_add(bad_ptr, tl.sum(((a != b) & (i < NX)).to(tl.int32), axis=0))


def fast_div_mismatches(n_divisors: int = 8192) -> dict:
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).cuda()
    x = bits.view(torch.bfloat16)
    x = x[torch.isfinite(x)].contiguous()
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.exp2(torch.rand(n_divisors - 3, device="cuda", generator=g) * 24 - 12)   # 2^-12 .. 2^12
    s = torch.cat((s, torch.tensor([1.0, 3.0, 0.1], device="cuda"))).contiguous()
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    _div_check_kernel[(triton.cdiv(x.numel(), 1024), s.numel())](x, s, bad, x.numel(), BLOCK=1024)
    return {"x_values": x.numel(), "divisors": s.numel(), "mismatches": int(bad.item())}


def best(launch, tiles):
    from triton.testing import do_bench
    timed = []
    for t in tiles:
        try:
            timed.append((do_bench(lambda: launch(t), warmup=5, rep=30, return_mode="median"), t))
        except Exception as exc:  # noqa: BLE001
            print(f"  tile {t} failed: {type(exc).__name__}", flush=True)
    ms, t = min(timed)
    return {"ms": ms, "tile": list(t), "all": {str(list(tt)): m for m, tt in timed}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600)
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp.bench.synthetic import SyntheticTSClip
    from wanexp.kernels.mxfp4_fp8 import act_quant_fp8
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "date": str(datetime.datetime.now(datetime.timezone.utc)),
              "torch": torch.__version__, "triton": triton.__version__, "tokens": args.tokens, "shapes": {}}
    result["fast_div"] = fast_div_mismatches()
    print("fast division against div_rn:", result["fast_div"], flush=True)
    M = args.tokens
    for K in (5120, 13824):
        lin = torch.nn.Linear(K, 5120, device="cuda", dtype=torch.bfloat16)
        layer = SyntheticTSClip().build(f"probe.{K}", lin).cuda()
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        clip, bin_, sm = layer.clip_table, 1, layer.smooth
        ref = act_quant_fp8(x, clip, bin_, sm, write_xs=True)
        rowmax = torch.empty(M, device="cuda")
        a8 = torch.empty(M, K, device="cuda", dtype=torch.uint8)
        xs = torch.empty_like(x)
        spread = torch.zeros(M, device="cuda", dtype=torch.int32)
        S = torch.empty(M, device="cuda", dtype=torch.int32)
        entry = {"copy_ms": do_bench(lambda: x.clone(), warmup=5, rep=30, return_mode="median")}

        def rowmax_launch(t, smooth=True, fast=False):
            bm, bk, w = t
            _row_absmax_kernel[(triton.cdiv(M, bm),)](x, sm, rowmax, M, K, x.stride(0), HAS_SMOOTH=smooth,
                                                      BLOCK_M=bm, BLOCK_K=bk, FAST_DIV=fast, num_warps=w)

        def quant_launch(t, smooth=True, fast=False):
            bm, nb, w = t
            grid = (triton.cdiv(M, bm), triton.cdiv(K // 32, nb))
            _act_quant_kernel[grid](x, sm, clip, bin_, x, xs, x, x, rowmax, a8, spread, M, K, x.stride(0), K,
                                    HAS_SMOOTH=smooth, CEIL=False, WRITE_XQ=False, WRITE_XS=smooth, WRITE_CODES=False,
                                    WRITE_FP8=True, BLOCK_M=bm, NB=nb, FAST_DIV=fast, num_warps=w)

        def rows_launch(t, smooth=True, fast=False):
            bm, nb, w = t
            _rows_kernel[(triton.cdiv(M, bm),)](x, sm, clip, bin_, xs, a8, spread, S, M, K, x.stride(0),
                                                HAS_SMOOTH=smooth, WRITE_XS=smooth, CEIL=False, FAST_DIV=fast,
                                                BLOCK_M=bm, NB=nb, num_warps=w)

        for name, launch, tiles in (("rowmax", rowmax_launch, ROWMAX_TILES), ("quant", quant_launch, ACT_TILES),
                                    ("rows", rows_launch, ROWS_TILES)):
            for label, kw in (("", {}), ("_fast", {"fast": True}), ("_nosmooth", {"smooth": False})):
                if label:  # the variants try the default's three fastest tiles (compiling every tile costs minutes)
                    ranked = sorted(entry[name]["all"].items(), key=lambda kv: kv[1])[:3]
                    tiles = [tuple(json.loads(t)) for t, _ in ranked]
                entry[name + label] = best(lambda t: launch(t, **kw), tiles)
                # outputs of this variant (at its best tile) against today's path
                if label != "_nosmooth":
                    spread.zero_()
                    launch(tuple(entry[name + label]["tile"]), **kw)
                    torch.cuda.synchronize()
                    if name == "rowmax":
                        rmax_ref = x.float().div(sm).bfloat16().float().abs().amax(1)
                        eq = bool(torch.equal(rowmax, rmax_ref))
                    else:
                        eq = bool(torch.equal(a8.view(torch.float8_e4m3fn).view(torch.uint8),
                                              ref["values"].view(torch.uint8))
                                  and torch.equal(spread, ref["spread"]) and torch.equal(xs, ref["xs"])
                                  and (name != "rows" or torch.equal(S, ref["exponent"])))
                    entry[name + label]["equal"] = eq
                print(f"K={K} {name + label}: {entry[name + label]['ms']:.3f} ms tile {entry[name + label]['tile']}"
                      f" equal {entry[name + label].get('equal')}", flush=True)
        gb = M * K * 2 * 2 / 1e6
        entry["copy_GBps"] = gb / entry["copy_ms"]
        entry["today_ms"] = entry["rowmax"]["ms"] + entry["quant"]["ms"]
        entry["today_GBps"] = M * K * 7 / 1e6 / entry["today_ms"]
        entry["rows_GBps"] = M * K * 5 / 1e6 / entry["rows"]["ms"]
        print(f"K={K}: copy {entry['copy_GBps']:.0f} GB/s; today {entry['today_ms']:.3f} ms "
              f"({entry['today_GBps']:.0f} GB/s); rows {entry['rows']['ms']:.3f} ms ({entry['rows_GBps']:.0f} GB/s)",
              flush=True)
        result["shapes"][str(K)] = entry
        tmp = out_dir / "act_quant_probe.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out_dir / "act_quant_probe.json")
        del x, xs, a8, layer, lin, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
