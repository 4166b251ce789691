#!/usr/bin/env bash
# Megatron-Core's real stack on the GPUs: the stack parity tests (DDP, distributed optimizer,
# main_grad) over NCCL, the fp32 main_grad accumulation against float64, and a GPT step under
# Megatron's DDP + distributed optimizer with Megatron's loss, cce-dist's, and cce-dist's with
# its gradient straight into main_grad (untied and tied).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
run() { echo "=== $*"; "$@"; echo "=== rc $?"; }
python3 -c "import transformer_engine" 2>/dev/null && echo "transformer_engine: yes" || echo "transformer_engine: no"
python3 -c "import fused_weight_gradient_mlp_cuda" 2>/dev/null && echo "apex wgrad: yes" || echo "apex wgrad: no"
run timeout 300 python3 -m pytest -q -m gpu tests/test_megatron_stack.py tests/test_main_grad.py \
  -p no:cacheprovider -s 2>&1 | grep -v -i "warn\|deprecat" | tee "$OUT/megatron_stack_tests.log" | tail -15
NGPU=$(nvidia-smi -L | wc -l)
for tied in "" "--tied"; do
  for kind in native cce cce-main-grad; do
    run timeout 150 torchrun --nproc_per_node=$NGPU benchmarks/bench_megatron_step.py --ddp --dist-opt \
      --hidden ${HIDDEN:-1024} --heads 8 --layers 2 --vocab 128256 --seq 4096 --batch 1 --micro 4 \
      --warmup 2 --iters 6 --kinds $kind $tied --json "$OUT/megatron_ddp_step_${kind}${tied/--/_}.json" \
      2>&1 | grep -v -i "warn\|deprecat" | grep "^{\|rc\|Error\|error" | tail -4
  done
done
