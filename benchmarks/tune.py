"""Times the CCE kernels under several tile configurations (GPU only).

``python benchmarks/tune.py [--shape 8192x4096x128256] [--regime lm]``: for each BlockConfig
variant, the forward and the backward (exact and default filter), medians of do_bench in ms.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton.testing

from cce_dist.kernels import triton_backward, triton_forward
from cce_dist.kernels.tiles import GPU_CONFIG
from cce_dist.testing import make_inputs

FW128 = {"fw_block_n": 128, "fw_block_d": 128}  # the forward before fw_* existed
VARIANTS = {
    "default": {},
    "fw128": FW128,
    "fw256_bd128_s2": {"fw_block_d": 128, "fw_num_stages": 2},
    "fw256_bd64_s4": {"fw_num_stages": 4},
    "fw256_bd32_s5": {"fw_block_d": 32, "fw_num_stages": 5},
    "fw128_bd64_s4": {**FW128, "fw_block_d": 64, "fw_num_stages": 4},
    "prev": {"block_d": 64, "out_block_d": 128, "mm_num_stages": 3},
    "bv256": {"block_v": 256, "out_block_d": 128},
    "bv256_bd64": {"block_v": 256, "block_d": 64, "out_block_d": 128},
    "od128": {"out_block_d": 128},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c, t = make_inputs(args.regime, n, d, v, device="cuda")
    scale = torch.full((n,), 1.0 / n, device="cuda")
    flops = 2 * n * d * v
    print(f"shape {args.shape} {args.regime}: one N*D*V matmul at 790 TFLOP/s = "
          f"{flops / 790e9:.2f} ms")
    print(f"{'variant':>12} {'fw ms':>7} {'TF/s':>5} {'bw exact':>9} {'bw filt':>8}")
    for name in args.variants.split(","):
        cfg = dataclasses.replace(GPU_CONFIG, **VARIANTS[name])
        try:
            lse, _, tile_max = triton_forward.forward(e, c, t, 0, cfg)
            fw = triton.testing.do_bench(lambda: triton_forward.forward(e, c, t, 0, cfg),
                                         return_mode="median")
            times = [float("nan")] * 2 if args.forward_only else []
            for eps in () if args.forward_only else (None, 2.0 ** -12):
                times.append(triton.testing.do_bench(
                    lambda: triton_backward.backward(e, c, t, lse, scale, 0, eps, tile_max, cfg),
                    return_mode="median"))
        except Exception as err:
            print(f"{name:>12} failed: {type(err).__name__}: {str(err)[:200]}")
            continue
        print(f"{name:>12} {fw:7.2f} {flops / fw / 1e9:5.0f} {times[0]:9.2f} {times[1]:8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
