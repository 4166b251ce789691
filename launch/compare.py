"""The main job: train the same GPT twice, with cce-dist's loss and with the materialized one,
same seed and data order, then compare: a table and a PNG plot of both loss curves.

    python launch/compare.py [--nproc 2] [train.py options, e.g. --steps 200]

Each run is its own ``torchrun --nproc-per-node NPROC launch/train.py --loss ...`` (so each
run's peak memory is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from options import HelpFormatter, add_train_options, check_args  # noqa: E402


def run_training(loss: str, nproc: int, train_args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 500), str(HERE / "train.py"),
           "--loss", loss, "--out", str(out), *train_args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / f"metrics_{loss}.json").read_text())


def compare(runs: dict[str, dict]) -> dict:
    a, b = runs["cce"]["losses"], runs["materialized"]["losses"]
    gaps = [abs(x - y) for x, y in zip(a, b)]
    return {"max_gap": max(gaps), "final_gap": gaps[-1], "steps": len(gaps)}


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("materialized", "-"), ("cce", "--")):
        losses = runs[name]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, style, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"GPT, vocabulary {runs['cce']['vocab_size']:,} sharded over "
                 f"{runs['cce']['world']} ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(the options, the arguments for train.py). Every option is checked here, in this process,
    before any torchrun starts: a mistyped one ends in argparse's usage and error (exit status
    2), a bad value in train.py's own message."""
    p = argparse.ArgumentParser(prog=os.environ.get("CCE_DIST_PROG"), description=__doc__,
                                formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) per run")
    p.add_argument("--out", default="out", help="metrics, comparison.json and the plot go here")
    p.add_argument("--check-args", action="store_true",
                   help="check the options and exit without training")
    group = p.add_argument_group("training options (launch/train.py's, given to both runs)")
    add_train_options(group, loss=False, out=False)
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error("--nproc must be >= 1")
    check_args(args, args.nproc)
    train_args: list[str] = []  # the options that differ from train.py's defaults, as given
    for action in group._group_actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            train_args.append(flag)
        elif isinstance(value, list):
            train_args += [flag, *value]
        else:
            train_args += [flag, str(value)]
    return args, train_args


def main() -> None:
    args, train_args = parse_args()
    if args.check_args:
        return
    out = Path(args.out)
    runs = {loss: run_training(loss, args.nproc, train_args, out)
            for loss in ("cce", "materialized")}
    result = compare(runs)
    plot(runs, out / "loss_curves.png")
    kind = runs["cce"]["memory_kind"]
    loss_mem = runs["cce"].get("loss_peak_mb") is not None
    print(f"\n{'loss':>13} {'final loss':>11} {'tokens/s':>10} {'peak MB':>9}"
          + (f" {'loss MB':>9}" if loss_mem else "") + f"   (peak: {kind}, rank 0)")
    for name in ("cce", "materialized"):
        r = runs[name]
        print(f"{name:>13} {r['losses'][-1]:11.4f} {r['tokens_per_s']:10,.0f} "
              f"{r['peak_mb']:9,.0f}" + (f" {r['loss_peak_mb']:9,.0f}" if loss_mem else ""))
    print(f"largest gap between the curves over {result['steps']} steps: "
          f"{result['max_gap']:.2e} (final {result['final_gap']:.2e})")
    print(f"plot: {out / 'loss_curves.png'}")
    (out / "comparison.json").write_text(json.dumps({**result, "runs": runs}))


if __name__ == "__main__":
    main()
