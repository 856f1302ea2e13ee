# Issue 17 on one GPU (device tool, carry [".whl"]), two calls of under 10 minutes each:
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue17_fp8.sh mxfp4    # tests + MXFP4/FP8 bench
#   source experiments/gpu/setup.sh && bash experiments/gpu/issue17_fp8.sh formats  # NVFP4, INT4, HiF4 benches
#   round2 / formats2: the same after the compiled-recompile fix, 720p, formats in one process
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
round2)  # after the recompile fix: the GPU tests, then MXFP4 at 720p (each path eager and compiled; recompiles counted)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  TORCH_LOGS=recompiles timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_fp8_a14b_720p \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" \
    "bench.profile.paths=[bf16_compiled,fused_fp8,fused_fp8_compiled]" bench.out_dir="$OUT" > "$OUT/bench_fp8.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_fp8.log")"; grep -v "__recompiles" "$OUT/bench_fp8.log" | tail -40 ;;
formats2)  # NVFP4, INT4, HiF4 in one process beside BF16 eager and compiled, 720p
  TORCH_LOGS=recompiles timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_formats_a14b_720p \
    "bench.paths=[bf16,bf16_compiled]" "bench.extra_formats=[nvfp4,int4,hif4]" bench.profile.enabled=false \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_formats.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_formats.log")"; grep -v "__recompiles" "$OUT/bench_formats.log" | tail -30 ;;
round3)  # fixes re-checked, the attention kernels (tests + one-call micro-bench), then NVFP4/INT4/HiF4 and
  # MXFP4 + FP8 attention in the full expert beside BF16 eager and compiled, 720p, one process
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py tests/test_attention.py -m gpu \
    -k "fp8_fold or int4_nvfp4_hif4 or tiles or layers_equal or attention or attn" 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  timeout 60 python3 experiments/gpu/attention_bench.py --out "$OUT" --repeats 5 > "$OUT/attention_bench.log" 2>&1
  tail -12 "$OUT/attention_bench.log"
  timeout 390 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round3_720p bench.profile.enabled=false \
    "bench.paths=[bf16,bf16_compiled,fused_fp8+attn_fp8_compiled]" "bench.extra_formats=[nvfp4,int4,hif4]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round3.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_round3.log" | grep "s/forward\|Error\|error" | tail -20 ;;
round4)  # what the last device minutes allow: the fixes and the attention kernels on the GPU, the attention
  # micro-bench, then NVFP4 and HiF4 compiled beside compiled BF16 in the full expert, 720p, one process
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py tests/test_attention.py -m gpu \
    -k "int4_nvfp4_hif4 or layers_equal or attention or attn" 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  timeout 50 python3 experiments/gpu/attention_bench.py --out "$OUT" --repeats 3 > "$OUT/attention_bench.log" 2>&1
  tail -12 "$OUT/attention_bench.log"
  timeout 200 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_formats_720p bench.profile.enabled=false \
    "bench.paths=[bf16_compiled]" "bench.extra_formats=[nvfp4,hif4]" "bench.extra_format_paths=[fused_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_formats.log" 2>&1
  grep "s/forward\|Error\|error" "$OUT/bench_formats.log" | tail -10 ;;
round5)  # session 4: the current FP8 path timed (after the fold revert), what its fallback check's host sync
  # costs (fp8_unchecked, a diagnostic), INT4 eager and compiled, NVFP4/HiF4 eager, SageAttention in the expert,
  # with a kernel profile of the compiled FP8 path; 720p, one process
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu \
    -k "fp8 or int4_nvfp4_hif4 or layers_equal" 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
  TORCH_LOGS=recompiles timeout 440 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round5_720p \
    "bench.paths=[bf16,bf16_compiled,fused_fp8_compiled,fused_fp8_unchecked_compiled,fused_fp8+attn_int8_sage_compiled]" \
    "bench.extra_formats=[int4,nvfp4,hif4]" "~bench.extra_format_paths" \
    "+bench.extra_format_paths={int4:[fused,fused_compiled],nvfp4:[fused],hif4:[fused]}" \
    "bench.profile.paths=[fused_fp8_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round5.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round5.log")"
  grep -v "__recompiles" "$OUT/bench_round5.log" | grep "s/forward\|profile\|Error\|error\|quantized" | tail -24 ;;
