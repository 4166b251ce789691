#!/usr/bin/env bash
# One GPU: GPU tests, the kernels under compute-sanitizer, the custom op after importing apple's
# CCE, and the loss benchmark (ours: default, per-entry, exact; torch eager and torch.compile).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
run() { echo "=== $*"; "$@"; echo "=== rc $?"; }
stage=${1:-all}
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  run timeout 400 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_fuzz.py \
    -p no:cacheprovider --timeout 300 2>&1 | tee "$OUT/gpu_tests.log" | grep -v -i warn | tail -25
fi
if [ "$stage" = all ] || [ "$stage" = sanitize ]; then
  run timeout ${SAN_TIMEOUT:-400} compute-sanitizer --tool memcheck --print-limit 20 \
    python3 benchmarks/sanitize_kernels.py 2>&1 | tee "$OUT/sanitizer.log" | grep -v -i warn | tail -15
  run timeout 120 python3 -c "
import cut_cross_entropy, torch
from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs
for i in range(20):
    e, c, t = make_inputs('lm', 4096, 1024, 32000, device='cuda', seed=i)
    e.requires_grad_(), c.requires_grad_()
    linear_cross_entropy(e, c, t).backward()
torch.cuda.synchronize(); print('after importing apple CCE: 20 fw+bw ok')" 2>&1 | tail -5
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  run timeout ${BENCH_TIMEOUT:-500} python3 benchmarks/bench_loss.py \
    --methods "cce-dist,cce-dist entry,cce-dist exact,torch eager,torch.compile" \
    --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
fi
if [ "$stage" = trajectory ]; then
  # Megatron DDP + distributed optimizer from one init: native, exact, default, per-entry.
  for data in ${TRAJ_DATA:-random}; do
    run timeout ${TRAJ_TIMEOUT:-300} torchrun --nproc_per_node=${NGPU:-1} benchmarks/bench_trajectory.py \
      --data $data --steps ${TRAJ_STEPS:-100} --json "$OUT/trajectory_$data.json" \
      --plot "$OUT/trajectory_$data.png" ${TRAJ_ARGS:-} 2>&1 | grep -v -i "warn\|deprecat" | tail -30
  done
fi
