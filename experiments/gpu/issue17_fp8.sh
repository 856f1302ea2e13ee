# Issue 17 on one GPU (device tool, carry [".whl"]; about 8 minutes on an H200):
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue17_fp8.sh
# 1. the FP8 fold and the custom op, compiled kernels: bit-exactness at Wan shapes, compiled = eager;
# 2. the side-by-side bench (bench_conf/bench/fp8_a14b.yaml) into $OUT, cut at 7 minutes so what it
#    measured is kept (run_bench writes its JSON after every measurement).
set -u
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu 2>&1 | tail -15
timeout 420 python3 -m wanexp.bench bench=fp8_a14b out_dir="$OUT" 2>&1 | tail -40
