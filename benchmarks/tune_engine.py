"""Launch settings and chunk sizes of the gemm engine.

``python benchmarks/tune_engine.py [--shape 8192x4096x128256] [--regime lm]
[--settings 32:512:8,64:512:8:128:128:32]``: for each
``stats_n:cols:warps[:fw_mb[:de_mb[:dc_mb]]]`` (``BlockConfig.gemm_stats_n``,
``gemm_stats_cols``, ``gemm_stats_warps``, then ``gemm_fw_bytes``, ``gemm_de_fw_bytes`` and
``gemm_dc_bytes`` in MB), the medians of the forward alone, of the forward that makes dE and of
the backward that then makes only dC, on one GPU, and the largest difference of their LSE, dE
accumulator and dC from the first setting's (the settings change how work is split, never the
result beyond rounding); then torch.compile's forward (bf16 logits, ``F.cross_entropy``) on the
same inputs, without autograd, for scale.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton.testing

from cce_dist.kernels import filtering, gemm_engine, tiles
from cce_dist.testing import make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--settings", default="32:512:8,16:512:4,32:1024:8,64:512:8,32:256:4")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs(args.regime, n, d, v, device="cuda", seed=0)
    bench = (lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median"))
    first = None
    for setting in args.settings.split(","):
        stats_n, cols, warps, *sizes = map(int, setting.split(":"))
        cfg = replace(tiles.GPU_CONFIG, gemm_stats_n=stats_n, gemm_stats_cols=cols,
                      gemm_stats_warps=warps)
        for field, mb in zip(("gemm_fw_bytes", "gemm_de_fw_bytes", "gemm_dc_bytes"), sizes):
            cfg = replace(cfg, **{field: mb << 20})
        fw = bench(lambda: gemm_engine.forward(e, c, t, 0, cfg))
        fw_de = bench(lambda: gemm_engine.forward(e, c, t, 0, cfg, with_de=True))
        out = gemm_engine.forward(e, c, t, 0, cfg, with_de=True)
        lse, acc, tile_max = out[0], out[4] * torch.exp(out[5] - out[0])[:, None], out[2]
        scale = torch.full((n,), 1.0 / n, device="cuda")
        budget = filtering.GradFilter("budget", filtering.default_budget(e.dtype))
        dc_only = (lambda: gemm_engine.backward(e, c, t, lse, scale, 0, budget, tile_max, cfg,
                                                want_de=False))
        bw = bench(dc_only)
        dc = dc_only()[1].float()
        first = first or (lse, acc, dc)
        diff = max((lse - first[0]).abs().max().item(),
                   ((acc - first[1]).norm() / first[1].norm()).item(),
                   ((dc - first[2]).norm() / first[2].norm()).item())
        print(f"{args.shape} {args.regime} {setting:20s} forward {fw:7.2f} ms  forward with dE"
              f" {fw_de:7.2f} ms  backward dC only {bw:7.2f} ms  sum {fw_de + bw:7.2f}"
              f"  diff {diff:.1e}", flush=True)
    compiled = torch.compile(lambda e, c, t: F.cross_entropy((e @ c.T).float(), t))
    with torch.no_grad():
        print(f"{args.shape} {args.regime} torch.compile forward "
              f"{bench(lambda: compiled(e, c, t)):7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