round7)  # session 5: the one-read activation path (codes + S + spread + T, then the fold): GPU bit-exactness
  # tests, one linear piece by piece (experiments/gpu/linear_bench.py), then the expert at 720p, profiled
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu \
    -k "fp8 or tiles or layers_equal" 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
  timeout 90 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4
  TORCH_LOGS=recompiles timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round7_720p \
    "bench.paths=[bf16_compiled,fused_fp8_compiled]" "bench.profile.paths=[fused_fp8_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round7.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round7.log")"
  grep -v "__recompiles" "$OUT/bench_round7.log" | grep "s/forward\|profile\|Error\|error\|quantized" | tail -24 ;;
round8)  # session 5: attention=fp8_cudnn (cuDNN's FP8 SDPA) on the GPU: its tests, the one-call micro-bench,
  # then the expert at 720p and 480p: BF16 eager and compiled, W4A4 MXFP4 FP8 compiled, + fp8_cudnn attention
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  WANEXP_ATTN_BENCH_CUDNN_ONLY=1 timeout 60 python3 experiments/gpu/attention_bench.py --out "$OUT" --repeats 5 2>&1 \
    | grep -v '^ \|^{\|^}' | tail -4
  TORCH_LOGS=recompiles timeout 400 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round8 bench.profile.enabled=false \
    "bench.paths=[bf16,bf16_compiled,fused_fp8_compiled,fused_fp8+attn_fp8_cudnn_compiled]" bench.out_dir="$OUT" > "$OUT/bench_round8.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round8.log")"
  grep -v "__recompiles" "$OUT/bench_round8.log" | grep "s/forward\|Error\|error\|quantized" | tail -24 ;;
video2)  # session 5: the W4A4 video checked against a measured 5-step video, and W4A4 + fp8_cudnn attention
  TORCH_LOGS=recompiles timeout 570 python3 -m wanexp.bench bench=video_a14b bench.name=video_a14b_w4a4 bench.out_dir="$OUT" \
    "bench.whole_video.precisions=[w4a4,w4a4+attn_fp8_cudnn]" "bench.whole_video.check=[w4a4]" > "$OUT/bench_video.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_video.log")"
  grep -v "__recompiles" "$OUT/bench_video.log" | grep "video\|Error\|error\|Killed" | tail -20 ;;
round9)  # session 5, last device minutes: fp8_cudnn with its quantization outside the op (inductor fuses it):
  # the cuDNN GPU test, the one-call micro-bench, then the expert at 720p beside compiled BF16
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -m gpu -k cudnn 2>&1 | tail -2
  WANEXP_ATTN_BENCH_CUDNN_ONLY=1 timeout 30 python3 experiments/gpu/attention_bench.py --out "$OUT" --shapes 720p --repeats 5 2>&1 \
    | grep -v '^ \|^{\|^}' | tail -3
  timeout 170 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round9_720p bench.profile.enabled=false \
    "bench.paths=[bf16_compiled,fused_fp8+attn_fp8_cudnn_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round9.log" 2>&1
  grep "s/forward\|Error\|error" "$OUT/bench_round9.log" | tail -8 ;;
round10)  # session 6: what bounds the activation quantizer (experiments/gpu/act_quant_probe.py: division, tiles,
  # a whole-rows kernel), the current linear piece by piece, then the whole video with round 9's fp8_cudnn
  timeout 170 python3 experiments/gpu/act_quant_probe.py --out "$OUT" 2>&1 | tee "$OUT/act_quant_probe.log" | grep -v "^  tile" | tail -24
  timeout 80 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4
  TORCH_LOGS=recompiles timeout 300 python3 -m wanexp.bench bench=video_a14b bench.name=video_a14b_fp8_cudnn bench.out_dir="$OUT" \
    "bench.whole_video.precisions=[w4a4+attn_fp8_cudnn]" "bench.whole_video.check=[]" > "$OUT/bench_video.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_video.log")"
  grep -v "__recompiles" "$OUT/bench_video.log" | grep "video\|Error\|error\|Killed" | tail -20 ;;
