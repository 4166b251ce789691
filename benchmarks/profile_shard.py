"""Where the kernel time of one vocabulary shard goes, on one GPU, under tile-config variants.

``python benchmarks/profile_shard.py --shape 8192x4096x128256 --regime lm --shards 4 --ranks 0,3``
For each variant (changes to ``GPU_CONFIG``; ``a+b`` combines two) and rank of an even
``--shards``-way split: the forward and the filtered backward of that rank's rows (with the global
LSE) in ms (medians of ``triton.testing.do_bench``), the share of (block_n x block_v) tiles the
backward recomputes, the peak extra memory of one forward + backward (dE in fp32 and the dC shard
included), and with ``--profile`` the CUDA time per kernel for the first variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from unittest import mock

import torch
import triton
import triton.testing

from cce_dist import vocab_range
from cce_dist.kernels import cce_backward, cce_forward, tiles
from cce_dist.testing import make_inputs
from bench_memory import peak_extra_mb  # beside this script

VARIANTS = {
    "default": {},
    # The defaults before 2026-11-28's third session (128 x 128 forward blocks, 4096-row chunks).
    "old": {"fw_block_v": 128, "fw_block_d": 128, "block_d": 128, "num_stages": 3,
            "chunk_v": 4096},
    "fw_v256": {"fw_block_v": 256, "fw_block_d": 64, "fw_num_stages": 3},
    "fw_v256_s4": {"fw_block_v": 256, "fw_block_d": 64, "fw_num_stages": 4},
    "fw_v256_bd128_s2": {"fw_block_v": 256, "fw_block_d": 128, "fw_num_stages": 2},
    "fw_n64_v256_w4": {"fw_block_n": 64, "fw_block_v": 256, "fw_block_d": 64,
                       "fw_num_stages": 4, "fw_num_warps": 4},
    "fw_bd64_s4": {"fw_block_d": 64, "fw_num_stages": 4},
    "dl_w4": {"num_warps": 4},
    "dl_bd64_s4": {"block_d": 64, "num_stages": 4},
    "dl_bd64_s3": {"block_d": 64, "num_stages": 3},
    "dl_bd64_s5": {"block_d": 64, "num_stages": 5},
    "mm_s3": {"mm_num_stages": 3},
    "mm_od128": {"out_block_d": 128},
    "mm_w4": {"mm_num_warps": 4},
    "chunk8k": {"chunk_v": 8192},
    "chunk16k": {"chunk_v": 16384},
}


def changes(name: str) -> dict:
    """The config changes of a variant; ``a+b`` combines variants a and b."""
    out = {}
    for part in name.split("+"):
        out.update(VARIANTS[part])
    return out
FILTER_EPS = 2.0 ** -12


def recomputed_share(tile_max, lse, targets, lo, hi, cfg) -> float:
    """Share of tiles that the backward's first test (the forward's tile maxima) keeps."""
    n = lse.numel()
    pad = tile_max.shape[0] * cfg.block_n - n
    lse_min = torch.nn.functional.pad(lse, (0, pad), value=float("inf"))
    lse_min = lse_min.view(-1, cfg.block_n).min(dim=1).values
    keep = (tile_max - lse_min[:, None]) >= torch.log(torch.tensor(FILTER_EPS))
    local = targets - lo
    inside = (local >= 0) & (local < hi - lo)
    rows = torch.arange(n, device=targets.device)[inside] // cfg.block_n
    keep[rows, local[inside] // cfg.block_v] = True
    return keep.float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x128256")
    p.add_argument("--regime", default="lm")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--ranks", default="0,3")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--exact", action="store_true", help="also time the unfiltered backward")
    p.add_argument("--filter", choices=("auto", "entry"), default="auto",
                   help="the default budget filter, or the per-entry threshold 2^-12")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split("x"))
    e, c_full, t = make_inputs(args.regime, n, d, v, device="cuda", seed=0)
    lse = cce_forward(e, c_full, t, 0, "triton")[0]
    scale = torch.full_like(lse, 1.0 / n)
    rows = []
    eps = FILTER_EPS
    if args.filter == "auto":
        from cce_dist.kernels.filtering import GradFilter, default_budget

        eps = GradFilter("budget", default_budget(e.dtype)).encode()
    print(f"{args.shape} {args.regime}, {args.shards} shards, filter {args.filter}; ms per call")
    print(f"{'variant':>18} {'rank':>4} {'fw':>6} {'TF/s':>5} {'bw':>6} {'bw exact':>8} "
          f"{'kept':>5} {'total':>6} {'peak MB':>7}", flush=True)
    for k, name in enumerate(args.variants.split(",")):
        cfg = dataclasses.replace(tiles.GPU_CONFIG, **changes(name))
        with mock.patch.object(tiles, "GPU_CONFIG", cfg):
            for rank in map(int, args.ranks.split(",")):
                lo, hi = vocab_range(v, rank, args.shards)
                c = c_full[lo:hi]

                def fw():
                    return cce_forward(e, c, t, lo, "triton")

                def bw(tile_max, eps=eps):
                    return cce_backward(e, c, t, lse, scale, tile_max, lo, eps, "triton", True,
                                        vocab_size=v)

                try:
                    tile_max = fw()[2]
                    bw(tile_max)
                    fw_ms = triton.testing.do_bench(fw, return_mode="median")
                    bw_ms = triton.testing.do_bench(lambda: bw(tile_max), return_mode="median")
                    ex_ms = (triton.testing.do_bench(lambda: bw(tile_max, None),
                                                     return_mode="median")
                             if args.exact else float("nan"))
                except Exception as err:  # a variant that does not compile or fit
                    print(f"{name:>18} {rank:>4} failed: {type(err).__name__}: {str(err)[:160]}",
                          flush=True)
                    continue
                if args.filter == "auto":
                    from cce_dist.kernels.filtering import decode_filter, keep_tiles

                    kept = keep_tiles(tile_max, lse, cfg.block_n, cfg.block_v, hi - lo, v,
                                      decode_filter(eps)).float().mean().item()
                else:
                    kept = recomputed_share(tile_max, lse, t, lo, hi, cfg)
                peak = peak_extra_mb(lambda: bw(fw()[2]))
                tf = 2 * n * d * (hi - lo) / fw_ms / 1e9
                print(f"{name:>18} {rank:>4} {fw_ms:6.2f} {tf:5.0f} {bw_ms:6.2f} {ex_ms:8.2f} "
                      f"{kept:5.2f} {fw_ms + bw_ms:6.2f} {peak:7.0f}", flush=True)
                rows.append(dict(shape=args.shape, regime=args.regime, shards=args.shards,
                                 filter=args.filter,
                                 rank=rank, variant=name, changes=changes(name), fw_ms=fw_ms,
                                 bw_ms=bw_ms, bw_exact_ms=ex_ms, kept=kept, peak_mb=peak))
                if args.profile and k == 0:
                    profile(fw, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def profile(fw, bw, iters: int = 3) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            bw(fw()[2])
        torch.cuda.synchronize()
    events = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
    events.sort(key=lambda ev: -ev.device_time_total)
    for ev in events[:12]:
        print(f"{'':>24} {ev.device_time_total / iters / 1e3:7.3f} ms "
              f"{ev.count // iters:4d}x {ev.key[:70]}", flush=True)


if __name__ == "__main__":
    main()
