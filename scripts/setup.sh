#!/usr/bin/env bash
# Creates .venv (if missing) and installs cce-dist with everything its tests and demo import.
# Where no NVIDIA GPU is present, torch is the CPU build (pinned: an unpinned torch can pull a
# multi-GB CUDA build) and the Triton kernels run under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_install() { python -m pip install -q --disable-pip-version-check "$@"; }
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==2.13.0"
  fi
fi
# triton 3.9 + numpy 2.4 run the interpreter correctly; GPU hosts keep the triton torch wants.
python -c "import triton" 2>/dev/null || pip_install "triton==3.9.0"
pip_install -e ".[test,megatron,deepspeed]"
# megatron-core 0.19 (the newest; Python >= 3.12 only, so pip will not install it here) is pure
# Python where the integration is concerned: its wheel, unpacked beside the venv, lets the tests
# run the Megatron parity test against it too, in a process of its own.
MCORE_NEW=.cache/megatron-core-0.19.2
if [ ! -d "$MCORE_NEW/megatron" ]; then
  python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 -d .cache/wheels megatron-core==0.19.2
  python -c "import glob, sys, zipfile; zipfile.ZipFile(glob.glob(sys.argv[1])[0]).extractall(sys.argv[2])" \
    ".cache/wheels/megatron_core-0.19.2-*.whl" "$MCORE_NEW"
fi
