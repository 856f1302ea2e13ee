"""Micro-benchmark of wanexp.formats: quantize-dequantize, encode and decode throughput.

    python experiments/bench_formats.py                       # 4096 x 4096, fp32 and bf16, CPU
    python experiments/bench_formats.py --device cuda --out experiments/results/formats_bench_cuda.md

Prints a Markdown table (elements per second, best of --repeats after one warm-up call) headed by
the machine it ran on. Not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from wanexp.formats import FORMAT_NAMES, get_format  # noqa: E402


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs visible, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def best_time(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--formats", default=",".join(FORMAT_NAMES))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()

    n = args.size * args.size
    lines = [
        f"# wanexp.formats throughput, {args.device}",
        "",
        f"- date: {args.date}",
        f"- machine: {machine(args.device)}",
        f"- tensor: {args.size} x {args.size} ({n / 1e6:.1f} M elements), N(0, 1); blocks along the last dim;"
        f" default options of each format; best of {args.repeats} after a warm-up",
        "- command: `python experiments/bench_formats.py"
        + (f" --device {args.device}" if args.device != "cpu" else "") + "`",
        "",
        "| format | dtype | bits/elem | packed MiB | qdq Melem/s | encode Melem/s | decode Melem/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, args.size, generator=g)
    for name in args.formats.split(","):
        fmt = get_format(name)
        for dtype_name in args.dtypes.split(","):
            x = base.to(device=args.device, dtype=getattr(torch, dtype_name))
            packed = fmt.encode(x)
            t_qdq = best_time(lambda: fmt.quantize_dequantize(x), args.repeats, args.device)
            t_enc = best_time(lambda: fmt.encode(x), args.repeats, args.device)
            t_dec = best_time(lambda: fmt.decode(packed), args.repeats, args.device)
            row = (f"| {name} | {dtype_name} | {fmt.bits_per_element_for(args.size):.3f} | "
                   f"{packed.nbytes / 2**20:.2f} | {n / t_qdq / 1e6:.1f} | {n / t_enc / 1e6:.1f} | "
                   f"{n / t_dec / 1e6:.1f} |")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
