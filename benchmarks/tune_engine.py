"""Launch settings of the gemm engine's element-wise kernels, on one chunk of real logits.

``python benchmarks/tune_engine.py [--n 8192] [--chunk 2048]``: medians per variant, with the
bandwidth each reaches (bytes it must move / time) next to torch's own fp32 -> bf16 copy.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.testing

from cce_dist.kernels import gemm_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=2048)
    args = p.parse_args()
    n, vc = args.n, args.chunk
    v = 16 * vc
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn((n, vc), device="cuda", generator=g) * 3
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    lse = torch.logsumexp(logits, 1) + 2.0
    scale = torch.full((n,), 1.0 / n, device="cuda")
    dl = torch.empty((n, vc), device="cuda", dtype=torch.bfloat16)
    bench = (lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median"))
    gb = n * vc * 4 / 1e9
    ms = bench(lambda: dl.copy_(logits))
    print(f"torch fp32->bf16 copy          {ms * 1e3:7.1f} us  {gb * 1.5 / ms:6.2f} TB/s")
    for bn, bv in ((64, 128), (32, 128), (64, 64), (16, 128)):
        for warps in (2, 4, 8, 16):
            for cols in (128, 512, 2048):
                stats = torch.empty((2, triton.cdiv(vc, cols), n), device="cuda")
                tm = torch.empty((triton.cdiv(n, bn), triton.cdiv(v, bv)), device="cuda")
                f = (lambda: gemm_engine._chunk_stats_kernel[(triton.cdiv(n, bn),
                                                              triton.cdiv(vc, cols))](
                    logits, t, stats[0], stats[1], stats[1], tm, n, v, vc, 0, 0, tm.shape[1], 1,
                    BLOCK_N=bn, BLOCK_V=bv, COLS=cols, SUM_LOGITS=False, num_warps=warps))
                ms = bench(f)
                print(f"stats   bn {bn:3d} bv {bv:3d} w {warps:2d} cols {cols:5d} "
                      f"{ms * 1e3:7.1f} us  {gb / ms:6.2f} TB/s", flush=True)
            kp = torch.ones((triton.cdiv(n, bn), triton.cdiv(v, bv)), device="cuda",
                            dtype=torch.int8)
            for filt in (False, True):
                f = (lambda: gemm_engine._chunk_dlogits_kernel[(triton.cdiv(n, bn),
                                                                triton.cdiv(vc, bv))](
                    logits, dl, t, lse, scale, kp, n, v, vc, 0, 0, kp.shape[1], 1.0,
                    BLOCK_N=bn, BLOCK_V=bv, FILTER=filt, PRECISION="tf32", num_warps=warps))
                ms = bench(f)
                print(f"dlogits bn {bn:3d} bv {bv:3d} w {warps:2d} filter {int(filt)}    "
                      f"{ms * 1e3:7.1f} us  {gb * 1.5 / ms:6.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
