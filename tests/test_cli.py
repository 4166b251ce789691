"""scripts/train.sh and launch/compare.py's command line: help and argument errors, before any
set-up or training (nothing here trains)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import compare  # noqa: E402  (the standard library only: no torch)


def _checkout_without_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of scripts/ and launch/ whose setup.sh only leaves a marker: the wrapper's work
    before the set-up can be watched without installing anything."""
    shutil.copytree(ROOT / "launch", tmp_path / "launch")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "train.sh", tmp_path / "scripts" / "train.sh")
    marker = tmp_path / "setup_ran"
    (tmp_path / "scripts" / "setup.sh").write_text(f"touch '{marker}'\nexit 97\n")
    return tmp_path / "scripts" / "train.sh", marker


def _train_sh(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("NPROC", None)
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_train_sh_help_lists_every_option_with_its_default_before_setup(tmp_path):
    script, marker = _checkout_without_setup(tmp_path)
    run = _train_sh(script, "--help")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # The wrapper's own text, then compare.py's full description (not cut at its first line).
    assert "NPROC" in out and "scripts/setup.sh" in out
    assert "usage: bash scripts/train.sh" in out
    assert "same seed and data order, then compare: a table and a PNG plot" in out
    assert "--nproc NPROC" in out and "(default: 2)" in out
    for option, default in [("--steps", "200"), ("--vocab-size", "32000"), ("--d-model", "256"),
                            ("--layers", "2"), ("--heads", "4"), ("--seq-len", "128"),
                            ("--batch", "8"), ("--lr", "0.001"), ("--timeout", "120.0")]:
        assert option in out and f"(default: {default})" in out, option
    for option in ("--data", "--ckpt-every", "--resume", "--out", "--seed"):
        assert option in out, option
    assert not marker.exists()  # help came without the set-up


def test_train_sh_mistyped_option_is_argparse_error_before_setup(tmp_path):
    script, marker = _checkout_without_setup(tmp_path)
    run = _train_sh(script, "--steps", "3", "--stpes", "4")
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("usage: bash scripts/train.sh"), run.stderr
    assert lines[-1] == "bash scripts/train.sh: error: unrecognized arguments: --stpes 4"
    assert "Traceback" not in run.stderr
    assert not marker.exists()  # neither the set-up nor torchrun started


def test_train_sh_good_options_pass_the_check_and_reach_setup(tmp_path):
    script, marker = _checkout_without_setup(tmp_path)
    run = _train_sh(script, "--steps", "3", "--vocab-size", "600")
    assert run.returncode == 97 and marker.exists(), run.stderr  # the stub set-up ran


def test_compare_checks_values_before_torchrun(tmp_path):
    out = tmp_path / "out"
    for args, message in [(["--vocab-size", "1"], "must be at least the number of ranks"),
                          (["--data", str(tmp_path / "nothing")], "does not exist"),
                          (["--heads", "0"], "--heads must be >= 1"),
                          (["--loss", "cce"], "unrecognized arguments: --loss cce")]:
        run = subprocess.run([sys.executable, str(ROOT / "launch" / "compare.py"),
                              "--out", str(out), *args],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and message in run.stderr, (args, run.stderr)
        assert not out.exists()


def test_compare_passes_the_given_training_options_on(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b"
    a.write_text("text\n")
    b.mkdir()
    (b / "c.py").write_text("x = 1\n")
    args, train_args = compare.parse_args(
        ["--nproc", "3", "--steps", "5", "--data", str(a), str(b), "--resume", "--lr", "0.01",
         "--out", str(tmp_path / "o")])
    assert args.nproc == 3 and args.out == str(tmp_path / "o")
    assert train_args == ["--steps", "5", "--lr", "0.01", "--data", str(a), str(b), "--resume"]
