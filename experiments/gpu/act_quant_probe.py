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
Results: ``act_quant_probe.json`` in ``--out`` (default ``$OUT``).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from wanexp.kernels.mxfp4_fp8 import FP8_ACT_TILES, _act_fp8_kernel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=57600, help="24,960 for 480p")
    args = ap.parse_args()
    from triton.testing import do_bench

    from wanexp.bench.synthetic import SyntheticTSClip
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "date": str(datetime.datetime.now(datetime.timezone.utc)),
              "torch": torch.__version__, "triton": triton.__version__, "tokens": args.tokens, "shapes": {}}
    M = args.tokens
    for K in (5120, 13824):
        lin = torch.nn.Linear(K, 5120, device="cuda", dtype=torch.bfloat16)
        layer = SyntheticTSClip().build(f"probe.{K}", lin).cuda()
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.logspace(-3, 2, K, device="cuda").bfloat16()
        clip, sm = layer.clip_table, layer.smooth

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
            timed = {}
            for t in FP8_ACT_TILES:
                try:
                    timed[str(list(t))] = do_bench(lambda: launch(t, **kw), warmup=5, rep=30, return_mode="median")
                except Exception as exc:  # noqa: BLE001
                    print(f"  tile {t} failed: {type(exc).__name__}", flush=True)
            tile = min(timed, key=timed.get)
            entry[label] = {"ms": timed[tile], "tile": json.loads(tile), "all": timed}
            if label == "hw":
                outs = [launch(tuple(json.loads(t))) for t in timed]
                entry[label]["equal_to_interp_math"] = all(
                    torch.equal(o[key], exact[key]) for o in outs for key in ("a8", "xs", "scale", "spread", "exponent"))
                entry[label]["max_spread"] = int(exact["spread"].max())
            print(f"K={K} {label}: {timed[tile]:.3f} ms tile {tile} equal {entry[label].get('equal_to_interp_math')}",
                  flush=True)
        entry["copy_GBps"] = M * K * 4 / 1e6 / entry["copy_ms"]
        entry["hw_GBps"] = M * K * 5 / 1e6 / entry["hw"]["ms"]   # HBM: x once, E4M3 and x_s out
        print(f"K={K}: copy {entry['copy_GBps']:.0f} GB/s; quantizer {entry['hw']['ms']:.3f} ms ({entry['hw_GBps']:.0f} GB/s)",
              flush=True)
        result["shapes"][str(K)] = entry
        tmp = out_dir / "act_quant_probe.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out_dir / "act_quant_probe.json")
        del layer, lin, exact
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
