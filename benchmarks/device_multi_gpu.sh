#!/usr/bin/env bash
# Multi-GPU device calls (H200 x4). Stages, picked by the arguments (default: tests job):
#   tests     GPU tests (kernels, NCCL vocab-parallel, Megatron and DeepSpeed parity), main job
#   vp        benchmarks/bench_vocab_parallel.py at tp = 4, 2, 1 (ours and Megatron's CE)
#   steps     Megatron GPT step (TP 2, 4) and DeepSpeed step (original head vs CCE head)
# Carried wheels (.whl/) go to /tmp/site; logs and JSON to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export CCE_DIST_CACHE=/tmp/cce_cache TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi -L; git log --oneline -1 2>/dev/null
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
NGPU=$(nvidia-smi -L | wc -l)
run() { echo "=== $*"; "$@"; echo "=== rc $?"; }
for stage in "${@:-tests}"; do
  case $stage in
    tests)
      run timeout 560 python3 -m pytest -q -m gpu tests -p no:cacheprovider --timeout 240 ${PYTEST_ARGS:-} \
        2>&1 | tee "$OUT/gpu_tests.log" | grep -v -i "warn" | tail -40
      ;;
    mainjob)
      run timeout 300 python3 launch/compare.py --nproc 2 --out "$OUT/main" ${MAIN_ARGS:-} \
        2>&1 | tr '\r' '\n' | grep -v -i warn | tail -25
      ;;
    vp)
      for tp in 4 2 1; do
        [ "$tp" -le "$NGPU" ] || continue
        run timeout 300 torchrun --nproc_per_node=$tp benchmarks/bench_vocab_parallel.py \
          --warmup 3 --iters 10 --json "$OUT/vp_tp$tp.json" ${VP_ARGS:-} 2>&1 | grep -v -i warn
      done
      ;;
    steps)
      for tp in 2 4; do
        [ "$tp" -le "$NGPU" ] || continue
        run timeout 240 torchrun --nproc_per_node=$tp benchmarks/bench_megatron_step.py \
          --json "$OUT/megatron_step_tp$tp.json" 2>&1 | grep -v -i "warn\|deprecat"
      done
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
