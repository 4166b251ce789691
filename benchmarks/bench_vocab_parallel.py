"""Vocabulary-parallel loss: cce-dist against Megatron's CE and DeepSpeed's fused loss.

Launch one process per GPU: ``torchrun --nproc_per_node=TP benchmarks/bench_vocab_parallel.py``.
Every rank holds all N tokens and V/TP rows of C (the even split of ``cce_dist.vocab_range``).
Megatron's path materializes the local logits (N x V/TP, in the input dtype, as GPTModel's
output layer does), calls ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (which
upcasts them to fp32) and all-reduces dE (what its ColumnParallelLinear backward does). At
TP=1 cce-dist runs its single-device path (``group=None``). Variants of ours: without the
overlap of the dE reduction, and with dC's rows lent to the backward's workspace whatever their
share. With DeepSpeed >= 0.19.8 installed, also its ``vocab_parallel_linear_cross_entropy``
(chunked cuBLAS products) and ours under the same signature (``cce-dist drop-in``). Timing uses
a fixed number of iterations on every rank
(so the collectives stay matched), CUDA events, the median of ``--iters``; peak memory is rank
0's largest extra allocation during fw+bw.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from cce_dist import linear_cross_entropy, vocab_range
from cce_dist.kernels import tiles
from cce_dist.parallel import function
from cce_dist.testing import make_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
from bench_memory import peak_extra_mb  # noqa: E402  (beside this script)
from model import CopyToGroup  # noqa: E402  (identity forward, all-reduced gradient)


def megatron_loss(group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss(e, c, t):
        logits = CopyToGroup.apply(e, group) @ c.T
        return vocab_parallel_cross_entropy(logits[None], t[None]).mean()

    return loss


def with_config(**changes):
    """A context in which the GPU kernels use ``GPU_CONFIG`` with ``changes``."""
    return mock.patch.object(tiles, "GPU_CONFIG", dataclasses.replace(tiles.GPU_CONFIG, **changes))


def time_fw_bw(fn, e, c, t, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        torch.autograd.grad(fn(e, c, t), (e, c))
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(e, c, t), (e, c))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = peak_extra_mb(lambda: torch.autograd.grad(fn(e, c, t), (e, c)))
    return statistics.median(times), peak


def shard_times(e, c_full, t, shards: int, iters: int) -> list[float]:
    """ms of the local kernels (forward, then backward with the global LSE) on each of
    ``shards`` even vocabulary shards, one GPU: how evenly the work of a TP group is spread."""
    from cce_dist.kernels import cce_backward, cce_forward

    v = c_full.shape[0]
    lse = cce_forward(e, c_full, t, 0, "triton")[0]
    scale = torch.full_like(lse, 1.0 / lse.numel())
    out = []
    for r in range(shards):
        lo, hi = vocab_range(v, r, shards)
        c = c_full[lo:hi]

        def run():
            _, _, tile_max = cce_forward(e, c, t, lo, "triton")[:3]
            cce_backward(e, c, t, lse, scale, tile_max, lo, 2.0 ** -12, "triton", True)

        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / iters)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x4096x128256,8192x2304x256000")
    p.add_argument("--regimes", default="lm,dense,spread")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default="")
    p.add_argument("--shard-times", type=int, default=0,
                   help="with one process: also time the kernels on each of this many shards")
    args = p.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    ours = group if world > 1 else None
    methods = {  # name -> (loss, context it runs in)
        "cce-dist": (lambda e, c, t: linear_cross_entropy(e, c, t, group=ours), None),
        "cce-dist exact": (lambda e, c, t: linear_cross_entropy(e, c, t, group=ours,
                                                                filter_eps=None), None),
    }
    if world > 1:
        methods["cce-dist no-overlap"] = (
            methods["cce-dist"][0],
            lambda: mock.patch.object(function, "OVERLAP_DE_REDUCTION", False))
    methods["cce-dist lend-all"] = (methods["cce-dist"][0],
                                    lambda: with_config(max_lent_fraction=1.0))
    methods["cce-dist bn128"] = (methods["cce-dist"][0],
                                 lambda: with_config(block_n=128, fw_block_n=128))
    try:
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        methods["Megatron CE"] = (
            megatron_loss(parallel_state.get_tensor_model_parallel_group()), None)
    except ImportError as err:
        if rank == 0:
            print(f"# megatron-core not available: {err}")
    shard = {}  # this rank's [lo, hi) of the current shape, for the drop-in signatures
    try:  # DeepSpeed >= 0.19.8's fused loss (chunked cuBLAS), and ours under its signature
        import deepspeed
        from deepspeed.sequence.linear_cross_entropy import (
            vocab_parallel_linear_cross_entropy as deepspeed_loss,
        )

        deepspeed.init_distributed(dist_backend="nccl")  # its loss asks deepspeed.comm for sizes

        from cce_dist.deepspeed import vocab_parallel_linear_cross_entropy as dropin

        def signature(fn):
            return lambda e, c, t: fn(e, c, t, tp_group=ours, vocab_start_index=shard["lo"],
                                      vocab_end_index=shard["hi"])

        methods["cce-dist drop-in"] = (signature(dropin), None)
        methods["DeepSpeed fused"] = (signature(deepspeed_loss), None)
    except ImportError as err:
        if rank == 0:
            print(f"# DeepSpeed's fused loss not available: {err}")
    rows = []
    for shape in args.shapes.split(","):
        n, d, v = map(int, shape.split("x"))
        lo, hi = vocab_range(v, rank, world)
        shard.update(lo=lo, hi=hi)
        for regime in args.regimes.split(","):
            e, c_full, t = make_inputs(regime, n, d, v, device="cuda", seed=0)
            if args.shard_times and world == 1:
                ms = shard_times(e, c_full, t, args.shard_times, args.iters)
                rows.append(dict(shape=shape, regime=regime, shards=args.shard_times,
                                 shard_ms=ms))
                print(f"{shape:>18} {regime:>7} kernels per shard of {args.shard_times}: "
                      + " ".join(f"{x:.2f}" for x in ms) + " ms", flush=True)
            c = c_full[lo:hi].clone()
            del c_full
            e.requires_grad_(), c.requires_grad_()
            torch.cuda.empty_cache()
            for name, (fn, context) in methods.items():
                with (context or contextlib.nullcontext)():
                    ms, peak = time_fw_bw(fn, e, c, t, args.warmup, args.iters)
                row = dict(shape=shape, regime=regime, tp=world, method=name, fwbw_ms=ms,
                           peak_mb=peak)
                rows.append(row)
                if rank == 0:
                    print(f"{shape:>18} {regime:>7} tp={world} {name:>15} {ms:8.2f} ms "
                          f"{peak:8.0f} MB", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
