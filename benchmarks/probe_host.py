"""Host time of one default fw+bw against its GPU time: where the Python side spends it.

``python benchmarks/probe_host.py [--shape 8192x4096x128256]`` on one GPU: wall time of the
forward call and of the backward call (no synchronization inside), the GPU time of the pair,
then cProfile's top functions by own time over a few calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs("lm", n, d, v, device="cuda", seed=0)
    e, c = e.requires_grad_(), c.requires_grad_()
    for _ in range(3):
        linear_cross_entropy(e, c, t).backward()
    torch.cuda.synchronize()
    for it in range(5):
        e.grad = c.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # A long kernel first, so that the host's launches queue behind it.
        torch.cuda._sleep(int(2e8))
        start.record()
        t0 = time.perf_counter()
        loss = linear_cross_entropy(e, c, t)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        print(f"iter {it}: host forward {1e3 * (t1 - t0):.2f} ms, backward {1e3 * (t2 - t1):.2f}"
              f" ms; GPU fw+bw behind a queue {start.elapsed_time(end):.2f} ms", flush=True)
    # torch.compile's fw+bw the same way: behind a queue, and back to back (do_bench).
    import torch.nn.functional as F
    import triton.testing

    compiled = torch.compile(lambda e, c, t: F.cross_entropy((e @ c.T).float(), t))

    def both(loss_fn):
        e.grad = c.grad = None
        loss_fn(e, c, t).backward()

    for name, loss_fn in (("torch.compile", compiled), ("cce-dist", linear_cross_entropy)):
        for _ in range(3):
            both(loss_fn)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(2e8))
            start.record()
            both(loss_fn)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        queued = sorted(times)[2]
        steady = triton.testing.do_bench(lambda: both(loss_fn), warmup=50, rep=500,
                                         return_mode="median")
        print(f"{name:14s} fw+bw behind a queue {queued:.2f} ms, back to back (do_bench) "
              f"{steady:.2f} ms", flush=True)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(3):
        e.grad = c.grad = None
        linear_cross_entropy(e, c, t).backward()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
