"""GPU efficiency benchmark of the W4A4 paths (``python -m wanexp.bench``, config ``bench_conf/bench/``).

:mod:`wanexp.bench.core` builds the full-size A14B expert and times BF16, the reference W4A4 path
and the fused one in one process; :mod:`wanexp.bench.kernels` times the kernels per layer shape.
"""
