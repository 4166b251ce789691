"""Can a Triton GEMM with the dl epilogue beat cuBLAS's fp32 logits + the dl kernel?

``python benchmarks/probe_fused_dl.py`` on one GPU: for one backward chunk (N tokens x vc
vocabulary rows, K = D), the engine's two launches (cuBLAS fp32 logits, ``_chunk_dlogits_kernel``)
against one Triton kernel that computes the logits tile and writes dl in 16 bits, at several
tile shapes, with pointer loads or TMA descriptors; each checked against the two-launch result.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from cce_dist.kernels import gemm_engine, tiles
from cce_dist.kernels.gemm_engine import grouped_tile
from cce_dist.testing import make_inputs


@triton.jit
def _dl(acc, offs_m, offs_n, t_ptr, lse_ptr, scale_ptr, v0):
    """The plain loss's dl of one fp32 logits tile (no options)."""
    lse = tl.load(lse_ptr + offs_m)
    s = tl.load(scale_ptr + offs_m)
    t = tl.load(t_ptr + offs_m).to(tl.int32) - v0
    hit = offs_n[None, :] == t[:, None]
    return (tl.exp(acc - lse[:, None]) - hit.to(tl.float32)) * s[:, None]


@triton.jit
def _dl_gemm_ptr(e_ptr, c_ptr, dl_ptr, t_ptr, lse_ptr, scale_ptr, N, VC, D, v0,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 EPILOGUE: tl.constexpr, STAGES: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(VC, BN), GROUP)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = e_ptr + offs_m.to(tl.int64)[:, None] * D + offs_k[None, :]
    b_ptrs = c_ptr + (v0 + offs_n).to(tl.int64)[None, :] * D + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, D, BK, num_stages=STAGES):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BK
        b_ptrs += BK
    at = offs_m.to(tl.int64)[:, None] * VC + offs_n[None, :]
    if EPILOGUE:
        g = _dl(acc, offs_m, offs_n, t_ptr, lse_ptr, scale_ptr, v0)
        tl.store(dl_ptr + at, g.to(dl_ptr.dtype.element_ty))
    else:
        tl.store(dl_ptr + at, acc.to(dl_ptr.dtype.element_ty))


@triton.jit
def _dl_gemm_tma(e_desc, c_desc, dl_desc, t_ptr, lse_ptr, scale_ptr, N, VC, D,
                 v0, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                 EPILOGUE: tl.constexpr, STAGES: tl.constexpr, SPLIT_STORE: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(VC, BN), GROUP)
    om, on = pid_m * BM, pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, D, BK, num_stages=STAGES):
        a = e_desc.load([om, k])
        b = c_desc.load([v0 + on, k])
        acc = tl.dot(a, b.T, acc)
    offs_m = om + tl.arange(0, BM)
    offs_n = on + tl.arange(0, BN)
    if EPILOGUE:
        g = _dl(acc, offs_m, offs_n, t_ptr, lse_ptr, scale_ptr, v0)
    else:
        g = acc
    dl_desc.store([om, on], g.to(dl_desc.dtype))


