"""The options of launch/train.py and their checks, without torch: launch/compare.py (and so
``scripts/train.sh``) shows them in its ``--help`` and validates them before torchrun starts,
even before the set-up has installed torch."""

from __future__ import annotations

import argparse

from corpus import corpus_files

LOSSES = ("cce", "materialized")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description printed as written; each option's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def add_train_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                      loss: bool = True, out: bool = True) -> None:
    """launch/train.py's options on ``p`` (``loss=False``/``out=False`` leave out ``--loss`` /
    ``--out``: compare.py runs both losses and owns ``--out``)."""
    if loss:
        p.add_argument("--loss", choices=LOSSES, default="cce", help="the output-layer loss")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="BPE vocabulary (tokenizer trained on the data, cached)")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    p.add_argument("--data", nargs="*", default=[], help="text files or folders (default: the "
                   "Python standard library's sources)")
    if out:
        p.add_argument("--out", default="out", help="metrics and checkpoints go here")
    p.add_argument("--ckpt-every", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint under --out")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a collective may wait for a lost rank")


def check_args(args: argparse.Namespace, world: int) -> None:
    """Clear errors before any work starts."""
    if args.vocab_size < world:
        raise SystemExit(f"--vocab-size ({args.vocab_size}) must be at least the number of "
                         f"ranks ({world}): every rank owns part of the vocabulary")
    if args.vocab_size < 300:
        raise SystemExit(f"--vocab-size must be at least 300 (byte alphabet), got {args.vocab_size}")
    for name in ("steps", "d_model", "layers", "heads", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.heads:
        raise SystemExit(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    if args.seq_len < 2:
        raise SystemExit("--seq-len must be >= 2")
    try:
        corpus_files(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err))
