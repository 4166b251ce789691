"""Speed, memory and accuracy of per-token logprobs + entropy (RL), against materialized logits.

``python benchmarks/bench_logprobs.py [--shape 8192x4096x128256] [--regime lm] [--json F]``: on
one GPU, ``cce_dist.linear_logprobs_entropy`` (default filter and exact) against eager PyTorch
and torch.compile of ``log_softmax(e @ c.T)`` gathered at the targets plus its entropy.

``torchrun --nproc_per_node=TP benchmarks/bench_logprobs.py``: vocabulary-parallel, each rank
holding all N tokens and its V/TP rows of C (``cce_dist.vocab_range``). Ours runs with
``group=``; the materialized comparator computes the local logits in fp32 and combines the
max, the sum of exponentials, the target logit and the softmax-weighted logit sum with
all-reduces (identity backward, Megatron's reduce-from-region), then all-reduces dE (what a
column-parallel head's backward does). ``--device cpu`` runs the same over gloo at small shapes
(a check of the comparator and of the plumbing, not a timing).

fw+bw backpropagates random upstream gradients of both outputs. Times are medians
(``triton.testing.do_bench`` on one GPU; a fixed number of iterations with CUDA events under
torchrun, so that every rank runs the same collectives); ``peak`` is the largest extra
allocation during fw+bw (dE and dC included); errors are relative L2 against an fp32
computation on the same inputs (dC: this rank's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import triton.testing

from bench_memory import peak_extra_mb  # beside this script
from cce_dist import linear_logprobs_entropy, vocab_range
from cce_dist.testing import make_inputs


def materialized(e, c, t):
    logp = torch.log_softmax((e @ c.T).float(), dim=-1)
    return logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward: every rank then uses the
    same total, so each rank's share gets the upstream gradient once."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def materialized_vocab_parallel(e, c, t, lo, group):
    """Logprobs and entropy from this rank's materialized fp32 logits (N, V/TP) and four
    all-reduces (the max, the sum of exponentials, the target logit, the exponential-weighted
    logit sum); dE is this rank's share (the caller all-reduces it)."""
    z = (e @ c.T).float()
    top = z.detach().amax(dim=1)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # Every global quantity is a function of sums of purely local terms (the max is a
    # constant shift): then each rank's share of the gradient is its local terms' own.
    ez = torch.exp(z - top[:, None])
    total = _SumOverRanks.apply(ez.sum(1), group)
    lse = torch.log(total) + top
    local = t - lo
    owned = (local >= 0) & (local < c.shape[0])
    z_t = z.gather(1, local.clamp(0, c.shape[0] - 1)[:, None])[:, 0] * owned
    logp = _SumOverRanks.apply(z_t, group) - lse
    entropy = lse - _SumOverRanks.apply((ez * z).sum(1), group) / total
    return logp, entropy


def time_fixed(fn, device: str, warmup: int = 5, iters: int = 20) -> float:
    """Median ms of ``fn`` over a fixed number of calls (the same on every rank)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = args.device
    world = int(os.environ.get("WORLD_SIZE", 1))
    group, rank = None, 0
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        group, rank = dist.group.WORLD, dist.get_rank()
    n, d, v = map(int, args.shape.split("x"))
    e, c_full, t = make_inputs(args.regime, n, d, v, device=device, seed=0)
    lo, hi = vocab_range(v, rank, world)
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, device=device, generator=g)
    b = torch.randn(n, device=device, generator=g) * 0.1
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    e32, c32 = e.detach().float().requires_grad_(), c_full.detach().float().requires_grad_()
    ref = materialized(e32, c32, t)
    ref_de, ref_dc = torch.autograd.grad((ref[0] * a).sum() + (ref[1] * b).sum(), (e32, c32))
    ref, ref_dc = [x.detach() for x in ref], ref_dc[lo:hi]
    del e32, c32
    c = c_full[lo:hi].clone().requires_grad_()
    del c_full
    e.requires_grad_()
    if device == "cuda":
        torch.cuda.empty_cache()
    rel = (lambda x, y: float((x.float() - y).norm() / y.norm()))
    if world == 1:
        methods = {
            "cce-dist": lambda: linear_logprobs_entropy(e, c, t),
            "cce-dist exact": lambda: linear_logprobs_entropy(e, c, t, filter_eps=None),
            "torch eager": lambda: materialized(e, c, t),
        }
        if device == "cuda":
            methods["torch.compile"] = (lambda f: (lambda: f(e, c, t)))(
                torch.compile(materialized))
    else:
        methods = {
            "cce-dist": lambda: linear_logprobs_entropy(e, c, t, vocab_start=lo, group=group),
            "cce-dist exact": lambda: linear_logprobs_entropy(e, c, t, vocab_start=lo,
                                                              group=group, filter_eps=None),
            "materialized": lambda: materialized_vocab_parallel(e, c, t, lo, group),
        }
    rows = []
    if rank == 0:
        print(f"{'method':>15} {'tp':>3} {'fw ms':>7} {'fw+bw':>7} {'peak MB':>8} "
              f"{'logp err':>9} {'H err':>8} {'dE err':>8} {'dC err':>8}")
    for name, fw in methods.items():
        def fw_bw(fw=fw, name=name):
            lp, ent = fw()
            de, dc = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (e, c))
            if name == "materialized":  # the column-parallel head's dE reduction
                dist.all_reduce(de, group=group)
            return de, dc

        lp, ent = fw()
        de, dc = fw_bw()
        r = {"method": name, "tp": world, "logp_err": rel(lp.detach(), ref[0]),
             "entropy_err": rel(ent.detach(), ref[1]), "de_err": rel(de, ref_de),
             "dc_err": rel(dc, ref_dc)}
        del lp, ent, de, dc
        if world == 1 and device == "cuda":
            bench = (lambda f: triton.testing.do_bench(f, warmup=100, rep=500,
                                                       return_mode="median"))
        else:
            bench = (lambda f: time_fixed(f, device))
        r["fw_ms"], r["fwbw_ms"] = bench(fw), bench(fw_bw)
        if device == "cuda":
            r["peak_mb"] = peak_extra_mb(fw_bw)
        r.update(shape=args.shape, regime=args.regime)
        rows.append(r)
        if rank == 0:
            print(f"{name:>15} {world:3d} {r['fw_ms']:7.2f} {r['fwbw_ms']:7.2f} "
                  f"{r.get('peak_mb', float('nan')):8.0f} {r['logp_err']:9.1e} "
                  f"{r['entropy_err']:8.1e} {r['de_err']:8.1e} {r['dc_err']:8.1e}", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
