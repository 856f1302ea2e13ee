# Issue 13 on one GPU (device tool, carry [".whl"]): the GPU tests of GPTQ and the formats (the leaner GPTQ loop and
# the E2M1 lookup rounding run on CUDA), then the calibration bench (bench_conf/bench/calib_a14b.yaml) into $OUT.
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue13_calib.sh
set -u
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gptq.py tests/test_formats.py -m gpu 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
timeout "${CALIB_TIMEOUT:-510}" python3 -m wanexp.bench bench=calib_a14b bench.out_dir="$OUT" "$@" > "$OUT/bench_calib.log" 2>&1
grep -v "Warning\|warn" "$OUT/bench_calib.log" | tail -45