round11)  # session 6: the one-kernel FP8 activation quantizer (hardware casts, reciprocal division): GPU
  # bit-exactness tests, the probe, one linear piece by piece, then the expert at 720p and 480p
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu \
    -k "fp8 or tiles or layers_equal" 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  timeout 90 python3 experiments/gpu/act_quant_probe.py --out "$OUT" 2>&1 | tee "$OUT/act_quant_probe.log" | grep -v "^  tile" | tail -10
  timeout 50 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -3
  TORCH_LOGS=recompiles timeout 340 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round11 bench.profile.enabled=false \
    "bench.paths=[bf16_compiled,fused_fp8_compiled,fused_fp8+attn_fp8_cudnn_compiled]" bench.out_dir="$OUT" > "$OUT/bench_round11.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round11.log")"
  grep -v "__recompiles" "$OUT/bench_round11.log" | grep "s/forward\|Error\|error\|quantized" | tail -12 ;;
round12)  # session 6: the FP8 quantizer with the division once an element (x_s read back): GPU bit-exactness
  # tests, the probe, the expert at 720p and 480p, then the whole video, fp8_cudnn first (each part cut by its timeout)
  timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu \
    -k "fp8 or tiles or layers_equal" 2>&1 | tee "$OUT/gpu_tests.log" | tail -2
  timeout 50 python3 experiments/gpu/act_quant_probe.py --out "$OUT" 2>&1 | tee "$OUT/act_quant_probe.log" | grep -v "^  tile" | tail -8
  TORCH_LOGS=recompiles timeout 160 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round12 bench.profile.enabled=false \
    "bench.paths=[bf16_compiled,fused_fp8_compiled,fused_fp8+attn_fp8_cudnn_compiled]" bench.out_dir="$OUT" > "$OUT/bench_round12.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_round12.log" | grep "s/forward\|Error\|error" | tail -8
  TORCH_LOGS=recompiles timeout 300 python3 -m wanexp.bench bench=video_a14b bench.name=video_a14b_round12 bench.out_dir="$OUT" \
    "bench.whole_video.precisions=[w4a4+attn_fp8_cudnn,w4a4]" "bench.whole_video.check=[]" > "$OUT/bench_video.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_video.log" | grep "video\|Error\|error\|Killed" | tail -8 ;;
round13)  # session 6, last device minutes: the compiled FP8 path profiled at 720p beside compiled BF16, then 480p
  TORCH_LOGS=recompiles timeout 230 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round13 \
    "bench.paths=[bf16_compiled,fused_fp8_compiled,fused_fp8+attn_fp8_cudnn_compiled]" "bench.profile.paths=[fused_fp8_compiled]" \
    bench.out_dir="$OUT" > "$OUT/bench_round13.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_round13.log" | grep "s/forward\|Error\|error\|profile\|quantizer\|attention\|GEMM\|fold\|other\|total" | tail -24 ;;
round14)  # next: READBACK as a tuned choice (the 480p question of rounds 11-13) and T computed in the quantizer
  # (act_quant_probe.py "lowrank"), probed at the 720p and 480p token counts, then the expert at both resolutions
  # with 2 timed forwards a cell
  timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "fp8 or tiles" 2>&1 | tail -2
  for t in 57600 24960; do timeout 70 python3 experiments/gpu/act_quant_probe.py --tokens $t --out "$OUT/probe_$t" 2>&1 \
    | grep -v "^  tile" | tail -9; done
  timeout 240 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round14 bench.profile.enabled=false bench.repeats=2 \
    "bench.paths=[bf16_compiled,fused_fp8_compiled,fused_fp8+attn_fp8_cudnn_compiled]" bench.out_dir="$OUT" > "$OUT/bench_round14.log" 2>&1
  grep "s/forward\|Error\|error" "$OUT/bench_round14.log" | tail -8 ;;
