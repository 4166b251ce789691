#!/usr/bin/env bash
# Multi-GPU device calls (H200 x4). Stages, picked by the arguments (default: tests job):
#   tests     all GPU tests (kernels, NCCL vocab-parallel, Megatron and DeepSpeed parity)
#   kernels   the single-GPU kernel tests and the NCCL vocab-parallel ones only
#   tune      benchmarks/tune.py --forward-only at a TP=4 shard and the full DESIGN shape
#   mainjob   launch/compare.py with two ranks (the README's main job)
#   vp        benchmarks/bench_vocab_parallel.py at tp = 4, 2, 1 (ours and Megatron's CE; at
#             tp=1 also the kernels' time on each of 4 shards)
#   megatron  Megatron GPT step (TP 2, 4), native loss vs CCEGPTModel
#   deepspeed DeepSpeed step, original head vs CCE head
# Carried wheels (.whl/) go to /tmp/site; logs and JSON to $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export CCE_DIST_CACHE=/tmp/cce_cache TORCH_EXTENSIONS_DIR=/tmp/torch_ext
NGPU=$(nvidia-smi -L | wc -l)
run() { echo "=== $*"; "$@"; echo "=== rc $?"; }
for stage in "${@:-tests}"; do
  case $stage in
    tests)
      run timeout 560 python3 -m pytest -q -m gpu tests -p no:cacheprovider --timeout 240 ${PYTEST_ARGS:-} \
        2>&1 | tee "$OUT/gpu_tests.log" | grep -v -i "warn" | tail -40
      ;;
    kernels)
      run timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_vocab_parallel.py \
        -p no:cacheprovider --timeout 200 2>&1 | tee "$OUT/gpu_kernel_tests.log" | tail -15
      ;;
    tune)
      for shape in 8192x4096x32064 8192x4096x128256 8192x2304x64000; do
        run timeout 120 python3 benchmarks/tune.py --forward-only --shape $shape \
          --variants default,fw128,fw256_bd128_s2,fw256_bd64_s4,fw256_bd32_s5,fw128_bd64_s4 2>&1 \
          | grep -v -i warn
      done
      ;;
    mainjob)
      run timeout 300 python3 launch/compare.py --nproc 2 --out "$OUT/main" ${MAIN_ARGS:-} \
        2>&1 | tr '\r' '\n' | grep -v -i warn | tail -25
      ;;
    vp)
      for tp in ${VP_TPS:-4 2 1}; do
        [ "$tp" -le "$NGPU" ] || continue
        extra=""; [ "$tp" = 1 ] && extra="--shard-times 4"
        run timeout 300 torchrun --nproc_per_node=$tp benchmarks/bench_vocab_parallel.py \
          --warmup 3 --iters 10 --json "$OUT/vp_tp$tp.json" $extra ${VP_ARGS:-} 2>&1 \
          | grep -v -i "warn\|evict\|return func"
      done
      ;;
    megatron)
      for tp in 2 4; do
        [ "$tp" -le "$NGPU" ] || continue
        run timeout 240 torchrun --nproc_per_node=$tp benchmarks/bench_megatron_step.py \
          --json "$OUT/megatron_step_tp$tp.json" 2>&1 | grep "^{\|Error"
      done
      ;;
    deepspeed)
      DS="launch/deepspeed_train.py --synthetic --bf16 --zero 1 --steps 8 --warmup 3
          --vocab-size 128256 --d-model 2048 --layers 4 --heads 16 --seq-len 4096 --batch 1"
      for variant in "native 1" "cce 1" "cce 2" "cce 4"; do
        set -- $variant
        [ "$2" -le "$NGPU" ] || continue
        run timeout 180 torchrun --nproc_per_node=$NGPU $DS --loss $1 --tp $2 2>&1 \
          | grep "summary\|Error\|error" | grep -v -i warn
      done
      ;;
  esac
done