@triton.jit
def _dl_gemm_tma_persistent(e_desc, c_desc, dl_desc, t_ptr, lse_ptr, scale_ptr, N, VC, D, v0,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            GROUP: tl.constexpr, STAGES: tl.constexpr, NUM_SMS: tl.constexpr,
                            WS: tl.constexpr):
    num_m, num_n = tl.cdiv(N, BM), tl.cdiv(VC, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True,
                         warp_specialize=WS):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP)
        om, on = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, D, BK, num_stages=STAGES):
            acc = tl.dot(e_desc.load([om, k]), c_desc.load([v0 + on, k]).T, acc)
        offs_m = om + tl.arange(0, BM)
        offs_n = on + tl.arange(0, BN)
        g = _dl(acc, offs_m, offs_n, t_ptr, lse_ptr, scale_ptr, v0)
        dl_desc.store([om, on], g.to(dl_desc.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192x4096x4096")
    args = p.parse_args()
    n, d, vc = map(int, args.shape.split("x"))
    e, c, t = make_inputs("lm", n, d, vc, device="cuda", seed=0)
    lse = torch.logsumexp((e @ c.T).float(), dim=1)
    scale = torch.full((n,), 1.0 / n, device="cuda")
    cfg = tiles.GPU_CONFIG
    logits = torch.empty((n, vc), dtype=torch.float32, device="cuda")
    dl_ref = torch.empty((n, vc), dtype=e.dtype, device="cuda")
    bn, bv = cfg.block_n, cfg.block_v

    def engine():
        torch.mm(e, c.t(), out_dtype=torch.float32, out=logits)
        gemm_engine._chunk_dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(vc, bv))](
            logits, dl_ref, t, lse, lse, scale, lse, lse, lse, n, vc, vc, 0, 0, 1, 1.0, 0.0,
            0.0, 1.0, BLOCK_N=bn, BLOCK_V=bv, FILTER=False, HAS_BIAS=False, HAS_SOFTCAP=False,
            ENTROPY=False, HAS_SCALE=False, PRECISION="tf32", num_warps=cfg.gemm_num_warps)

    bench = (lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median"))
    flop = 2 * n * d * vc
    ms = bench(engine)
    print(f"engine: cuBLAS fp32 logits + dl kernel   {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s")
    ms = bench(lambda: torch.mm(e, c.t(), out_dtype=torch.float32, out=logits))
    print(f"        cuBLAS fp32 logits alone          {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s")
    logits16 = torch.empty_like(dl_ref)
    ms = bench(lambda: torch.mm(e, c.t(), out=logits16))
    print(f"        cuBLAS 16-bit logits alone        {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s")
    torch.cuda.synchronize()
    engine()
    out = torch.empty_like(dl_ref)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for bm, bnn, bk, stages, warps, ws in [
        (128, 128, 64, 5, 4, False), (128, 128, 64, 4, 4, False), (128, 256, 64, 3, 8, False),
        (128, 256, 64, 4, 8, False), (128, 128, 64, 4, 4, True), (128, 256, 64, 3, 8, True),
        (128, 128, 64, 3, 8, True),
    ]:
        try:
            ed = TensorDescriptor.from_tensor(e, [bm, bk])
            cd = TensorDescriptor.from_tensor(c, [bnn, bk])
            od = TensorDescriptor.from_tensor(out, [bm, bnn])
            for programs in (sms, 2 * sms):
                f = (lambda: _dl_gemm_tma_persistent[(programs,)](
                    ed, cd, od, t, lse, scale, n, vc, d, 0, BM=bm, BN=bnn, BK=bk, GROUP=8,
                    STAGES=stages, NUM_SMS=programs, WS=ws, num_warps=warps))
                f()
                torch.cuda.synchronize()
                err = ((out.float() - dl_ref.float()).norm() / dl_ref.float().norm()).item()
                ms = bench(f)
                print(f"persistent tma {bm}x{bnn}x{bk} s{stages} w{warps} ws={ws!s:5s} "
                      f"programs {programs} {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s  "
                      f"rel err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile
            print(f"persistent {bm}x{bnn}x{bk} s{stages} w{warps} ws={ws}: "
                  f"{type(exc).__name__}: {str(exc)[:150]}", flush=True)
    for bm, bnn, bk, stages, warps, group in [
        (128, 256, 64, 3, 8, 8), (128, 256, 64, 4, 8, 8), (128, 128, 64, 4, 8, 8),
        (128, 128, 64, 5, 4, 8), (256, 128, 64, 3, 8, 8), (128, 256, 128, 2, 8, 8),
    ]:
        grid = (triton.cdiv(n, bm) * triton.cdiv(vc, bnn),)
        for kind in ("ptr", "tma"):
            for epi in (True, False):
                try:
                    if kind == "ptr":
                        f = (lambda: _dl_gemm_ptr[grid](
                            e, c, out, t, lse, scale, n, vc, d, 0, BM=bm, BN=bnn, BK=bk,
                            GROUP=group, EPILOGUE=epi, STAGES=stages, num_warps=warps))
                    else:
                        ed = TensorDescriptor.from_tensor(e, [bm, bk])
                        cd = TensorDescriptor.from_tensor(c, [bnn, bk])
                        od = TensorDescriptor.from_tensor(out, [bm, bnn])
                        f = (lambda: _dl_gemm_tma[grid](
                            ed, cd, od, t, lse, scale, n, vc, d, 0, BM=bm, BN=bnn, BK=bk,
                            GROUP=group, EPILOGUE=epi, STAGES=stages, SPLIT_STORE=False,
                            num_warps=warps))
                    f()
                    torch.cuda.synchronize()
                    if epi:
                        err = ((out.float() - dl_ref.float()).norm() / dl_ref.float().norm()).item()
                    else:
                        err = ((out.float() - logits).norm() / logits.norm()).item()
                    ms = bench(f)
                    print(f"{kind} {bm}x{bnn}x{bk} s{stages} w{warps} epilogue={epi!s:5s} "
                          f"{ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s  rel err {err:.1e}",
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile
                    print(f"{kind} {bm}x{bnn}x{bk} s{stages} w{warps}: {type(exc).__name__}: "
                          f"{str(exc)[:150]}", flush=True)


if __name__ == "__main__":
    main()
