"""Could the low-rank branch ride in the MXFP4 FP8 GEMM's K as extra E4M3 columns? (issue 17, CPU probe)

In the GEMM's units (y = 2^(S_a - H) 2^(S_w - H) sum_k A W, H = 6) the branch's term for rank r is
T[m, r] L1[n, r] 2^(2H - S_a[m] - S_w[n]). Split across an activation column and a weight column with a
per-rank power of two, it needs max_m |T 2^(H - S_a)| * max_n |L1 2^(H - S_w)| <= 448^2 (both factors
within E4M3), halved for the power-of-two rounding of the shift. This prints that product per rank for
the kernel tests' layer (smoothing, rank 32, clip table [0.7, 0.9]) at two Wan K, with randn * 2 inputs.

    PYTHONPATH=. python experiments/fp8_branch_in_k_range.py
"""
import torch

from wanexp.formats import get_format
from wanexp.kernels.mxfp4_fp8 import row_exponents


def layer_tensors(k, n, rank, g):
    w = torch.randn(n, k, generator=g) * 0.05
    s = torch.rand(k, generator=g) + 0.5
    l1 = (torch.randn(n, rank, generator=g) * 0.05).to(torch.bfloat16)
    l2 = (torch.randn(rank, k, generator=g) * 0.05).to(torch.bfloat16)
    packed = get_format("mxfp4").encode(w * s - l1.float() @ l2.float())
    return packed.data["codes"], packed.data["scales"], s, l1, l2


def main():
    g = torch.Generator().manual_seed(0)
    rho = 0.7
    for k, n in ((5120, 640), (13824, 512)):
        codes, scales, s, l1, l2 = layer_tensors(k, n, 32, g)
        x = (torch.randn(512, k, generator=g) * 2).to(torch.bfloat16)
        xs = (x.float() / s).to(torch.bfloat16)
        s_a = torch.floor(torch.log2(xs.float().abs().amax(1) * rho)) - 2
        s_w, _ = row_exponents(codes, scales)
        t = torch.nn.functional.linear(xs, l2).double()
        a = (t.abs() * 2.0 ** (6 - s_a.double()[:, None])).amax(0)
        w = (l1.double().abs() * 2.0 ** (6 - s_w.double()[:, None])).amax(0)
        prod = a * w
        print(f"K={k} N={n}: per-rank product {float(prod.min()):.3g}..{float(prod.max()):.3g} against "
              f"448^2 = {448 ** 2}; ranks beyond 448^2/2: {int((prod > 448 ** 2 / 2).sum())}/32")


if __name__ == "__main__":
    main()
