# Issue 17 on one GPU (device tool, carry [".whl"]), two calls of under 10 minutes each:
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue17_fp8.sh mxfp4    # tests + MXFP4/FP8 bench
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue17_fp8.sh formats  # NVFP4, INT4, HiF4 benches
# mxfp4: the GPU tests of the FP8 fold, the custom ops and model.compile (bit-exactness at Wan shapes,
#   compiled = eager), then bench_conf/bench/fp8_a14b.yaml into $OUT, cut at 7 minutes (run_bench
#   writes its JSON after every measurement, so what it measured is kept).
# formats: each other 4-bit format beside BF16 eager and compiled, 720p, in its own process.
set -u
case "${1:-mxfp4}" in
mxfp4)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  timeout 420 python3 -m wanexp.bench bench=fp8_a14b bench.out_dir="$OUT" 2>&1 | tee "$OUT/bench_fp8.log" | tail -40 ;;
formats)
  for f in nvfp4 int4 hif4; do
    timeout 170 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_$f bench.quant.format=$f \
      "bench.paths=[bf16,bf16_compiled,fused,fused_compiled]" \
      "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" 2>&1 | tail -12
  done ;;
esac
