"""Where the time of one forward + backward goes, per kernel, for each engine and filter.

``python benchmarks/profile_engine.py [--shape 8192x4096x128256] [--regime lm]``: on one GPU,
the medians (``triton.testing.do_bench``) of the forward, the backward and the budget filter's
tile verdicts (``keep_tiles``) alone; then, for the gemm engine's forward and backward, how busy
the GPU is between the first kernel's start and the last one's end (idle = launch gaps), the
same work replayed from a CUDA graph (no launches), and the CUDA time per kernel.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton.testing

from cce_dist import linear_cross_entropy
from cce_dist.kernels import filtering, gemm_engine, tiles, triton_backward, triton_forward
from cce_dist.testing import make_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs(args.regime, n, d, v, device="cuda", seed=0)
    cfg = tiles.GPU_CONFIG
    fused = dataclasses.replace(cfg, gemm=False)
    scale = torch.full((n,), 1.0 / n, device="cuda")
    budget = filtering.GradFilter("budget", filtering.default_budget(e.dtype))
    lse, _, tile_max, _ = gemm_engine.forward(e, c, t, 0, cfg)
    bench = (lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median"))
    rows = {
        "forward gemm": lambda: gemm_engine.forward(e, c, t, 0, cfg),
        "forward fused": lambda: triton_forward.forward(e, c, t, 0, fused),
        "keep_tiles (budget)": lambda: filtering.keep_tiles(
            tile_max, lse, cfg.block_n, cfg.block_v, v, v, budget),
        "backward gemm exact": lambda: gemm_engine.backward(
            e, c, t, lse, scale, 0, None, tile_max, cfg),
        "backward gemm budget": lambda: gemm_engine.backward(
            e, c, t, lse, scale, 0, budget, tile_max, cfg),
        # The default where the backward would lend rows: dE made in the forward, dC only after.
        "forward gemm with dE": lambda: gemm_engine.forward(e, c, t, 0, cfg, with_de=True),
        "backward gemm dC only": lambda: gemm_engine.backward(
            e, c, t, lse, scale, 0, budget, tile_max, cfg, want_de=False),
        "backward fused exact": lambda: triton_backward.backward(
            e, c, t, lse, scale, 0, None, tile_max, fused),
    }
    e_leaf, c_leaf = e.detach().requires_grad_(), c.detach().requires_grad_()

    def loss_fwbw():
        e_leaf.grad = c_leaf.grad = None
        linear_cross_entropy(e_leaf, c_leaf, t).backward()

    rows["loss fw+bw (autograd)"] = loss_fwbw
    if args.rows:
        rows = {k: f for k, f in rows.items() if k in args.rows.split(",")}
    for name, f in rows.items():
        print(f"{args.shape} {args.regime:6s} {name:24s} {bench(f):8.2f} ms", flush=True)
    for name in ("forward gemm", "backward gemm budget", "forward gemm with dE",
                 "backward gemm dC only", "loss fw+bw (autograd)"):
        if name not in rows:
            continue
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            rows[name]()  # warm the allocator's pool on the capture stream
            with torch.cuda.graph(graph, stream=side):
                rows[name]()
        torch.cuda.current_stream().wait_stream(side)
        print(f"{args.shape} {args.regime:6s} {name:24s} {bench(graph.replay):8.2f} ms "
              "replayed from a CUDA graph", flush=True)
        del graph
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            rows[name]()
            torch.cuda.synchronize()
        spans = sorted((k.time_range.start, k.time_range.end) for k in prof.events()
                       if k.device_type == torch.autograd.DeviceType.CUDA)
        busy, reach = 0.0, spans[0][0]
        for lo, hi in spans:  # union of the kernels' intervals
            busy += max(0.0, hi - max(lo, reach))
            reach = max(reach, hi)
        span = reach - spans[0][0]
        print(f"--- {name}: GPU busy {busy / 1e3:.2f} of {span / 1e3:.2f} ms "
              f"({100 * busy / span:.0f}%)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
