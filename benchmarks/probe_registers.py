"""Compile the Hopper kernels for sm_90 without a GPU, and report their registers and spills.

Triton lowers a kernel to PTX on any machine, and its wheel carries ``ptxas``, whose ``-v``
prints the registers, spills and stack each kernel needs. That is how the fused forward's
128 x 256 tiles were found to spill (BENCHMARKS.md); the tests use :func:`compile_sm90` to
check that every variant of the fused kernels compiles and fits in shared memory.

Usage: ``python3 benchmarks/probe_registers.py`` (the installed triton; set PYTHONPATH to
another triton to compare versions); ``--check`` compiles every variant the engine launches
and exits non-zero if one fails or exceeds sm_90's shared memory. Not under TRITON_INTERPRET
(which turns the kernels into interpreted functions).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cce_dist.kernels import gemm_engine  # noqa: E402

FLOATS = {"softcap", "logit_scale", "cap", "target_weight", "uniform_weight", "slack"}


def _arg_type(name: str, block_m: int, block_c: int, block_k: int) -> str:
    """The signature type of a kernel argument, by our naming: descriptors of bf16 tiles,
    int64 targets, fp32 pointers and floats, int32 sizes."""
    if name in ("e_desc",):
        return f"tensordesc<bf16[{block_m},{block_k}]>"
    if name == "c_desc":
        return f"tensordesc<bf16[{block_c},{block_k}]>"
    if name.endswith("_desc"):
        return f"tensordesc<bf16[{block_m},{block_c}]>"
    if name == "t_ptr":
        return "*i64"
    if name in ("e_ptr", "c_ptr", "p_ptr", "logits_ptr"):
        return "*bf16"
    if name.endswith("_ptr"):
        return "*fp32"
    return "fp32" if name in FLOATS else "i32"


def compile_sm90(kernel, constexprs: dict, num_warps: int):
    """``kernel`` (a ``triton.jit`` function) compiled for sm_90 with ``constexprs``; the
    other arguments typed by :func:`_arg_type` (tiles from BLOCK_M / BLOCK_C / BLOCK_K)."""
    tiles = (constexprs.get("BLOCK_M", 128), constexprs.get("BLOCK_C", 256),
             constexprs.get("BLOCK_K", 64))
    signature = {name: "constexpr" if name in constexprs else _arg_type(name, *tiles)
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def ptxas_info(compiled) -> str:
    """``ptxas -v``'s line on registers, spills and stack for a compiled kernel's PTX (the
    ptxas triton itself runs for sm_90: newer triton emits PTX only a newer ptxas reads)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o",
                              os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return " | ".join(line.split(":", 1)[-1].strip() for line in out.splitlines()
                      if "registers" in line or "spill" in line)


def forward_variant(block_c: int = 256, stages: int = 3, **flags) -> dict:
    """Constexprs of ``_chunk_stats_gemm_kernel`` (statistics and p, bf16, no options)."""
    out = dict(FIRST=False, BLOCK_M=128, BLOCK_C=block_c, BLOCK_K=64, GROUP=8, STAGES=stages,
               FLATTEN=True, TILE_N=64, TILE_V=128, SUM_LOGITS=False, HAS_BIAS=False,
               HAS_SOFTCAP=False, MEAN_LOGIT=False, HAS_SCALE=False, STATS=True, PROBS=True,
               ROUNDED=True, PRECISION="tf32")
    out.update(flags)
    return out


def dlogits_variant(**flags) -> dict:
    """Constexprs of ``_chunk_dlogits_gemm_kernel`` (bf16, no options)."""
    out = dict(BLOCK_M=128, BLOCK_C=256, BLOCK_K=64, GROUP=8, STAGES=3, FLATTEN=True,
               HAS_BIAS=False, HAS_SOFTCAP=False, ENTROPY=False, HAS_SCALE=False,
               PRECISION="tf32")
    out.update(flags)
    return out


HOPPER_SHARED = 227 * 1024  # opt-in shared memory per block on sm_90


