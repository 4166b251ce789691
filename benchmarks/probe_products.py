"""What the engine's cuBLAS products and launch gaps cost, measured apart.

``python benchmarks/probe_products.py [--shape 8192x4096x128256]`` on one GPU: each product the
gemm engine runs per chunk (logits with an fp32 or 16-bit result, in either orientation; dE's
fp32 accumulation; dC's 16-bit product), at several chunk heights, in TFLOP/s; then one default
fw+bw under the profiler, with every gap of more than 5 us between kernels and the kernels on
either side of it.
"""

from __future__ import annotations

import argparse
import collections

import torch
import triton.testing

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs


def bench(f) -> float:
    return triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--chunks", default="2048,4096,8192")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs("lm", n, d, v, device="cuda", seed=0)
    for vc in map(int, args.chunks.split(",")):
        rows = c[:vc]
        flop = 2 * n * d * vc
        out32 = torch.empty((n, vc), dtype=torch.float32, device="cuda")
        out16 = torch.empty((n, vc), dtype=e.dtype, device="cuda")
        out32t = torch.empty((vc, n), dtype=torch.float32, device="cuda")
        p16 = torch.randn((n, vc), device="cuda").to(e.dtype)
        acc = torch.zeros((n, d), dtype=torch.float32, device="cuda")
        dc = torch.empty((vc, d), dtype=e.dtype, device="cuda")
        strided = torch.empty((n, 2 * vc), dtype=e.dtype, device="cuda")[:, :vc]
        strided.copy_(p16)
        cases = {
            "logits fp32 out  e @ c.T": lambda: torch.mm(e, rows.t(), out_dtype=torch.float32,
                                                          out=out32),
            "logits 16b out   e @ c.T": lambda: torch.mm(e, rows.t(), out=out16),
            "logits fp32 out  c @ e.T": lambda: torch.mm(rows, e.t(), out_dtype=torch.float32,
                                                          out=out32t),
            "dE  acc += p @ c (fp32)": lambda: torch.addmm(acc, p16, rows, out_dtype=torch.float32,
                                                            out=acc),
            "dC  dl.T @ e (16b)": lambda: torch.mm(p16.t(), e, out=dc),
            "dC  dl.T @ e, dl row stride 2vc": lambda: torch.mm(strided.t(), e, out=dc),
        }
        for name, f in cases.items():
            ms = bench(f)
            print(f"chunk {vc:5d} {name:34s} {ms * 1e3:8.1f} us {flop / ms / 1e9:7.0f} TFLOP/s",
                  flush=True)
        ms = bench(lambda: out32.copy_(out32))
        print(f"chunk {vc:5d} {'copy of the fp32 logits (r+w)':34s} {ms * 1e3:8.1f} us "
              f"{2 * out32.numel() * 4 / ms / 1e9:7.0f} GB/s", flush=True)
        cases.clear()
        torch.cuda.empty_cache()

    e_leaf, c_leaf = e.detach().requires_grad_(), c.detach().requires_grad_()

    def fwbw():
        e_leaf.grad = c_leaf.grad = None
        linear_cross_entropy(e_leaf, c_leaf, t).backward()

    print(f"loss fw+bw {bench(fwbw):.2f} ms", flush=True)
    fwbw()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwbw()
        torch.cuda.synchronize()
    kernels = sorted(((k.time_range.start, k.time_range.end, k.name) for k in prof.events()
                      if k.device_type == torch.autograd.DeviceType.CUDA))
    gaps, by_pair = [], collections.Counter()
    reach, last = kernels[0][1], kernels[0][2]
    for lo, hi, name in kernels[1:]:
        if lo - reach > 5:
            gaps.append((lo - reach, last[:50], name[:50]))
            by_pair[(last[:40], name[:40])] += lo - reach
        if hi > reach:
            reach, last = hi, name
    span = reach - kernels[0][0]
    total = sum(g for g, _, _ in gaps)
    print(f"span {span / 1e3:.2f} ms, gaps > 5 us: {len(gaps)} summing {total / 1e3:.2f} ms")
    for (a, b), us in by_pair.most_common(12):
        print(f"  {us:8.0f} us  after {a!r:44s} before {b!r}")
    t0 = kernels[0][0]
    print("largest gaps (start ms, us, after, before):")
    starts = {}
    reach = kernels[0][1]
    for lo, hi, name in kernels[1:]:
        if lo - reach > 5:
            starts[(lo - reach, name[:50])] = (reach - t0) / 1e3
        reach = max(reach, hi)
    for g, a, b in sorted(gaps, reverse=True)[:15]:
        print(f"  at {starts.get((g, b), -1):7.2f} ms {g:7.0f} us  {a!r} -> {b!r}")


if __name__ == "__main__":
    main()
