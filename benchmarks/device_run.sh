#!/usr/bin/env bash
# One device call: install the carried wheels (.whl/), run the GPU tests, then the benchmark.
# Usage on the GPU machine: bash benchmarks/device_run.sh [bench args...]; logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
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
