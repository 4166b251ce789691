"""How many fp32 logits the gemm engine's chunks hold: speed and peak per setting.

``python benchmarks/tune_chunks.py``: for each shape and each (forward MB, backward MB), the
median forward and fw+bw times of the default loss (exact data path on dense inputs) and the
peak memory above the inputs, next to the gradients' own size.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from unittest import mock

import torch
import triton.testing

from cce_dist import linear_cross_entropy
from cce_dist.kernels import ops
from cce_dist.testing import make_inputs

MB = 1 << 20


def measure(shape, fw_mb, bw_mb, lent=None, de_fw_mb=None, dc_mb=None):
    n, d, v = shape
    base = ops.default_config(torch.device("cuda"), torch.bfloat16)
    cfg = replace(base, gemm_fw_bytes=fw_mb * MB, gemm_bytes=bw_mb * MB,
                  max_lent_fraction=base.max_lent_fraction if lent is None else lent,
                  gemm_de_fw_bytes=base.gemm_de_fw_bytes if de_fw_mb is None else de_fw_mb * MB,
                  gemm_dc_bytes=base.gemm_dc_bytes if dc_mb is None else dc_mb * MB)
    e, c, t = make_inputs("dense", n, d, v, dtype=torch.bfloat16, device="cuda", seed=0)
    e.requires_grad_(), c.requires_grad_()
    with mock.patch.object(ops, "default_config", lambda *a, **k: cfg):
        def fw():
            with torch.no_grad():
                linear_cross_entropy(e, c, t)

        def fwbw():
            e.grad = c.grad = None
            linear_cross_entropy(e, c, t).backward()

        fwbw()
        torch.cuda.synchronize()
        e.grad = c.grad = None
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwbw()
        peak = (torch.cuda.max_memory_allocated() - start) / MB
        bench = (lambda f: triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median"))
        return dict(shape="x".join(map(str, shape)), fw_mb=fw_mb, bw_mb=bw_mb,
                    lent=cfg.max_lent_fraction, de_fw_mb=cfg.gemm_de_fw_bytes // MB,
                    dc_mb=cfg.gemm_dc_bytes // MB,
                    fw_ms=bench(fw),
                    fwbw_ms=bench(fwbw), peak_mb=peak, grads_mb=(n * d + v * d) * 2 / MB)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x4096x128256,4096x1024x128256,8192x2304x256000")
    p.add_argument("--settings", default="64:64,128:128,256:128,128:256",
                   help="forward MB:backward MB[:largest share of dC's rows lent"
                        "[:forward MB when the forward makes dE[:backward MB when dC only]]]")
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        for setting in args.settings.split(","):
            fw_mb, bw_mb, *lent = setting.split(":")
            row = measure(tuple(map(int, shape.split("x"))), int(fw_mb), int(bw_mb),
                          float(lent[0]) if lent else None,
                          int(lent[1]) if len(lent) > 1 else None,
                          int(lent[2]) if len(lent) > 2 else None)
            rows.append(row)
            print(f"{row['shape']:>18} fw {fw_mb:>4} MB bw {bw_mb:>4} MB lent {row['lent']}"
                  f" dE-fw {row['de_fw_mb']} MB dC-bw {row['dc_mb']} MB  fw {row['fw_ms']:6.2f} ms"
                  f"  fw+bw {row['fwbw_ms']:6.2f} ms  peak {row['peak_mb']:6.0f} MB"
                  f" (grads {row['grads_mb']:.0f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
