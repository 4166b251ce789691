"""The training job end to end: torchrun over gloo, two ranks, on the CPU."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
SMALL = ["--vocab-size", "600", "--d-model", "32", "--layers", "1", "--heads", "2",
         "--seq-len", "16", "--batch", "4",
         "--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json")]


def _env(tmp_path):
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the job uses the CPU path, not the interpreter
    return env


def _torchrun(tmp_path, *args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), TRAIN, *args]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
                          **kw)


def test_compare_two_ranks_end_to_end(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "compare.py"), "--out", str(out), "--steps", "8",
         *SMALL], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "largest gap between the curves" in run.stdout
    result = json.loads((out / "comparison.json").read_text())
    assert result["steps"] == 8 and result["runs"]["cce"]["world"] == 2
    assert result["max_gap"] < 1e-3, result["max_gap"]  # same model, same data: same curve
    first, last = result["runs"]["cce"]["losses"][0], result["runs"]["cce"]["losses"][-1]
    assert last < first  # it learns
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _torchrun(tmp_path, "--steps", "6", "--out", str(whole), *SMALL).returncode == 0
    first = _torchrun(tmp_path, "--steps", "3", "--ckpt-every", "3", "--out", str(parts), *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (parts / "ckpt" / "cce" / "step_000003" / "COMPLETE").exists()
    assert (parts / "ckpt" / "cce" / "step_000003" / "rank1.pt").exists()
    second = _torchrun(tmp_path, "--steps", "6", "--resume", "--out", str(parts), *SMALL)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    want = json.loads((whole / "metrics_cce.json").read_text())["losses"]
    got = json.loads((parts / "metrics_cce.json").read_text())["losses"]
    assert got == want


def test_two_node_rendezvous_on_localhost(tmp_path):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cce-test", TRAIN,
               "--steps", "2", "--out", str(tmp_path / f"node{node}"), *SMALL]
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    metrics = [tmp_path / f"node{n}" / "metrics_cce.json" for n in range(2)]
    written = [json.loads(m.read_text()) for m in metrics if m.exists()]
    assert len(written) == 1 and written[0]["world"] == 2  # one global rank 0, two ranks


def test_a_killed_rank_stops_the_job(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), TRAIN, "--steps", "100000", "--out", str(out),
           "--timeout", "30", *SMALL]
    job = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    pid_file = out / "pids" / "cce_rank1"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert pid_file.exists(), "the job never started"
    time.sleep(3)  # let it train a little
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output = job.communicate(timeout=120)[0]  # a hang fails here
    assert job.returncode != 0
    assert "train.py FAILED" in output or "lost contact" in output, output[-3000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--vocab-size", "1"], "must be at least the number of ranks"),
        (["--data", "/no/such/path"], "does not exist"),
        (["--d-model", "30", "--heads", "4"], "divisible by --heads"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, TRAIN, "--out", str(out), *args],
                         env=dict(_env(tmp_path), WORLD_SIZE="2"), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert not out.exists()  # nothing started
