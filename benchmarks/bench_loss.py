"""Speed, memory and accuracy of the linear-cross-entropy loss, methods side by side.

Run on a GPU: ``python benchmarks/bench_loss.py [--shapes 8192x2304x256000,...] [--regimes ...]``.
Methods: torch eager, torch.compile, cce-dist exact and default-filtered, and apple's
cut-cross-entropy and liger-kernel when importable. Times are medians of
``triton.testing.do_bench``; ``peak`` is the largest extra allocation during fw+bw above the
inputs (it includes the dE and dC gradients themselves); errors are relative L2 against an fp32
computation on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import traceback
from unittest import mock

import torch
import torch.nn.functional as F
import triton.testing

from cce_dist import default_filter_eps, linear_cross_entropy
from cce_dist.kernels import tiles
from cce_dist.parallel import function
from cce_dist.testing import make_inputs
from bench_memory import peak_extra_mb  # beside this script


SOFTCAP = 0.0  # --softcap: every method's logits pass through softcap * tanh(z / softcap)


def capped(z):
    return SOFTCAP * torch.tanh(z / SOFTCAP) if SOFTCAP else z


def eager(e, c, t):
    return F.cross_entropy(capped((e @ c.T).float()), t)


def methods(selected: set[str]) -> dict:
    """The methods named in ``selected`` (all if empty). Competitors are imported only when
    selected: importing apple's cut_cross_entropy 25.1.1 in the same process made our backward
    custom op fail with "ValueError: vector::reserve" on torch 2.11 before 612f694, which fixed
    its cause (a second registration of our ops through a top-level "kernels" import)."""
    want = (lambda name: not selected or name in selected)
    out = {
        "cce-dist exact": lambda e, c, t: linear_cross_entropy(e, c, t, filter_eps=None),
        "cce-dist": lambda e, c, t: linear_cross_entropy(e, c, t),
        # The per-entry threshold of the CCE paper (the default before the budget filter).
        "cce-dist entry": lambda e, c, t: linear_cross_entropy(
            e, c, t, filter_eps=default_filter_eps(e.dtype)),
        "torch eager": eager,
        "torch.compile": torch.compile(eager),
    }
    # Exact mode on the fused Triton tile kernels (no cuBLAS; the engine before 2026-11-29).
    fused = (lambda e, c, t: linear_cross_entropy(e, c, t, filter_eps=None))
    fused.context = lambda: mock.patch.object(
        tiles, "GPU_CONFIG", dataclasses.replace(tiles.GPU_CONFIG, gemm=False))
    out["cce-dist fused exact"] = fused
    # The default with dE computed in the backward (the engine before it moved to the forward).
    de_in_backward = (lambda e, c, t: linear_cross_entropy(e, c, t))
    de_in_backward.context = lambda: mock.patch.object(
        function, "forward_makes_de", lambda *args: False)
    out["cce-dist dE in backward"] = de_in_backward
    # The default with the backward's logits from cuBLAS (fp32) and dl from a second kernel
    # (the engine before the fused dl kernel of 2026-11-29).
    two_launch = (lambda e, c, t: linear_cross_entropy(e, c, t))
    two_launch.context = lambda: mock.patch.object(
        tiles, "GPU_CONFIG", dataclasses.replace(tiles.GPU_CONFIG, gemm_fused_dl=False))
    out["cce-dist two-launch dl"] = two_launch
    # The forward's logits from cuBLAS (fp32) and its statistics (and p) from a second kernel,
    # and the fused forward's tile shapes.
    for name, changes in (
            ("two-launch fw", dict(gemm_fused_fw="never")),
            ("fused fw stats only", dict(gemm_fused_fw="stats")),
            ("fused fw 128x128 s4", dict(gemm_fused_fw="always", fw_fused_block_c=128,
                                         fw_fused_stages=4)),
            ("fused fw 128x256 s3", dict(gemm_fused_fw="always", fw_fused_block_c=256,
                                         fw_fused_stages=3)),
            ("fused fw stats only s4", dict(gemm_fused_fw="stats", fw_fused_stages=4)),
            ("fw unflattened", dict(fw_fused_flatten=False)),
            ("dl unflattened", dict(dl_flatten=False)),
            ("both unflattened", dict(fw_fused_flatten=False, dl_flatten=False)),
            ("fused fw dE chunks 256 MB", dict(gemm_fused_fw="always",
                                                gemm_de_fw_bytes=256 << 20)),
            ("fused fw dE chunks 512 MB", dict(gemm_fused_fw="always",
                                                gemm_de_fw_bytes=512 << 20)),
            ("two-launch fw dE chunks 32 MB", dict(gemm_de_fw_bytes=32 << 20)),
            ("dl 128x128 s4 w4", dict(dl_block_c=128, dl_stages=4, dl_warps=4)),
            ("dl 128x128 s5 w4", dict(dl_block_c=128, dl_stages=5, dl_warps=4)),
            ("dl 128x128 s4 w8", dict(dl_block_c=128, dl_stages=4, dl_warps=8)),
            ("fw stats 128x128 s4", dict(fw_fused_block_c=128, fw_fused_stages=4))):
        fn = (lambda e, c, t: linear_cross_entropy(e, c, t))
        fn.context = (lambda changes=changes: mock.patch.object(
            tiles, "GPU_CONFIG", dataclasses.replace(tiles.GPU_CONFIG, **changes)))
        out[f"cce-dist {name}"] = fn
    if want("apple CCE"):
        try:
            from cut_cross_entropy import linear_cross_entropy as apple

            out["apple CCE"] = lambda e, c, t: apple(e, c, t)
        except ImportError as err:
            print(f"# apple CCE not available: {err}", file=sys.stderr)
    if want("Liger FLCE"):
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out["Liger FLCE"] = lambda e, c, t: liger_fused_linear_cross_entropy(e, c, t)
        except ImportError as err:
            print(f"# liger-kernel not available: {err}", file=sys.stderr)
    if want("DeepSpeed fused"):
        try:  # DeepSpeed >= 0.19.8: chunked cuBLAS products, vocabulary-parallel capable
            from deepspeed.sequence.linear_cross_entropy import (
                vocab_parallel_linear_cross_entropy as deepspeed_loss,
            )

            out["DeepSpeed fused"] = lambda e, c, t: deepspeed_loss(e, c, t)
        except ImportError as err:
            print(f"# DeepSpeed's fused loss not available: {err}", file=sys.stderr)
    if want("cce-dist drop-in"):  # the same call through our DeepSpeed-compatible function
        from cce_dist.deepspeed import vocab_parallel_linear_cross_entropy as dropin

        out["cce-dist drop-in"] = lambda e, c, t: dropin(e, c, t)
    return {k: v for k, v in out.items() if want(k)}


def fp32_reference(e, c, t):
    torch.backends.cuda.matmul.allow_tf32 = False
    e32 = e.detach().float().requires_grad_()
    c32 = c.detach().float().requires_grad_()
    loss = F.cross_entropy(capped(e32 @ c32.T), t)
    de, dc = torch.autograd.grad(loss, (e32, c32))
    return loss.detach(), de, dc


def rel(x, ref):
    return float((x.float() - ref).norm() / ref.norm())


def measure(fn, e, c, t, ref) -> dict:
    with getattr(fn, "context", contextlib.nullcontext)():
        return _measure(fn, e, c, t, ref)


def _measure(fn, e, c, t, ref) -> dict:
    def fw_bw():
        return torch.autograd.grad(fn(e, c, t), (e, c))

    loss = fn(e, c, t)
    de, dc = torch.autograd.grad(loss, (e, c))
    errs = {"loss_err": rel(loss.detach(), ref[0]), "de_err": rel(de, ref[1]),
            "dc_err": rel(dc, ref[2])}
    del loss, de, dc
    fw_ms = triton.testing.do_bench(lambda: fn(e, c, t), warmup=100, rep=500,
                                    return_mode="median")
    with torch.no_grad():  # the forward alone (evaluation): no dE made on the way
        fw_nograd_ms = triton.testing.do_bench(lambda: fn(e, c, t), warmup=100, rep=500,
                                               return_mode="median")
    fwbw_ms = triton.testing.do_bench(fw_bw, warmup=100, rep=500, return_mode="median")
    peak_mb = peak_extra_mb(fw_bw)
    return {"fw_ms": fw_ms, "fw_nograd_ms": fw_nograd_ms, "fwbw_ms": fwbw_ms,
            "peak_mb": peak_mb, **errs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x2304x256000,8192x4096x128256")
    p.add_argument("--regimes", default="lm,dense,spread,zipf")
    p.add_argument("--methods", default="", help="comma-separated subset of method names")
    p.add_argument("--json", default="", help="write all rows to this file")
    p.add_argument("--softcap", type=float, default=0.0,
                   help="cap every method's logits (Gemma 2: 30); competitors without the "
                        "option show it in their errors")
    args = p.parse_args()
    global SOFTCAP, linear_cross_entropy
    if args.softcap:
        SOFTCAP = args.softcap
        linear_cross_entropy = functools.partial(linear_cross_entropy, softcap=args.softcap)
    fns = methods(set(args.methods.split(",")) if args.methods else set())
    rows = []
    print(f"{'N,D,V':>18} {'regime':>7} {'method':>15} {'fw ms':>7} {'no-grad':>7} {'fw+bw':>7} "
          f"{'peak MB':>8} {'loss err':>9} {'dE err':>8} {'dC err':>8} {'grads MB':>8}")
    for shape in args.shapes.split(","):
        n, d, v = map(int, shape.split("x"))
        for regime in args.regimes.split(","):
            e, c, t = make_inputs(regime, n, d, v, device="cuda", seed=0)
            e.requires_grad_(), c.requires_grad_()
            ref = fp32_reference(e, c, t)
            with torch.no_grad():
                maxprob = float(torch.softmax((e[:1024].float() @ c.float().T), -1).max(-1)
                                .values.mean())
            grads_mb = (e.numel() + c.numel()) * e.element_size() / 2**20
            for name, fn in fns.items():
                try:
                    r = measure(fn, e, c, t, ref)
                except Exception as err:  # a competitor failing must not hide the rest
                    print(f"# {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
                    traceback.print_exc()
                    continue
                r.update(shape=shape, regime=regime, method=name, grads_mb=grads_mb,
                         maxprob=maxprob)
                rows.append(r)
                print(f"{shape:>18} {regime:>7} {name:>15} {r['fw_ms']:7.2f} "
                      f"{r['fw_nograd_ms']:7.2f} {r['fwbw_ms']:7.2f} {r['peak_mb']:8.0f} {r['loss_err']:9.1e} "
                      f"{r['de_err']:8.1e} {r['dc_err']:8.1e} {grads_mb:8.0f}", flush=True)
            del e, c, t, ref
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
