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
#   twogpu    what two GPUs show that one cannot (each call at most 10 minutes, so two):
#             `twogpu` = the NCCL tests of the vocabulary-parallel op, Megatron's stack,
#             main_grad and DeepSpeed (AutoTP included), and the tp=2 loss against Megatron's
#             CE and DeepSpeed's fused loss; `twogpu2` = logprobs + entropy at tp=2, Megatron's
#             DDP step at TP=2 with and without main_grad, and the training curve at TP=2 from
#             initialization (random tokens)
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
    twogpu)
      run timeout 330 python3 -m pytest -q -m gpu tests/test_vocab_parallel.py \
        tests/test_megatron_stack.py tests/test_main_grad.py tests/test_deepspeed.py \
        tests/test_megatron.py -p no:cacheprovider --timeout 240 -rs 2>&1 \
        | tee "$OUT/nccl_tests.log" | grep -v -i warn | tail -15
      run timeout 230 torchrun --nproc_per_node=2 benchmarks/bench_vocab_parallel.py \
        --shapes 8192x4096x128256,8192x2304x256000 --regimes lm,dense --warmup 3 --iters 10 \
        --json "$OUT/vp_tp2.json" 2>&1 | grep -v -i "warn\|evict\|return func"
      ;;
    twogpu2)
      run timeout 150 torchrun --nproc_per_node=2 benchmarks/bench_logprobs.py \
        --json "$OUT/logprobs_tp2.json" 2>&1 | grep -v -i "warn\|return func"
      run timeout 200 torchrun --nproc_per_node=2 benchmarks/bench_megatron_step.py --ddp \
        --dist-opt --hidden 1024 --heads 8 --layers 2 --vocab 128256 --seq 4096 --batch 1 \
        --micro 4 --json "$OUT/megatron_ddp_tp2.json" 2>&1 | grep "^{\|Error"
      run timeout 230 torchrun --nproc_per_node=2 benchmarks/bench_trajectory.py --data random \
        --steps 40 --runs native exact default --json "$OUT/trajectory_tp2.json" \
        --plot "$OUT/trajectory_tp2.png" 2>&1 | grep -v -i "warn\|deprecat\|full_param" | tail -12
      ;;
  esac
done
