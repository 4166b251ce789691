#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/), run the GPU tests, then the benchmark.
# Usage on the GPU machine: bash benchmarks/device_run.sh [bench args...]; logs go to $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
# Ours and torch in one process, the competitors in another (see bench_loss.methods).
python3 benchmarks/bench_loss.py --methods "cce-dist exact,cce-dist,torch eager,torch.compile" \
  --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
if [ "${SKIP_COMPETITORS:-0}" != 1 ]; then
  python3 benchmarks/bench_loss.py --methods "apple CCE,Liger FLCE" \
    --json "$OUT/bench_competitors.json" "$@" 2>&1 | tee "$OUT/bench_competitors.log"
fi