round15)  # session 7: the low-rank up-projection in one pass over y (lowrank_add_) and auto = FP8 on Hopper: the GPU
  # tests, then the expert at 720p and 480p, 2 timed forwards a cell: upcast + cuBLAS, auto (now FP8), + fp8_cudnn
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu \
    -k "fp8 or tiles or lowrank or auto or layers_equal" 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
  timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round15 bench.profile.enabled=false bench.repeats=2 \
    "bench.paths=[bf16_compiled,fused_cublas_compiled,fused_compiled,fused_fp8+attn_fp8_cudnn_compiled]" \
    bench.out_dir="$OUT" > "$OUT/bench_round15.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_round15.log" | grep "s/forward\|Error\|error" | tail -10 ;;
ggemm15)  # session 7: the group-scaled INT8 GEMM (wanexp.kernels.group_gemm; INT4 G=128, HiF4 G=64): GPU tests, then
  # the probe at the 720p and 480p token counts beside bf16 F.linear and FP8 _scaled_mm
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_group_gemm.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
  timeout 120 python3 experiments/gpu/group_gemm_probe.py --budget 100 --out "$OUT/probe_57600" 2>&1 | tee "$OUT/probe_57600.log" | tail -25
  timeout 50 python3 experiments/gpu/group_gemm_probe.py --tokens 24960 --budget 35 --out "$OUT/probe_24960" 2>&1 \
    | tee "$OUT/probe_24960.log" | tail -12 ;;
round16)  # session 9: every format on the current code in one process, 720p: BF16 eager and compiled, MXFP4 (auto =
  # FP8) eager and compiled, NVFP4 / INT4 / HiF4 fused eager and compiled (their last figures are rounds 4-5's)
  timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "int4_nvfp4_hif4 or fp8" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -2
  TORCH_LOGS=recompiles timeout 480 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round16 bench.profile.enabled=false \
    "bench.paths=[bf16,bf16_compiled,fused,fused_compiled]" "bench.extra_formats=[nvfp4,int4,hif4]" \
    "bench.extra_format_paths=[fused_compiled,fused]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round16.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round16.log")"
  grep -v "__recompiles" "$OUT/bench_round16.log" | grep "s/forward\|Error\|error\|quantized" | tail -16 ;;
round16p)  # session 9: where the other formats' time goes: a kernel profile of each compiled format beside compiled BF16, 720p
  timeout 420 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round16p "bench.paths=[bf16_compiled]" \
    "bench.extra_formats=[nvfp4,int4,hif4]" "bench.extra_format_paths=[fused_compiled]" \
    "bench.profile.paths=[bf16_compiled,fused_nvfp4_compiled,fused_int4_compiled,fused_hif4_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round16p.log" 2>&1
  grep "s/forward\|Error\|error\|profile" "$OUT/bench_round16p.log" | tail -16 ;;
round16s)  # session 9: what smoothing and the rank-32 branch cost the MXFP4 FP8 path (bounds for reciprocal smoothing and
  # an epilogue low-rank GEMM): compiled BF16 beside compiled W4A4 as built, without smoothing, and without both; 720p,
  # one process each (the quantization is per process), 2 timed forwards a cell
  for q in "base" "bench.quant.smooth=false" "bench.quant.smooth=false bench.quant.rank=0"; do
    n=$(echo "$q" | tr -cd 'a-z0' | tail -c 24)
    timeout 170 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round16s_$n bench.profile.enabled=false bench.repeats=2 \
      "bench.paths=[bf16_compiled,fused_compiled]" $( [ "$q" = base ] || echo $q ) \
      "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round16s_$n.log" 2>&1
    echo "== $q"; grep "s/forward\|Error\|error" "$OUT/bench_round16s_$n.log" | tail -3
  done ;;
