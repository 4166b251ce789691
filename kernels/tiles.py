"""Tile shapes and the one Triton building block every CCE kernel shares: a logits tile."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of the CCE kernels.

    ``block_n`` x ``block_v`` is the logits tile, and also the granularity of gradient filtering
    (the forward records each tile's largest logit on this grid, the backward skips whole tiles).
    ``block_d`` is the step of the reduction over D. The backward materializes the gradients of
    the logits (dl, N x chunk in the input dtype) for ``chunk_v`` vocabulary rows at once, or
    ``lent_chunk_v`` when its workspace lives in dC's own storage (``tail_chunk_v`` for the lent
    rows, whose dl needs a buffer of its own): fewer, larger chunks mean fewer passes of the
    fp32 dE accumulator through memory, lent ones cost nothing beyond the gradients.
    ``max_lent_fraction`` bounds the share of dC's rows that may be lent to the workspace: lent
    rows have their dl computed twice (once for dE, once for dC), which is cheap when they are a
    small tail of a large vocabulary and not when a vocabulary shard is small next to N x D;
    beyond the bound the workspace gets buffers of its own. ``out_block_d`` is the D-width of
    one output tile of the dE / dC products; ``mm_*`` their launch settings. Without filtering
    the backward uses ``exact_block_n`` rows per tile: no tile is skipped, so taller tiles only
    make the products more efficient; the budget filter's verdicts (per ``block_n`` x ``block_v``
    tile) are pooled onto those taller tiles.
    With ``gemm`` (``kernels/gemm_engine.py``), the forward and the unfiltered or budget-filtered
    backward run their products through cuBLAS instead, on chunks of vocabulary rows whose n x
    rows fp32 logits fill ``gemm_fw_bytes`` in the forward (``gemm_de_fw_bytes`` when the forward
    also makes dE) and ``gemm_bytes`` in the backward (``gemm_dc_bytes`` when it makes only dC), at
    most ``gemm_fw_chunk_v`` / ``gemm_chunk_v`` rows (fewer tokens, taller chunks: the launches,
    not the products, would otherwise bound a short batch's time); the forward's statistics
    kernel takes ``gemm_stats_n`` x ``gemm_stats_cols`` logits per program; the backward's last
    lent rows use ``tail_chunk_v`` rows within ``gemm_tail_bytes``. ``gemm_de_in_forward``:
    where the loss's forward makes dE while the logits are at hand, and the backward only dC
    ("always", "never", or "lent": where the backward would lend dC's rows to its dE
    accumulator and compute their logits twice; elsewhere the extra pass in the forward costs
    more than it saves, measured in BENCHMARKS.md). The per-entry filter keeps
    the fused tile kernels, which skip work. With ``gemm_fused_dl`` (16-bit inputs on Hopper or
    newer, and the interpreter), the backward's logits and dl are one Triton kernel instead of a
    cuBLAS product and a pass over its fp32 result: persistent programs of ``dl_block_m`` x
    ``dl_block_c`` tiles, TMA loads of ``dl_block_k`` columns, ``dl_stages`` deep, grouped by
    ``dl_group`` token tiles. ``gemm_fused_fw`` ("always", "stats": only the forward that makes
    no dE, or "never"): the forward's logits with their statistics (and p) in one such kernel,
    with no fp32 logits buffer, on tiles ``dl_block_m`` x ``fw_fused_block_c``,
    ``fw_fused_stages`` deep, with ``fw_fused_warps`` warps. Measured on an H200
    (BENCHMARKS.md): faster than cuBLAS plus the statistics kernel for the forward alone (at
    torch.compile's forward speed), not faster where the forward also makes dE, hence "stats".
    ``dl_flatten`` / ``fw_fused_flatten``: whether the persistent kernels flatten their tile
    loop into the product's loop, so that the next tile's loads overlap the epilogue (measured
    faster than unflattened, which spills fewer registers).
    The forward may walk larger blocks of ``fw_block_n`` x ``fw_block_v`` (multiples of
    ``block_n`` and ``block_v``: more products per byte loaded) with its own ``fw_block_d`` and
    launch settings; it still records tile maxima on the ``block_n`` x ``block_v`` grid.
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    out_block_d: int = 256
    chunk_v: int = 8192
    lent_chunk_v: int = 4096
    tail_chunk_v: int = 1024
    num_warps: int = 8
    num_stages: int = 4
    mm_num_warps: int = 8
    mm_num_stages: int = 2
    target_programs: int = 1024
    max_lent_fraction: float = 0.25
    exact_block_n: int = 128
    fw_block_n: int = 128
    fw_block_v: int = 256
    fw_block_d: int = 64
    fw_num_warps: int = 8
    fw_num_stages: int = 3
    gemm: bool = True
    gemm_fw_chunk_v: int = 16384
    gemm_fw_bytes: int = 64 << 20
    gemm_chunk_v: int = 16384
    gemm_bytes: int = 64 << 20
    gemm_tail_bytes: int = 16 << 20
    gemm_stats_n: int = 32
    gemm_stats_cols: int = 512
    gemm_stats_warps: int = 8
    gemm_de_fw_bytes: int = 128 << 20
    gemm_dc_bytes: int = 128 << 20
    gemm_de_in_forward: str = "lent"
    gemm_num_warps: int = 8
    gemm_fused_dl: bool = True
    gemm_fused_fw: str = "stats"
    fw_fused_block_c: int = 256
    fw_fused_stages: int = 3
    fw_fused_warps: int = 8
    dl_block_m: int = 128
    dl_block_c: int = 256
    dl_block_k: int = 64
    dl_stages: int = 3
    dl_warps: int = 8
    dl_group: int = 8
    dl_flatten: bool = True
    fw_fused_flatten: bool = True

    def __post_init__(self) -> None:
        if self.gemm_fused_fw not in ("always", "stats", "never"):
            raise ValueError(f"gemm_fused_fw must be 'always', 'stats' or 'never', got "
                             f"{self.gemm_fused_fw!r}")
        if self.block_n % min(self.block_n, self.gemm_stats_n):
            raise ValueError(f"gemm_stats_n ({self.gemm_stats_n}) must divide block_n "
                             f"({self.block_n})")
        if self.exact_block_n % self.block_n:
            raise ValueError(f"exact_block_n ({self.exact_block_n}) must be a multiple of "
                             f"block_n ({self.block_n})")
        for fw, tile in (("fw_block_n", "block_n"), ("fw_block_v", "block_v")):
            big, small = getattr(self, fw), getattr(self, tile)
            ratio = big // small
            if big % small or ratio & (ratio - 1):
                raise ValueError(f"{fw} ({big}) must be {tile} ({small}) times a power of two")


GPU_CONFIG = BlockConfig()
# Under TRITON_INTERPRET=1 the kernels run in numpy: small tiles keep tests fast and make small
# shapes span several tiles, splits and chunks, so the masking and merging paths are exercised.
INTERPRETER_CONFIG = BlockConfig(
    block_n=16, block_v=16, block_d=16, out_block_d=16, chunk_v=64, lent_chunk_v=48,
    tail_chunk_v=32, num_warps=1, num_stages=1, mm_num_warps=1, mm_num_stages=1, target_programs=4,
    max_lent_fraction=1.0, exact_block_n=32, fw_block_n=32, fw_block_v=32, fw_block_d=16,
    fw_num_warps=1, fw_num_stages=1, gemm_fw_chunk_v=48, gemm_chunk_v=48, gemm_stats_n=8,
    gemm_stats_cols=32, gemm_stats_warps=1, gemm_num_warps=1, gemm_de_in_forward="always",
    dl_block_m=16, dl_block_c=32, dl_block_k=16, dl_stages=1, dl_warps=1, dl_group=2,
    fw_fused_block_c=32, fw_fused_stages=1, fw_fused_warps=1,
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# fp32 tiles take twice the shared memory: thinner reduction steps and fewer stages.
GPU_FP32_CONFIG = replace(GPU_CONFIG, block_d=32, out_block_d=64, fw_block_d=32)


def default_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> BlockConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    return GPU_FP32_CONFIG if dtype == torch.float32 else GPU_CONFIG


def backward_config(cfg: BlockConfig, per_entry_filter: bool) -> BlockConfig:
    """The tiles the backward walks: ``cfg``'s with the per-entry filter (whose second test
    gains from small tiles), else ``exact_block_n``-row tiles: exact, or the budget filter,
    whose verdicts are pooled onto them."""
    return cfg if per_entry_filter else replace(cfg, block_n=cfg.exact_block_n)


def dot_precision(dtype: torch.dtype) -> str:
    """How ``mma`` multiplies: a string for ``tl.dot``'s input_precision, or "upcast".

    fp32 inputs get full-precision dots unless the user allowed TF32 for matmuls. "upcast"
    (bf16 under TRITON_INTERPRET only) converts operands to fp32 first: the interpreter's bf16
    dot is wrong (triton 3.9), while fp32 products of bf16 values are exact, so the result equals
    the GPU's bf16 MMA with fp32 accumulation.
    """
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32, honouring :func:`dot_precision`."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast_out(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 -> ``dtype``, rounding to nearest even.

    The interpreter's own fp32 -> bf16 conversion does not round to nearest (triton 3.9), which
    would bias every stored gradient; so on that path the rounding is done on the bits, after
    which the conversion is exact.
    """
    if PRECISION == "upcast":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh through exp (the interpreter has no libdevice); exactly +-1 at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def finish_logits(raw, bias_ptr, offs_v, mask_v, softcap, logit_scale,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """fp32 products (rows x columns ``offs_v``) -> the logits the loss sees: times
    ``logit_scale`` (1 / temperature, in fp32), plus this shard's ``bias[offs_v]``, then
    ``softcap * tanh(z / softcap)`` (Gemma 2)."""
    z = raw
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def finish_target_logits(raw, bias_ptr, cols, mask, softcap, logit_scale,
                         HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_SCALE: tl.constexpr):
    """:func:`finish_logits` of one column per row: raw (BLOCK_N,) fp32 products at this
    shard's columns ``cols`` (BLOCK_N,)."""
    z = raw
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def logits_grad(g, z, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The gradient ``g`` of the finished logits ``z`` -> that of the bias (the softcap's
    ``1 - tanh^2 = 1 - (z / softcap)^2``), then of the products (times ``logit_scale``): the
    bias's gradient is taken before the scale, which only RL's temperature sets, without a
    bias."""
    if HAS_SOFTCAP:
        t = z / softcap
        g = g * (1.0 - t * t)
    if HAS_SCALE:
        g = g * logit_scale
    return g


@triton.jit
def local_targets(t_ptr, offs_n, mask_n, vocab_start, V):
    """Targets as int32 row indices of this slice; -1 where outside it (or masked).

    int32 keeps the (tokens x rows) comparisons with the target small in registers and in the
    shared memory of layout conversions; int64 tiles of 128 x 256 do not fit.
    """
    t = tl.load(t_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start
    return tl.where((t >= 0) & (t < V), t, -1).to(tl.int32)


@triton.jit
def logits_tile(
    e_ptr, c_ptr, offs_n, offs_v, N, V, D,
    stride_en, stride_ed, stride_cv, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 tile ``e[offs_n] @ c[offs_v].T`` of shape (BLOCK_N, BLOCK_V); out-of-range rows are 0."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_v = offs_v < V
    e_ptrs = e_ptr + offs_n.to(tl.int64)[:, None] * stride_en + offs_d[None, :] * stride_ed
    c_ptrs = c_ptr + offs_v.to(tl.int64)[None, :] * stride_cv + offs_d[:, None] * stride_cd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = offs_d < D - d0
        e = tl.load(e_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        c = tl.load(c_ptrs, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        acc = mma(e, c, acc, PRECISION)
        e_ptrs += BLOCK_D * stride_ed
        c_ptrs += BLOCK_D * stride_cd
    return acc
