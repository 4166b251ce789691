"""The Hopper-only kernels compiled for sm_90 on any machine: triton lowers them to PTX and runs
its own ptxas without a GPU. Every variant the engine launches (the fused forward, the
backward's dl kernel, the repair from recomputed logits; the tiles of ``GPU_CONFIG``) compiles
and fits in an H100 / H200's shared memory. A compiler failure found here costs no GPU time
(one variant of the fused forward once failed in triton 3.6's loop flattening)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_registers.py"),
                          "--check"], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line[:4] in ("  ok", "FAIL")]
    assert run.returncode == 0 and len(lines) == 10, run.stdout + run.stderr[-3000:]
    assert all(line.startswith("  ok") for line in lines), run.stdout
