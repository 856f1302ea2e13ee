"""What bounds the FP8 path's activation quantizer on the GPU: a probe, one process.

    python experiments/gpu/act_quant_probe.py [--out DIR] [--tokens 57600]

Rounds 10 and 11 (session 6; experiments/results/round10, round11) timed the two kernels of the time (a row
maximum, then the quantizer) against a whole-rows kernel, each with the IEEE division, a reciprocal
division (one Markstein correction) and no smoothing: the quantizer was compute-bound (1.07 ms at
K = 5120 against 0.35 ms for its traffic at copy speed; 0.46 ms without the division), and the
reciprocal division was not exact (6 of 535 million bf16 quotients in fp32's normal range, and -0),
so it was dropped. This version probes what replaced them, ``_act_fp8_kernel``
(wanexp.kernels.mxfp4_fp8; the division once an element, x_s read back in the second pass): at
57,600 tokens and K = 5120 and 13824, with the TS-clip layer's smoothing (wanexp.bench.synthetic),
it times (``triton.testing.do_bench``, median) every tile of :data:`FP8_ACT_TILES` (READBACK on and off
among them) with the GPU's casts (HW) and without smoothing, beside a bf16 clone of x (the bandwidth
yardstick), and compares HW's bytes with the interpreter's math compiled on the GPU (bit-built casts).
It also times the low-rank branch's input two ways (``lowrank``): the first pass writing x_s, then
``F.linear(x_s, L2)``, against the first pass computing T = x_s · L2ᵀ itself with ``tl.dot``; and
the low-rank up-projection ``y += T · L1ᵀ`` as cuBLAS's ``addmm_`` against a Triton kernel reading
and writing y once (``lowrank_up``; into N = 13,824 and 5,120 outputs, Wan's two widths).
Results: ``act_quant_probe.json`` in ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import gpu_record, save_record  # noqa: E402

from wanexp.kernels.mxfp4_fp8 import FP8_ACT_TILES, _act_fp8_kernel  # noqa: E402

LOWRANK_TILES = [(16, 8, 4), (16, 4, 4), (32, 4, 8), (16, 16, 8)]


def time_tiles(fn, tiles, do_bench) -> dict[str, float]:
    """Median milliseconds of ``fn(tile)`` for each tile, keyed by the tile as JSON; a tile that does
    not compile or fit is reported and skipped."""
    timed = {}
    for tile in tiles:
        try:
            timed[json.dumps(list(tile))] = do_bench(lambda: fn(tile), warmup=5, rep=30, return_mode="median")
        except Exception as exc:  # noqa: BLE001
            print(f"  tile {tile} failed: {type(exc).__name__}", flush=True)
    return timed


@triton.jit
def _first_pass_kernel(x_ptr, smooth_ptr, down_ptr, xs_ptr, t_ptr, top_ptr, M, K, stride_xm,
                       R: tl.constexpr, LOWRANK: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """The quantizer's first pass alone (x_s = bf16(x / s) and each row's max |x_s|), either writing x_s
    for the low-rank GEMM (LOWRANK False) or computing the low-rank input T = x_s · L2ᵀ (R columns)
    from the same registers with ``tl.dot`` (LOWRANK True), which would spare x_s's write and the
    GEMM's read of it. An experiment: is the dot in the loop cheap enough (round 7's one-read path
    with a dot was latency-bound)?"""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, NB * 32)
    top = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(0, K, NB * 32):
        cols = k0 + rk
        mask = (rm[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        s = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0)
        xs = tl.math.div_rn(x.to(tl.float32), s[None, :]).to(tl.bfloat16)
        top = tl.maximum(top, tl.max(tl.abs(xs.to(tl.float32)), axis=1))
        if LOWRANK:
            l2t = tl.load(down_ptr + tl.arange(0, R)[None, :] * K + cols[:, None], mask=cols[:, None] < K, other=0.0)
            acc = tl.dot(xs, l2t, acc)
        else:
            tl.store(xs_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :], xs, mask=mask)
    tl.store(top_ptr + rm, top, mask=rm < M)
    if LOWRANK:
        tl.store(t_ptr + rm[:, None] * R + tl.arange(0, R)[None, :], acc.to(tl.bfloat16), mask=rm[:, None] < M)


def lowrank_in_quantizer(x, smooth, down, do_bench) -> dict:
    """Times the first pass writing x_s + F.linear(x_s, L2) against the first pass computing T itself."""
    M, K = x.shape
    R = down.shape[0]
    xs, top = torch.empty_like(x), torch.empty(M, device=x.device)
    t = torch.empty(M, R, device=x.device, dtype=torch.bfloat16)

    def first(tiles, lowrank):
        bm, nb, w = tiles
        _first_pass_kernel[(triton.cdiv(M, bm),)](x, smooth, down, xs, t, top, M, K, x.stride(0), R=R, LOWRANK=lowrank,
                                                  BLOCK_M=bm, NB=nb, num_warps=w)
    out = {}
    for label, fn in (("xs_then_gemm", lambda tiles: (first(tiles, False), torch.nn.functional.linear(xs, down))),
                      ("t_in_kernel", lambda tiles: first(tiles, True))):
        timed = time_tiles(fn, LOWRANK_TILES, do_bench)
        best = min(timed, key=timed.get)
        out[label] = {"ms": timed[best], "tile": json.loads(best), "all": timed}
    first(tuple(out["xs_then_gemm"]["tile"]), False)
    t_ref = torch.nn.functional.linear(xs, down).float()
    first(tuple(out["t_in_kernel"]["tile"]), True)
    out["t_rel_err"] = float((t.float() - t_ref).norm() / t_ref.norm())
    return out


UP_TILES = [(128, 128, 4), (128, 256, 8), (64, 256, 4), (256, 128, 8), (64, 128, 4)]


@triton.jit
def _lowrank_up_kernel(y_ptr, t_ptr, up_ptr, M, N, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y += T · L1ᵀ in place (T [M, R], L1 [N, R], bf16; fp32 sum, one rounding): the low-rank
    up-projection as one read and one write of y, against cuBLAS's ``addmm_``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R)
    t = tl.load(t_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=rm[:, None] < M, other=0.0)
    u = tl.load(up_ptr + rn[None, :] * R + rr[:, None], mask=rn[None, :] < N, other=0.0)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (y + tl.dot(t, u)).to(tl.bfloat16), mask=mask)


def lowrank_up(M: int, N: int, R: int, do_bench) -> dict:
    """cuBLAS ``y.addmm_(T, L1ᵀ)`` against :func:`_lowrank_up_kernel`, timed, and both against fp32."""
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(M, R, device="cuda", generator=g).bfloat16()
    up = (torch.randn(N, R, device="cuda", generator=g) * 0.1).bfloat16()
    y0 = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    y = y0.clone()
    exact = y0.float() + t.float() @ up.float().T

    def triton_up(tiles):
        bm, bn, w = tiles
        _lowrank_up_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](y, t, up, M, N, R=R, BLOCK_M=bm, BLOCK_N=bn,
                                                                     num_warps=w)
    out = {"addmm_ms": do_bench(lambda: y.addmm_(t, up.t()), warmup=5, rep=30, return_mode="median")}
    y.copy_(y0).addmm_(t, up.t())
    out["addmm_rel_err"] = float((y.float() - exact).norm() / exact.norm())
    timed = time_tiles(triton_up, UP_TILES, do_bench)
    best = min(timed, key=timed.get)
    y.copy_(y0)
    triton_up(tuple(json.loads(best)))
    out.update({"triton_ms": timed[best], "triton_tile": json.loads(best), "triton_all": timed,
                "triton_rel_err": float((y.float() - exact).norm() / exact.norm())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600, help="24,960 for 480p")
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp.bench.synthetic import SyntheticTSClip
    out_dir = Path(args.out)
    result = gpu_record(tokens=args.tokens, shapes={})
    M = args.tokens
    for K in (5120, 13824):
        lin = torch.nn.Linear(K, 5120, device="cuda", dtype=torch.bfloat16)
        layer = SyntheticTSClip().build(f"probe.{K}", lin).cuda()
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 2, K, device="cuda").bfloat16()
        clip, sm = layer.clip_table, layer.smooth_recip  # the kernels multiply by r = 1 / s

        def launch(t, smooth=True, hw=True):
            bufs = {"a8": torch.empty(M, K, device="cuda", dtype=torch.uint8), "xs": torch.empty_like(x),
                    "scale": torch.empty(M, device="cuda"), "spread": torch.empty(M, device="cuda", dtype=torch.int32),
                    "exponent": torch.empty(M, device="cuda", dtype=torch.int32)}
            bm, nb, w, readback = t
            _act_fp8_kernel[(triton.cdiv(M, bm),)](x, sm, clip, 1, bufs["xs"], bufs["a8"], bufs["scale"], bufs["spread"],
                                                   bufs["exponent"], M, K, x.stride(0), HAS_SMOOTH=smooth,
                                                   WRITE_XS=smooth, CEIL=False, HW=hw, READBACK=readback and smooth,
                                                   BLOCK_M=bm, NB=nb, num_warps=w)
            return bufs

        entry = {"copy_ms": do_bench(lambda: x.clone(), warmup=5, rep=30, return_mode="median")}
        exact = launch(FP8_ACT_TILES[0], hw=False)
        for label, kw in (("hw", {}), ("hw_nosmooth", {"smooth": False}), ("interp_math", {"hw": False})):
            # the other variants try hw's two fastest tiles (every compile costs a second or two)
            tiles = FP8_ACT_TILES if label == "hw" else [tuple(t) for t in entry["hw"]["ranked"][:2]]
            timed = time_tiles(lambda t: launch(t, **kw), tiles, do_bench)
            tile = min(timed, key=timed.get)
            entry[label] = {"ms": timed[tile], "tile": json.loads(tile), "all": timed,
                            "ranked": [json.loads(t) for t in sorted(timed, key=timed.get)]}
            if label == "hw":
                outs = [launch(tuple(json.loads(t))) for t in timed]
                entry[label]["equal_to_interp_math"] = all(
                    torch.equal(o[key], exact[key]) for o in outs for key in ("a8", "xs", "scale", "spread", "exponent"))
                entry[label]["max_spread"] = int(exact["spread"].max())
            print(f"K={K} {label}: {timed[tile]:.3f} ms tile {tile} equal {entry[label].get('equal_to_interp_math')}",
                  flush=True)
        entry["lowrank"] = lowrank_in_quantizer(x, sm, layer.lowrank_down.contiguous(), do_bench)
        print(f"K={K} low-rank input: first pass + GEMM {entry['lowrank']['xs_then_gemm']['ms']:.3f} ms, "
              f"T in the kernel {entry['lowrank']['t_in_kernel']['ms']:.3f} ms (rel. err {entry['lowrank']['t_rel_err']:.1e})",
              flush=True)
        entry["lowrank_up"] = lowrank_up(M, 5120 if K == 13824 else 13824, layer.lowrank_down.shape[0], do_bench)
        print(f"K={K} low-rank up-projection into N={5120 if K == 13824 else 13824}: addmm_ "
              f"{entry['lowrank_up']['addmm_ms']:.3f} ms, Triton {entry['lowrank_up']['triton_ms']:.3f} ms "
              f"(rel. err {entry['lowrank_up']['addmm_rel_err']:.1e} / {entry['lowrank_up']['triton_rel_err']:.1e})",
              flush=True)
        entry["copy_GBps"] = M * K * 4 / 1e6 / entry["copy_ms"]
        entry["hw_GBps"] = M * K * 5 / 1e6 / entry["hw"]["ms"]   # HBM: x once, E4M3 and x_s out
        print(f"K={K}: copy {entry['copy_GBps']:.0f} GB/s; quantizer {entry['hw']['ms']:.3f} ms ({entry['hw_GBps']:.0f} GB/s)",
              flush=True)
        result["shapes"][str(K)] = entry
        save_record(result, out_dir, "act_quant_probe.json")
        del layer, lin, exact
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
