"""benchmarks/bench_trajectory.py's CPU smoke mode: torchrun, 2 ranks over gloo, 3 steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("native", "exact", "default", "entry")


def test_trajectory_smoke_on_cpu(tmp_path):
    out = tmp_path / "trajectory.json"
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), str(ROOT / "benchmarks" / "bench_trajectory.py"),
         "--device", "cpu", "--layers", "1", "--hidden", "64", "--heads", "4",
         "--vocab", "4096", "--seq", "64", "--steps", "3", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["mode"].startswith("CPU STAND-IN")
    assert (result["config"]["tp"], result["config"]["padded_vocab"]) == (2, 4096)
    assert tuple(result["runs"]) == RUNS
    for name, run_result in result["runs"].items():
        assert len(run_result["loss"]) == len(run_result["grad_norm"]) == 3, name
        assert all(math.isfinite(x) for x in run_result["loss"] + run_result["grad_norm"]), name
    native, exact = result["runs"]["native"], result["runs"]["exact"]
    assert abs(native["loss"][0] - exact["loss"][0]) < 1e-3
    assert "max|loss-exact|" in run.stdout  # rank 0's table
