"""Demonstration: cce-dist's loss next to the standard one, with time and peak memory.

On a GPU it uses the Triton kernels; on a CPU the chunked PyTorch path. Each method runs in a
fresh process so that its peak memory (GPU allocator peak, or the process's peak RSS on a CPU)
is its own. Usage: ``python launch/demo.py [--n 4096 --d 512 --v 50000 --regime lm]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cce_dist import linear_cross_entropy
from cce_dist.testing import REGIMES, make_inputs

METHODS = ("standard", "cce-dist")


def _loss(method: str, e, c, t):
    if method == "standard":
        return F.cross_entropy((e @ c.T).float(), t)
    return linear_cross_entropy(e, c, t)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    e, c, t = make_inputs(args.regime, args.n, args.d, args.v, dtype=dtype, device=device)
    e.requires_grad_(), c.requires_grad_()
    _loss(args.method, e[:8], c, t[:8]).backward()  # warm-up (kernel compilation)
    e.grad = c.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_mb()
    start = time.perf_counter()
    loss = _loss(args.method, e, c, t)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _peak_rss_mb() - base
    return {"method": args.method, "device": device, "loss": float(loss), "seconds": seconds,
            "peak_mb": peak, "grad_e_norm": float(e.grad.float().norm()),
            "grad_c_norm": float(c.grad.float().norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--d", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=50000, help="vocabulary size")
    p.add_argument("--regime", choices=REGIMES, default="lm")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--n", str(args.n),
               "--d", str(args.d), "--v", str(args.v), "--regime", args.regime]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    logits_mb = args.n * args.v * 4 / 2**20
    print(f"N={args.n} D={args.d} V={args.v} regime={args.regime} on {rows[0]['device']} "
          f"(the fp32 logits alone would be {logits_mb:.0f} MB)")
    print(f"{'method':>10} {'loss':>10} {'fw+bw s':>8} {'peak MB':>8} {'|dE|':>9} {'|dC|':>9}")
    for r in rows:
        print(f"{r['method']:>10} {r['loss']:10.5f} {r['seconds']:8.3f} {r['peak_mb']:8.0f} "
              f"{r['grad_e_norm']:9.5f} {r['grad_c_norm']:9.5f}")


if __name__ == "__main__":
    main()
