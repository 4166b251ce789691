"""Speed, memory and accuracy of per-token logprobs + entropy (RL), against materialized logits.

``python benchmarks/bench_logprobs.py [--shape 8192x4096x128256] [--regime lm] [--json F]``: on
one GPU, ``cce_dist.linear_logprobs_entropy`` (default filter and exact) against eager PyTorch
and torch.compile of ``log_softmax(e @ c.T)`` gathered at the targets plus its entropy. fw+bw
backpropagates random upstream gradients of both outputs. Times are medians of
``triton.testing.do_bench``; ``peak`` is the largest extra allocation during fw+bw (dE and dC
included); errors are relative L2 against an fp32 computation on the same inputs.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from cce_dist import linear_logprobs_entropy
from cce_dist.testing import make_inputs
from bench_memory import peak_extra_mb  # beside this script


def materialized(e, c, t):
    logp = torch.log_softmax((e @ c.T).float(), dim=-1)
    return logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--json", default="")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs(args.regime, n, d, v, device="cuda", seed=0)
    e.requires_grad_(), c.requires_grad_()
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(n, device="cuda", generator=g)
    b = torch.randn(n, device="cuda", generator=g) * 0.1
    torch.backends.cuda.matmul.allow_tf32 = False
    e32, c32 = e.detach().float().requires_grad_(), c.detach().float().requires_grad_()
    ref = materialized(e32, c32, t)
    ref_grads = torch.autograd.grad((ref[0] * a).sum() + (ref[1] * b).sum(), (e32, c32))
    ref = [x.detach() for x in ref]
    del e32, c32
    torch.cuda.empty_cache()
    rel = (lambda x, y: float((x.float() - y).norm() / y.norm()))
    methods = {
        "cce-dist": lambda: linear_logprobs_entropy(e, c, t),
        "cce-dist exact": lambda: linear_logprobs_entropy(e, c, t, filter_eps=None),
        "torch eager": lambda: materialized(e, c, t),
        "torch.compile": (lambda f: (lambda: f(e, c, t)))(torch.compile(materialized)),
    }
    rows = []
    print(f"{'method':>15} {'fw ms':>7} {'fw+bw':>7} {'peak MB':>8} {'logp err':>9} "
          f"{'H err':>8} {'dE err':>8} {'dC err':>8}")
    for name, fw in methods.items():
        def fw_bw():
            lp, ent = fw()
            return torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (e, c))

        lp, ent = fw()
        de, dc = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (e, c))
        r = {"method": name, "logp_err": rel(lp.detach(), ref[0]),
             "entropy_err": rel(ent.detach(), ref[1]), "de_err": rel(de, ref_grads[0]),
             "dc_err": rel(dc, ref_grads[1])}
        del lp, ent, de, dc
        r["fw_ms"] = triton.testing.do_bench(fw, warmup=100, rep=500, return_mode="median")
        r["fwbw_ms"] = triton.testing.do_bench(fw_bw, warmup=100, rep=500, return_mode="median")
        r["peak_mb"] = peak_extra_mb(fw_bw)
        r.update(shape=args.shape, regime=args.regime)
        rows.append(r)
        print(f"{name:>15} {r['fw_ms']:7.2f} {r['fwbw_ms']:7.2f} {r['peak_mb']:8.0f} "
              f"{r['logp_err']:9.1e} {r['entropy_err']:8.1e} {r['de_err']:8.1e} "
              f"{r['dc_err']:8.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