round17)  # session 10: reciprocal smoothing (x_s = bf16(x * r)) and the low-rank input from x (lowrank_down: no x_s
  # write): GPU tests, the per-linear pieces at 720p, then compiled BF16 beside compiled W4A4 MXFP4 (FP8) with BF16 and
  # fp8_cudnn attention, 720p, one process, 2 timed forwards a cell
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -4
  timeout 100 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4
  TORCH_LOGS=recompiles timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round17 bench.profile.enabled=false \
    bench.repeats=2 "bench.paths=[bf16_compiled,fused_compiled,fused_fp8+attn_fp8_cudnn_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round17.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round17.log")"
  grep -v "__recompiles" "$OUT/bench_round17.log" | grep "s/forward\|Error\|error\|quantized" | tail -8 ;;
round17g)  # session 10: the GPU kernel tests (whole files, no test_compile), the Triton FP8 GEMM with the low-rank
  # epilogue against cuBLAS + lowrank_add_ (experiments/gpu/fp8_gemm_probe.py), the per-linear pieces again (pass 1 of
  # the quantizer rounds each row's max once)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  timeout 220 python3 experiments/gpu/fp8_gemm_probe.py --out "$OUT" 2>&1 | tee "$OUT/fp8_gemm_probe.log" | grep -v "^[0-9]*->[0-9]* [0-9]" | tail -6
  timeout 100 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4 ;;
round17r)  # session 10: r loaded in x's layout in the FP8 quantizer: the per-linear pieces (with the no-smoothing
  # bound), then compiled BF16 beside compiled W4A4 MXFP4 (FP8), 720p, one process, 2 timed forwards a cell
  timeout 120 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4
  TORCH_LOGS=recompiles timeout 240 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round17r bench.profile.enabled=false \
    bench.repeats=2 "bench.paths=[bf16_compiled,fused_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round17r.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round17r.log")"
  grep -v "__recompiles" "$OUT/bench_round17r.log" | grep "s/forward\|Error\|error\|quantized" | tail -8 ;;
round17u)  # session 10: r in x's layout in every quantizer: the kernel tests (bit-exactness, every tile), then the other
  # formats compiled beside compiled BF16, 720p, one process
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "act_quant or tiles or int4_nvfp4_hif4 or fp8_fold" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -2
  TORCH_LOGS=recompiles timeout 230 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round17u bench.profile.enabled=false \
    "bench.paths=[bf16_compiled,fused_compiled]" "bench.extra_formats=[nvfp4,int4,hif4]" "bench.extra_format_paths=[fused_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round17u.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round17u.log")"
  grep -v "__recompiles" "$OUT/bench_round17u.log" | grep "s/forward\|Error\|error\|quantized" | tail -8 ;;
round18a)  # session 11: the GPU kernel tests on session 10's untested layout changes and the tensor-wise FP8 path, then
  # the per-linear pieces with the tensor-wise GEMM, the scaled branch pass and the unchecked layer
  timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  timeout 150 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -4 ;;
round19a)  # session 13: the leaner quantizers (E2M1 rounding without the reciprocal, 'live' from the block max, r
  # unmasked) and the fold's bound checked once a block (kernels.block_checked): the GPU tests of the kernels and
  # model.compile, one linear piece by piece, then compiled BF16 beside W4A4 MXFP4 FP8 with the per-layer check
  # (as before) and the per-block check (now model.compile's), 720p, one process, 2 timed forwards a cell
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_compile.py -m gpu 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -4
  timeout 80 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -3 | cut -c1-900
  TORCH_LOGS=recompiles timeout 300 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round19a bench.profile.enabled=false \
    bench.repeats=2 "bench.paths=[bf16_compiled,fused_fp8_layer_checked_compiled,fused_fp8_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round19a.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round19a.log")"
  grep -v "__recompiles" "$OUT/bench_round19a.log" | grep "s/forward\|Error\|error\|quantized\|fallback" | tail -10 ;;
