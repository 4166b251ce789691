"""Train a small GPT whose output layer is sharded over the ranks; one loss per run.

torchrun entry point (one process, several on one node, or several nodes):

    torchrun --nproc-per-node 2 launch/train.py --loss cce --steps 200

With no GPU it runs over gloo on the CPU; with GPUs over NCCL, one rank per GPU. Rank 0 shows a
progress line and writes ``<out>/metrics_<loss>.json`` (per-step losses, throughput, peak
memory). Every ``--ckpt-every`` steps each rank saves its own state, with its own vocabulary
shard, under ``<out>/ckpt/<loss>/step_N/``; ``--resume`` continues from the newest complete one.
``launch/compare.py`` runs both losses and compares them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_cleanly, token_windows  # noqa: E402
from model import ShardedHeadGPT  # noqa: E402
from options import HelpFormatter, add_train_options, check_args  # noqa: E402
from tokenizer import corpus_token_ids  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_train_options(p)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_tokens(args) -> torch.Tensor:
    ids = corpus_token_ids(args.data, args.vocab_size)
    if ids.numel() <= args.seq_len + 1:
        raise SystemExit(f"--data holds {ids.numel()} tokens, fewer than --seq-len + 2")
    return ids


def batch(tokens: torch.Tensor, step: int, args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of (seed, step) only, so a resumed run sees the same."""
    chunk = token_windows(tokens, args.batch, args.seq_len + 1, args.seed * 1_000_003 + step)
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def ckpt_root(args) -> Path:
    return Path(args.out) / "ckpt" / args.loss


def save_checkpoint(args, step, model, opt, losses, rank, world) -> None:
    d = ckpt_root(args) / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "losses": losses, "world": world, "vocab_size": args.vocab_size},
               d / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (d / "COMPLETE").touch()  # written once every rank's file is on disk


def latest_checkpoint(args) -> Path | None:
    root = ckpt_root(args)
    done = sorted(p.parent for p in root.glob("step_*/COMPLETE")) if root.exists() else []
    return done[-1] if done else None


def progress(args, done, first, loss, tokens_per_step, start, device) -> None:
    """A progress bar redrawn in place on a terminal; every 5% of the run as lines otherwise."""
    tty = sys.stderr.isatty()
    if not tty and done % max(1, args.steps // 20) and done != args.steps:
        return
    rate = (done - first) * tokens_per_step / max(time.perf_counter() - start, 1e-9)
    bar = "#" * (30 * done // args.steps)
    line = (f"[{bar:<30}] {args.loss:>12} step {done}/{args.steps} loss {loss:.4f} "
            f"{rate:,.0f} tok/s mem {memory_mb(device):,.0f} MB")
    end = ("\n" if done == args.steps else "") if tty else "\n"
    print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def main(argv=None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_args(args, world)
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29512"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        run(args, rank, world, device)
    except (RuntimeError, dist.DistBackendError) as err:
        if "Connection" in str(err) or "timed out" in str(err).lower() or "closed" in str(err):
            log(f"cce-dist train: rank {rank} lost contact with another rank (it died or was "
                f"killed): {str(err).splitlines()[0]}; stopping")
            os._exit(1)
        raise
    dist.barrier()
    dist.destroy_process_group()
    exit_cleanly()


def run(args, rank: int, world: int, device: torch.device) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pids").mkdir(exist_ok=True)
    (out / "pids" / f"{args.loss}_rank{rank}").write_text(str(os.getpid()))
    tokens = load_tokens(args)
    torch.manual_seed(args.seed)
    model = ShardedHeadGPT(args.vocab_size, args.d_model, args.layers, args.heads, args.seq_len,
                           dist.group.WORLD).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses: list[float] = []
    first = 0
    if args.resume and (ckpt := latest_checkpoint(args)) is not None:
        state = torch.load(ckpt / f"rank{rank}.pt", map_location=device)
        if state["world"] != world or state["vocab_size"] != args.vocab_size:
            raise SystemExit(f"--resume: {ckpt} was written by {state['world']} ranks with "
                             f"vocabulary {state['vocab_size']}; this run has {world} and "
                             f"{args.vocab_size}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        losses, first = state["losses"], state["step"]
        if rank == 0:
            log(f"resumed from {ckpt}")
    tokens_per_step = args.batch * args.seq_len
    # Throughput leaves out the first steps: they compile the Triton kernels (seconds on a GPU).
    warm = min(3, (args.steps - first) // 4)
    start, timed_from = time.perf_counter(), first
    loss_peak_mb = None
    for step in range(first, args.steps):
        if step == first + warm and warm:
            sync(device)
            start, timed_from = time.perf_counter(), step
        x, y = batch(tokens, step, args, device)
        measure = device.type == "cuda" and step == first
        if measure:  # the loss's own fw+bw peak, above what the step already holds
            h = model.hidden(x).detach().requires_grad_()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model.head_loss(h, y, args.loss).backward()
            torch.cuda.synchronize()
            loss_peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            del h
            opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y, args.loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        done = step + 1
        if args.ckpt_every and done % args.ckpt_every == 0:
            save_checkpoint(args, done, model, opt, losses, rank, world)
        if rank == 0:
            progress(args, done, timed_from, losses[-1], tokens_per_step, start, device)
    elapsed = time.perf_counter() - start
    if rank == 0:
        metrics = {
            "loss_kind": args.loss, "world": world, "device": device.type, "losses": losses,
            "tokens_per_s": (args.steps - timed_from) * tokens_per_step / max(elapsed, 1e-9),
            "peak_mb": memory_mb(device), "loss_peak_mb": loss_peak_mb,
            "vocab_size": args.vocab_size,
            "memory_kind": "GPU allocator peak" if device.type == "cuda" else "process peak RSS",
        }
        (out / f"metrics_{args.loss}.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
