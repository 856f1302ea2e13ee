"""Probe (issue 13): the fastest exact-enough way to accumulate XᵀX on the GPU at Wan's widths."""
import time, torch
dev = "cuda"
def bench(fn, n=5):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n
for k in (5120, 13824):
    x = torch.randn(14400, k, device=dev, dtype=torch.bfloat16)
    h = torch.zeros(k, k, device=dev, dtype=torch.float32)
    xf = x.float()
    flops = 2 * x.shape[0] * k * k
    res = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    res["fp32 addmm"] = bench(lambda: h.addmm_(xf.T, xf))
    torch.backends.cuda.matmul.allow_tf32 = True
    res["tf32 addmm"] = bench(lambda: h.addmm_(xf.T, xf))
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        res["bf16->fp32 mm(out_dtype)"] = bench(lambda: h.add_(torch.mm(x.T, x, out_dtype=torch.float32)))
    except Exception as e:
        print("out_dtype:", type(e).__name__, e)
    try:
        res["bf16 addmm into fp32 (out_dtype)"] = bench(lambda: torch.addmm(h, x.T, x, out_dtype=torch.float32, out=h))
    except Exception as e:
        print("addmm out_dtype:", type(e).__name__, e)
    res["bf16 mm, fp32 add"] = bench(lambda: h.add_((x.T @ x).float()))
    ref = (xf.double().T @ xf.double())
    for name, fn in (("tf32", None),):
        pass
    h.zero_(); torch.mm(x.T, x, out_dtype=torch.float32, out=None) if False else None
    try:
        e1 = float((torch.mm(x.T, x, out_dtype=torch.float32).double() - ref).norm() / ref.norm())
        print(f"k={k}: rel err bf16-in fp32-out {e1:.2e}")
    except Exception:
        pass
    e2 = float(((x.T @ x).double() - ref).norm() / ref.norm())
    torch.backends.cuda.matmul.allow_tf32 = True
    e3 = float(((xf.T @ xf).double() - ref).norm() / ref.norm())
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"k={k}: rel err bf16-out {e2:.2e}, tf32 {e3:.2e}")
    for n, s in res.items():
        print(f"k={k} M=14400 {n}: {s * 1e3:.2f} ms  {flops / s / 1e12:.0f} TFLOP/s")
    del x, xf, h, ref
    torch.cuda.empty_cache()