round18b)  # session 11: the two GEMM + branch-pass chains interleaved (epilogue_probe.py), the per-linear pieces with
  # lowrank_down's broadcast r restored, then compiled BF16 beside compiled W4A4 MXFP4 FP8 three ways (row-wise GEMM;
  # tensor-wise GEMM with the scales in the branch's pass; without the fallback check's host sync), 720p, one process,
  # 2 timed forwards a cell. (Run at 0e891b5, where "fp8" was the row-wise form and the tensor-wise one was
  # fused_fp8_tensorwise; with today's names the first two cells are those forms, and the unchecked one is now tensor-wise.)
  timeout 90 python3 experiments/gpu/epilogue_probe.py --out "$OUT" 2>&1 | tee "$OUT/epilogue_probe.log" | tail -3
  timeout 100 python3 experiments/gpu/linear_bench.py --out "$OUT" 2>&1 | tee "$OUT/linear_bench.log" | tail -3 | cut -c1-900
  TORCH_LOGS=recompiles timeout 450 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round18b bench.profile.enabled=false \
    bench.repeats=2 "bench.paths=[bf16_compiled,fused_fp8_rowwise_compiled,fused_fp8_compiled,fused_fp8_unchecked_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round18b.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round18b.log")"
  grep -v "__recompiles" "$OUT/bench_round18b.log" | grep "s/forward\|Error\|error\|quantized\|fallback" | tail -10 ;;
round18c)  # session 11: INT4 on cuBLAS's 1x128 block-scaled FP8 GEMM (wanexp.kernels.int4_fp8) and MXFP4's tensor-wise
  # default: the INT4 FP8 GPU test, then compiled BF16, MXFP4 (auto) and INT4 both ways (auto = block-scaled FP8;
  # cublas = the upcast), 720p, one process, 1 timed forward a cell (the session's device time is short)
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu -k "int4_on_fp8" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -4
  TORCH_LOGS=recompiles timeout 330 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round18c bench.profile.enabled=false \
    bench.repeats=1 "bench.paths=[bf16_compiled,fused_compiled]" "bench.extra_formats=[int4]" \
    "bench.extra_format_paths=[fused_compiled,fused_cublas_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round18c.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round18c.log")"
  grep -v "__recompiles" "$OUT/bench_round18c.log" | grep "s/forward\|Error\|error\|quantized\|fallback" | tail -10 ;;
round17f)  # session 10: the other formats (their quantizers now multiply by r too) compiled beside compiled BF16, 720p
  TORCH_LOGS=recompiles timeout 400 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_round17f bench.profile.enabled=false \
    "bench.paths=[bf16_compiled]" "bench.extra_formats=[nvfp4,int4,hif4]" "bench.extra_format_paths=[fused_compiled]" \
    "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" > "$OUT/bench_round17f.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_round17f.log")"
  grep -v "__recompiles" "$OUT/bench_round17f.log" | grep "s/forward\|Error\|error\|quantized" | tail -8 ;;
video14)  # next: the fp8_cudnn video's projection checked against a measured 5-step video
  timeout 300 python3 -m wanexp.bench bench=video_a14b bench.name=video_a14b_round14 bench.out_dir="$OUT" \
    "bench.whole_video.precisions=[w4a4+attn_fp8_cudnn]" "bench.whole_video.check=[w4a4+attn_fp8_cudnn]" > "$OUT/bench_video.log" 2>&1
  grep -v "__recompiles" "$OUT/bench_video.log" | grep "video\|Error\|error\|Killed" | tail -8 ;;
video)  # the whole video at the papers' setting, BF16 and W4A4 (FP8 path), compiled (bench_conf/bench/video_a14b.yaml)
  TORCH_LOGS=recompiles timeout 570 python3 -m wanexp.bench bench=video_a14b bench.out_dir="$OUT" "${@:2}" > "$OUT/bench_video.log" 2>&1
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/bench_video.log")"
  grep -v "__recompiles" "$OUT/bench_video.log" | grep "video\|Error\|error\|Killed" | tail -20 ;;
formats)
  for f in nvfp4 int4 hif4; do
    timeout 170 python3 -m wanexp.bench bench=fp8_a14b bench.name=bench_$f bench.quant.format=$f \
      "bench.paths=[bf16,bf16_compiled,fused,fused_compiled]" \
      "bench.resolutions=[{name: 720p, height: 720, width: 1280, frames: 61}]" bench.out_dir="$OUT" 2>&1 | tail -12
  done ;;
esac