def engine_variants() -> list[tuple[str, object, dict, int]]:
    """(name, kernel, constexprs, warps) of the variants the engine launches on Hopper, with
    the tiles of ``GPU_CONFIG``: the fused forward (statistics only, the first chunk, p,
    options), the backward's dl (options), each also with its tile loop unflattened (the
    config's ``fw_fused_flatten`` / ``dl_flatten``), and the repair from recomputed logits."""
    from cce_dist.kernels.tiles import GPU_CONFIG as cfg

    fw_tiles = dict(BLOCK_M=cfg.dl_block_m, BLOCK_K=cfg.dl_block_k, GROUP=cfg.dl_group,
                    FLATTEN=cfg.fw_fused_flatten, TILE_N=cfg.block_n, TILE_V=cfg.block_v)
    out = []
    for name, flags in (
            ("statistics, first chunk", dict(PROBS=False, FIRST=True)),
            ("statistics, bias, softcap, mean", dict(PROBS=False, HAS_BIAS=True,
                                                     HAS_SOFTCAP=True, MEAN_LOGIT=True)),
            ("statistics, sum, scale", dict(PROBS=False, SUM_LOGITS=True, HAS_SCALE=True)),
            ("statistics and p", dict()),
            ("p only, first chunk, bias", dict(STATS=False, FIRST=True, HAS_BIAS=True)),
            ("statistics and p, unflattened", dict(FLATTEN=False))):
        constexprs = forward_variant(cfg.fw_fused_block_c, cfg.fw_fused_stages)
        constexprs.update(fw_tiles)
        constexprs.update(flags)
        out.append((f"forward: {name}", gemm_engine._chunk_stats_gemm_kernel, constexprs,
                    cfg.fw_fused_warps))
    dl_tiles = dict(BLOCK_M=cfg.dl_block_m, BLOCK_C=cfg.dl_block_c, BLOCK_K=cfg.dl_block_k,
                    GROUP=cfg.dl_group, STAGES=cfg.dl_stages, FLATTEN=cfg.dl_flatten)
    for name, flags in (
            ("plain", dict()),
            ("unflattened", dict(FLATTEN=False)),
            ("bias, softcap, entropy, scale", dict(HAS_BIAS=True, HAS_SOFTCAP=True,
                                                   ENTROPY=True, HAS_SCALE=True))):
        out.append((f"dl: {name}", gemm_engine._chunk_dlogits_gemm_kernel,
                    {**dlogits_variant(), **dl_tiles, **flags}, cfg.dl_warps))
    out.append(("repair from recomputed logits", gemm_engine._advance_reference_kernel,
                dict(BLOCK_N=cfg.block_n, BLOCK_V=32, BLOCK_D=min(cfg.out_block_d, 128),
                     FIRST=False, HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SCALE=False,
                     RECOMPUTE=True, PRECISION="tf32"), 4))
    return out


def check() -> int:
    """Compiles every engine variant; prints ``ok`` or ``FAIL`` per variant; the number of
    failures (a compiler error, or shared memory past sm_90's)."""
    failures = 0
    for name, kernel, constexprs, warps in engine_variants():
        try:
            shared = compile_sm90(kernel, constexprs, warps).metadata.shared
            verdict = "ok" if shared <= HOPPER_SHARED else "FAIL (shared memory)"
        except Exception as err:  # the compiler's own message follows
            shared, verdict = 0, f"FAIL ({type(err).__name__}: {str(err)[-300:]})"
        failures += verdict != "ok"
        print(f"{verdict[:4]:>4} {name}: shared {shared} B {verdict[4:]}", flush=True)
    return failures


def main() -> None:
    runs = [
        ("dl 128x256 s3", gemm_engine._chunk_dlogits_gemm_kernel, dlogits_variant(), 8),
        ("fw stats 128x256 s3", gemm_engine._chunk_stats_gemm_kernel,
         forward_variant(PROBS=False), 8),
        ("fw stats+p 128x256 s3", gemm_engine._chunk_stats_gemm_kernel, forward_variant(), 8),
        ("fw stats+p 128x128 s4", gemm_engine._chunk_stats_gemm_kernel,
         forward_variant(block_c=128, stages=4), 8),
    ]
    print(f"triton {triton.__version__}, sm_90")
    for name, kernel, constexprs, warps in runs:
        compiled = compile_sm90(kernel, constexprs, warps)
        print(f"{name:>24}: shared {compiled.metadata.shared} B; {ptxas_info(compiled)}")


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(min(check(), 1))
    main()
