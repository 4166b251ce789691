"""CCE forward and backward with cuBLAS products and Triton element-wise kernels.

On Hopper, cuBLAS runs the three products of CCE (logits ``E @ C.T``, ``dl @ C``, ``dl.T @ E``)
at 630-680 TFLOP/s, where Triton tiles that fuse the softmax into the product reach about 430.
So this engine walks the vocabulary in chunks and, for each chunk, lets cuBLAS write the fp32
logits of the chunk into a small buffer, then runs one memory-bound Triton kernel over it:

* forward: ``_chunk_pass_kernel`` folds the chunk into each token's running LSE, target logit
  (and sum of logits), and records the chunk's tile maxima (the filter's bounds); when the
  forward also makes dE, the same read writes the chunk's unnormalized probabilities for cuBLAS
  to add ``p @ C[chunk]`` into an fp32 accumulator. For 16-bit inputs on Hopper or newer, the
  forward that makes no dE computes each chunk's logits and statistics in one persistent kernel
  (``_chunk_stats_gemm_kernel``), with no logits buffer (``gemm_fused_fw``);
* backward: ``_chunk_dlogits_kernel`` turns the chunk into ``dl = (softmax - w * onehot) * scale``
  in the input dtype; then cuBLAS adds ``dl @ C[chunk]`` into an fp32 dE accumulator and writes
  ``dC[chunk] = dl.T @ E``. For 16-bit inputs on Hopper or newer, one persistent Triton kernel
  (``_chunk_dlogits_gemm_kernel``, TMA loads) computes the chunk's logits and writes dl directly,
  which is faster than cuBLAS's product plus a pass over its fp32 result, and keeps only dl in
  the workspace. The budget filter skips nothing here (the products are dense).

The N x V logits never exist: the forward holds at most ``n x fw_chunk`` fp32 logits, the
backward ``n x chunk`` fp32 logits and dl, which live (with the fp32 dE accumulator) in the
storage of dC's last rows whenever V is large enough (see ``triton_backward.workspace_split``),
so the backward's peak is the gradients themselves. The products skip no work: the per-entry
filter, whose point is to skip tiles, runs on the fused tile kernels of ``triton_forward`` /
``triton_backward`` instead. No host synchronization; the only atomics raise tile maxima.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .combine import softmax_weighted_mean
from .filtering import GradFilter
from .tiles import (
    BlockConfig,
    cast_out,
    dot_precision,
    finish_logits,
    finish_target_logits,
    local_targets,
    logits_grad,
    mma,
)
from .triton_backward import _entropy_term, workspace_split, zero_gradients

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the two-launch path
    TensorDescriptor = None



def probs_slack(dtype: torch.dtype) -> float:
    """How far (in logits) the running LSE may exceed a token's reference before the dE
    accumulator's row is rescaled: p <= e^16 is far from overflow in fp32 and bf16, and
    p <= e^8 = 2981 in fp16 (largest 65504). A lagging reference only lifts small p away from
    fp16's underflow."""
    return 8.0 if dtype == torch.float16 else 16.0


def probs_cap(dtype: torch.dtype, logit_scale: float = 1.0) -> float:
    """p is written as ``exp(min(z - ref, cap)) * logit_scale`` (times the softcap's derivative,
    at most 1), ``ref`` set by the chunks before: far from overflow (e^64 against fp32's and
    bf16's e^88; e^10 against fp16's e^11), and the rows where the cap bit are recomputed
    (``_advance_reference_kernel``). A scale above 1 lowers the cap by its log."""
    return (10.0 if dtype == torch.float16 else 64.0) - math.log(max(1.0, logit_scale))


@triton.jit
def _dlogits(raw, offs_n, offs_c, mask_n, mask_v, v0, t_ptr, bias_ptr, lse_ptr, scale_ptr,
             ent_scale_ptr, mean_ptr, V, vocab_start, target_weight, uniform_weight, softcap,
             logit_scale, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr):
    """dl (fp32) of one tile of a chunk from its fp32 products ``raw`` (tokens ``offs_n`` x the
    chunk's columns ``offs_c``, rows ``v0 + offs_c`` of this shard):
    ``(softmax - target_weight * onehot - uniform_weight) * scale`` (plus the entropy's term),
    through the softcap and the logit scale; zero outside the masks."""
    mask = mask_n[:, None] & mask_v[None, :]
    cols = v0 + offs_c
    local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    logits = finish_logits(raw, bias_ptr, cols, mask_v, softcap, logit_scale,
                           HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
    hit = (cols[None, :] == local_t[:, None]) & mask
    # uniform_weight: label smoothing's -eps / V on every logit, here only under a softcap
    # (otherwise it is rank one and added outside the kernels).
    p = tl.exp(logits - lse[:, None])
    g = (p - target_weight * hit.to(tl.float32) - uniform_weight) * scale[:, None]
    if ENTROPY:
        g += _entropy_term(ent_scale_ptr, mean_ptr, offs_n, mask_n, mask, p, logits)
    g = logits_grad(g, logits, softcap, logit_scale, HAS_SOFTCAP, HAS_SCALE)
    return tl.where(mask, g, 0.0)


@triton.jit
def _chunk_dlogits_kernel(
    logits_ptr, dl_ptr, t_ptr, bias_ptr, lse_ptr, scale_ptr, ent_scale_ptr, mean_ptr, N, V, vc,
    v0, vocab_start, target_weight, uniform_weight, softcap, logit_scale,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid: (token tiles, vocabulary tiles of the chunk). One program turns one tile of the
    chunk's fp32 logits ((N, vc) row-major) into that tile of dl ((N, vc), dl's dtype)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_c < vc
    at = offs_n.to(tl.int64)[:, None] * vc + offs_c[None, :]
    raw = tl.load(logits_ptr + at, mask=mask_n[:, None] & mask_v[None, :], other=0.0)
    g = _dlogits(raw, offs_n, offs_c, mask_n, mask_v, v0, t_ptr, bias_ptr, lse_ptr, scale_ptr,
                 ent_scale_ptr, mean_ptr, V, vocab_start, target_weight, uniform_weight,
                 softcap, logit_scale, HAS_BIAS, HAS_SOFTCAP, ENTROPY, HAS_SCALE)
    tl.store(dl_ptr + at, cast_out(g, dl_ptr.dtype.element_ty, PRECISION),
             mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def grouped_tile(tile, num_m, num_c, GROUP: tl.constexpr):
    """A persistent program's tile index -> (token tile, column tile): ``GROUP`` token tiles
    sweep the columns together, so that c's rows are reused from L2."""
    per_group = GROUP * num_c
    first_m = (tile // per_group) * GROUP
    rows = tl.minimum(num_m - first_m, GROUP)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _tma_logits(e_desc, c_desc, om, row, D, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 ``e[om:om + BLOCK_M] @ c[row:row + BLOCK_C].T`` from TMA loads, ``STAGES`` deep
    (rows past e's or c's end load as zeros)."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k in tl.range(0, D, BLOCK_K, num_stages=STAGES):
        acc = mma(e_desc.load([om, k]), c_desc.load([row, k]).T, acc, PRECISION)
    return acc


@triton.jit
def _chunk_dlogits_gemm_kernel(
    e_desc, c_desc, dl_desc, t_ptr, bias_ptr, lse_ptr, scale_ptr, ent_scale_ptr, mean_ptr, N,
    V, D, vc, v0, vocab_start, target_weight, uniform_weight, softcap, logit_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    STAGES: tl.constexpr, FLATTEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid: (programs,), persistent. Each program walks tiles of ``BLOCK_M`` tokens x
    ``BLOCK_C`` rows of the chunk ``[v0, v0 + vc)`` (grouped by ``GROUP`` token tiles, so
    that c's rows are reused from L2), multiplies ``e @ c.T`` from TMA loads into fp32, and
    stores that tile of dl (:func:`_dlogits`) through ``dl_desc`` ((N, vc), dl's dtype): the
    chunk's fp32 logits never reach memory. Loads past e's or c's rows are zeros, and stores
    past dl's shape are dropped."""
    num_m = tl.cdiv(N, BLOCK_M)
    num_c = tl.cdiv(vc, BLOCK_C)
    for tile in tl.range(tl.program_id(0), num_m * num_c, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_c = grouped_tile(tile, num_m, num_c, GROUP)
        om = pid_m * BLOCK_M
        oc = pid_c * BLOCK_C
        acc = _tma_logits(e_desc, c_desc, om, v0 + oc, D, BLOCK_M, BLOCK_C, BLOCK_K, STAGES,
                          PRECISION)
        offs_n = om + tl.arange(0, BLOCK_M)
        offs_c = oc + tl.arange(0, BLOCK_C)
        g = _dlogits(acc, offs_n, offs_c, offs_n < N, offs_c < vc, v0, t_ptr, bias_ptr,
                     lse_ptr, scale_ptr, ent_scale_ptr, mean_ptr, V, vocab_start, target_weight,
                     uniform_weight, softcap, logit_scale, HAS_BIAS, HAS_SOFTCAP, ENTROPY,
                     HAS_SCALE)
        dl_desc.store([om, oc], cast_out(g, dl_desc.dtype, PRECISION))


@triton.jit
def _chunk_pass_kernel(
    logits_ptr, t_ptr, bias_ptr, lse_ptr, tgt_ptr, zsum_ptr, tile_max_ptr, p_ptr, ref_ptr,
    resid_ptr, N, V, vc, v0, vocab_start, num_v_tiles, first, softcap, logit_scale, cap,
    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, BLOCK_V: tl.constexpr, COLS: tl.constexpr,
    SUM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    MEAN_LOGIT: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr, PROBS: tl.constexpr,
    ROUNDED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid: (token blocks of BLOCK_N, column groups of COLS). One program reads one token
    block's COLS columns of the chunk (fp32 logits, (N, vc) row-major) once and:

    * ``STATS``: folds them into row ``pid_s`` of the running statistics ((splits, N): LSE,
      target logit, sum of logits) and raises the maxima of the (TILE_N x BLOCK_V) tiles they
      lie in (BLOCK_N divides TILE_N; the maxima start at -inf);
    * ``PROBS``: writes ``exp(min(z - ref, cap))`` times dz/dproduct into p ((N, vc), p's dtype),
      ``ref`` (N,) each token's reference from the chunks before (see
      ``_advance_reference_kernel``, which repairs the rows where ``cap`` bit). With ``ROUNDED``
      (p in 16 bits) it keeps, for the token whose target column it holds, what rounding took
      from the target's p (``resid`` (2, N): the value, and the reference it is scaled to): with
      p_t near 1, dE's target term ``(p_t - 1) c_t`` would otherwise be lost in p_t's rounding.

    The loop does only what every logit needs (a max, two exponentials, a store); the target
    logit is gathered once per token after it."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_at = offs_n.to(tl.int64)[:, None] * vc
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PROBS:
        ref = tl.load(ref_ptr + offs_n, mask=mask_n, other=0.0)
    c_begin = pid_s * COLS
    c_end = tl.minimum(c_begin + COLS, vc)
    for c0 in range(c_begin, c_end, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        mask_v = offs_c < vc
        mask = mask_n[:, None] & mask_v[None, :]
        logits = tl.load(logits_ptr + row_at + offs_c[None, :], mask=mask, other=float("-inf"))
        if HAS_BIAS or HAS_SOFTCAP or HAS_SCALE:
            logits = finish_logits(logits, bias_ptr, v0 + offs_c, mask_v, softcap,
                                   logit_scale, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
            logits = tl.where(mask, logits, float("-inf"))
        if STATS:
            row_max = tl.max(logits, axis=1)
            tl.atomic_max(tile_max_ptr + (pid_n * BLOCK_N // TILE_N) * num_v_tiles
                          + (v0 + c0) // BLOCK_V,
                          tl.max(tl.where(mask_n, row_max, float("-inf")), axis=0))
            m_new = tl.maximum(m, row_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N
            rescale = tl.exp(m - m_safe)
            e_z = tl.exp(logits - m_safe[:, None])
            s = s * rescale + tl.sum(e_z, axis=1)
            m = m_new
            if SUM_LOGITS:
                zsum += tl.sum(tl.where(mask, logits, 0.0), axis=1)
            if MEAN_LOGIT:  # sum_j exp(z_j - m) z_j, rescaled with s
                zsum = zsum * rescale + tl.sum(e_z * tl.where(mask, logits, 0.0), axis=1)
        if PROBS:
            g = logits_grad(tl.exp(tl.minimum(logits - ref[:, None], cap)), logits, softcap,
                            logit_scale, HAS_SOFTCAP, HAS_SCALE)
            g = tl.where(mask, g, 0.0)
            tl.store(p_ptr + row_at + offs_c[None, :],
                     cast_out(g, p_ptr.dtype.element_ty, PRECISION), mask=mask)
    # Each token's target is one column: gathered once here, not compared in every tile.
    local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
    has = (local_t >= v0 + c_begin) & (local_t < v0 + c_end)
    col = tl.where(has, local_t - v0, 0)
    z_t = tl.load(logits_ptr + offs_n.to(tl.int64) * vc + col, mask=has, other=0.0)
    z_t = finish_target_logits(z_t, bias_ptr, local_t, has, softcap, logit_scale, HAS_BIAS,
                               HAS_SOFTCAP, HAS_SCALE)
    tgt = tl.where(has, z_t, 0.0)
    if PROBS and ROUNDED:
        # What rounding took from the target's p: its fp32 value again (equal up to an fp32
        # rounding) minus what this program stored (visible to all its threads after the
        # barrier).
        tl.debug_barrier()
        held = tl.load(p_ptr + offs_n.to(tl.int64) * vc + col, mask=has, other=0.0)
        g_t = logits_grad(tl.exp(tl.minimum(z_t - ref, cap)), z_t, softcap, logit_scale,
                          HAS_SOFTCAP, HAS_SCALE)
        tl.store(resid_ptr + offs_n, g_t - held.to(tl.float32), mask=has)
        tl.store(resid_ptr + N + offs_n, ref, mask=has)
    if STATS:
        s = tl.where(mask_n, s, 1.0)
        if MEAN_LOGIT:
            zsum = tl.where(s > 0, zsum / s, 0.0)  # softmax-weighted mean over these columns
        _fold_split(lse_ptr, tgt_ptr, zsum_ptr, pid_s * N + offs_n, mask_n, m + tl.log(s), tgt,
                    zsum, first, SUM_LOGITS, MEAN_LOGIT)


@triton.jit
def _fold_split(lse_ptr, tgt_ptr, zsum_ptr, at, mask_n, lse, tgt, zsum, first,
                SUM_LOGITS: tl.constexpr, MEAN_LOGIT: tl.constexpr):
    """Folds one column group's statistics of a chunk (LSE, target logit, and the sum of logits
    or their softmax-weighted mean) into the running ones at ``at`` (one split's row), or
    stores them there for the ``first`` chunk. Columns whose logits are all -inf (a bias
    masking them) leave the running values as they are."""
    if first:
        tl.store(lse_ptr + at, lse, mask=mask_n)
        tl.store(tgt_ptr + at, tgt, mask=mask_n)
        if SUM_LOGITS or MEAN_LOGIT:
            tl.store(zsum_ptr + at, zsum, mask=mask_n)
    else:
        old = tl.load(lse_ptr + at, mask=mask_n, other=0.0)
        top = tl.maximum(old, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_old, w_new = tl.exp(old - top), tl.exp(lse - top)
        tl.store(lse_ptr + at, top + tl.log(w_old + w_new), mask=mask_n)
        tl.store(tgt_ptr + at, tgt + tl.load(tgt_ptr + at, mask=mask_n, other=0.0), mask=mask_n)
        if SUM_LOGITS:
            tl.store(zsum_ptr + at, zsum + tl.load(zsum_ptr + at, mask=mask_n, other=0.0),
                     mask=mask_n)
        if MEAN_LOGIT:
            prev = tl.load(zsum_ptr + at, mask=mask_n, other=0.0)
            both = w_old + w_new
            tl.store(zsum_ptr + at, tl.where(both > 0, (w_old * prev + w_new * zsum) / both, prev),
                     mask=mask_n)


@triton.jit
def _chunk_stats_gemm_kernel(
    e_desc, c_desc, p_desc, t_ptr, bias_ptr, lse_ptr, tgt_ptr, zsum_ptr, tile_max_ptr, ref_ptr,
    resid_ptr, N, V, D, vc, v0, vocab_start, num_n_tiles, num_v_tiles, softcap, logit_scale,
    cap, FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    STAGES: tl.constexpr, FLATTEN: tl.constexpr, TILE_N: tl.constexpr, TILE_V: tl.constexpr,
    SUM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    MEAN_LOGIT: tl.constexpr, HAS_SCALE: tl.constexpr, STATS: tl.constexpr, PROBS: tl.constexpr,
    ROUNDED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid: (programs,), persistent; the forward's counterpart of
    ``_chunk_dlogits_gemm_kernel``. Each program walks tiles of ``BLOCK_M`` tokens x ``BLOCK_C``
    rows of the chunk ``[v0, v0 + vc)``, multiplies ``e @ c.T`` from TMA loads into fp32 and,
    from registers (the chunk's logits never reach memory):

    * ``STATS``: folds the tile into split ``pid_c`` (its column tile) of the running statistics
      ((splits, N): LSE, target logit, sum or mean of logits; :func:`_fold_split`) and raises
      the maxima of the ``TILE_N`` x ``TILE_V`` tiles it covers;
    * ``PROBS``: stores p (as ``_chunk_pass_kernel``, under the reference ``ref`` (N,)) through
      ``p_desc`` ((N, vc), p's dtype), and with ``ROUNDED`` what rounding took from the target's
      p (``resid`` (2, N)).

    One exponential per logit serves both: ``exp(z - m)``, ``m`` the row's largest logit in
    the tile; p is that times ``exp(min(m - ref, cap))``, equal to ``exp(z - ref)`` unless the
    cap bites. There p is not clamped entry by entry, but the row is recomputed anyway
    (``_advance_reference_kernel``, which subtracts what p held). Where ``exp(z - m)``
    underflows, ``exp(z - lse)`` does too (the LSE is at least ``m``)."""
    num_m = tl.cdiv(N, BLOCK_M)
    num_c = tl.cdiv(vc, BLOCK_C)
    SUB_M: tl.constexpr = BLOCK_M // TILE_N
    SUB_C: tl.constexpr = BLOCK_C // TILE_V
    for tile in tl.range(tl.program_id(0), num_m * num_c, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_c = grouped_tile(tile, num_m, num_c, GROUP)
        om = pid_m * BLOCK_M
        oc = pid_c * BLOCK_C
        acc = _tma_logits(e_desc, c_desc, om, v0 + oc, D, BLOCK_M, BLOCK_C, BLOCK_K, STAGES,
                          PRECISION)
        offs_n = om + tl.arange(0, BLOCK_M)
        offs_c = oc + tl.arange(0, BLOCK_C)
        mask_n = offs_n < N
        mask_v = offs_c < vc
        mask = mask_n[:, None] & mask_v[None, :]
        logits = finish_logits(acc, bias_ptr, v0 + offs_c, mask_v, softcap, logit_scale,
                               HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
        logits = tl.where(mask, logits, float("-inf"))
        row_max = tl.max(logits, axis=1)
        m = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows past N, masked columns
        local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
        hit = ((v0 + offs_c)[None, :] == local_t[:, None]) & mask
        # What needs the logits themselves comes before their exponentials: a 128 x 256 tile
        # holds 128 values per thread, and two such tiles live at once spill registers.
        if STATS:
            # The tile maxima: a reshape that splits the columns' highest bits, which the
            # product's layout does in registers.
            tile_n = om // TILE_N + tl.arange(0, SUB_M)
            sub_v = tl.arange(0, SUB_C)
            cols_max = tl.max(tl.reshape(logits, (BLOCK_M, SUB_C, TILE_V)), axis=2)
            sub = tl.max(tl.reshape(cols_max, (SUB_M, TILE_N, SUB_C)), axis=1)
            tgt = tl.sum(tl.where(hit, logits, 0.0), axis=1)
            zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if SUM_LOGITS:
                zsum = tl.sum(tl.where(mask, logits, 0.0), axis=1)
        e_z = tl.exp(logits - m[:, None])
        if STATS:
            s = tl.sum(e_z, axis=1)
            if MEAN_LOGIT:
                zsum = tl.sum(e_z * tl.where(mask, logits, 0.0), axis=1)
                zsum = tl.where(s > 0, zsum / s, 0.0)
            _fold_split(lse_ptr, tgt_ptr, zsum_ptr, pid_c * N + offs_n, mask_n, m + tl.log(s),
                        tgt, zsum, FIRST, SUM_LOGITS, MEAN_LOGIT)
            tl.atomic_max(tile_max_ptr + tile_n[:, None] * num_v_tiles + (v0 + oc) // TILE_V
                          + sub_v[None, :], sub, mask=(tile_n < num_n_tiles)[:, None]
                          & (oc + sub_v * TILE_V < vc)[None, :])
        if PROBS:
            ref = tl.load(ref_ptr + offs_n, mask=mask_n, other=0.0)
            g = logits_grad(e_z * tl.exp(tl.minimum(m - ref, cap))[:, None], logits, softcap,
                            logit_scale, HAS_SOFTCAP, HAS_SCALE)
            if ROUNDED:  # the target's g before p replaces g (two tiles live at once spill)
                g_t = tl.sum(tl.where(hit, g, 0.0), axis=1)
            p = cast_out(tl.where(mask, g, 0.0), p_desc.dtype, PRECISION)
            p_desc.store([om, oc], p)
            if ROUNDED:
                has = mask_n & (local_t >= v0 + oc) & (local_t < v0 + tl.minimum(oc + BLOCK_C, vc))
                # Sums of one entry each: exact.
                lost = g_t - tl.sum(tl.where(hit, p.to(tl.float32), 0.0), axis=1)
                tl.store(resid_ptr + offs_n, lost, mask=has)
                tl.store(resid_ptr + N + offs_n, ref, mask=has)


@triton.jit
def _advance_reference_kernel(
    acc_ptr, ref_ptr, lse_ptr, logits_ptr, p_ptr, e_ptr, c_ptr, bias_ptr, t_ptr, resid_ptr,
    N, D, V, vc, ld, v0, vocab_start, stride_en, stride_ed, stride_cv, stride_cd, splits,
    softcap, logit_scale, slack, cap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, FIRST: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    RECOMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid: (token blocks of BLOCK_N,). One program owns BLOCK_N tokens' rows of the dE
    accumulator ((N, D) fp32) after a chunk's product was added to it, and sets their
    reference ``ref`` (N,) for the next chunk: the running LSE ((splits, N), which bounds every
    logit seen so far) where it exceeds the old one by more than ``slack``, with the row of the
    accumulator rescaled by exp(old - new) (flash attention's online rescaling, done rarely).
    Where it exceeds it by nearly ``cap``, the chunk's p may have been clamped: the row's share
    of the chunk is recomputed under the new reference, in fp32, minus what the 16-bit p
    ((N, vc), row stride ``ld``) held (the rare repair of a logit far above every earlier
    chunk's). Its logits come from the chunk's fp32 logits ((N, vc)), or with ``RECOMPUTE``
    (the fused forward, which keeps none) from ``e @ c.T`` again. ``FIRST``: the first chunk's
    reference, before any p."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    bound = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for s in range(0, splits):
        bound = tl.maximum(bound, tl.load(lse_ptr + s * N + offs_n, mask=mask_n,
                                          other=float("-inf")))
    if FIRST:  # finite even where every logit so far is -inf (a bias masking the rows)
        tl.store(ref_ptr + offs_n, tl.where(bound > float("-inf"), bound, 0.0), mask=mask_n)
    else:
        old = tl.load(ref_ptr + offs_n, mask=mask_n, other=0.0)
        # Clamped p needs z - old > cap, and z <= bound: the rows to repair, and a margin for
        # rounding (a row repaired needlessly only costs time). A repaired row is a raised one.
        repair = mask_n & (bound > old + (cap - 1.0))
        raised = mask_n & ((bound > old + slack) | repair)
        ref = tl.where(raised, bound, old)
        if tl.max(raised.to(tl.int32), axis=0) > 0:
            tl.store(ref_ptr + offs_n, ref, mask=raised)
            factor = tl.where(raised, tl.exp(old - ref), 1.0)
            acc_rows = acc_ptr + offs_n.to(tl.int64)[:, None] * D
            fix = tl.max(repair.to(tl.int32), axis=0) > 0
            if RECOMPUTE:
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    mask = raised[:, None] & (offs_d < D)[None, :]
                    acc = tl.load(acc_rows + offs_d[None, :], mask=mask, other=0.0)
                    tl.store(acc_rows + offs_d[None, :], acc * factor[:, None], mask=mask)
                tl.debug_barrier()  # the repair below reads these rows in another layout
                if fix:  # chunk by chunk of columns: their logits once, then into every column
                    e_rows = e_ptr + offs_n.to(tl.int64)[:, None] * stride_en
                    for c0 in range(0, vc, BLOCK_V):
                        offs_c = c0 + tl.arange(0, BLOCK_V)
                        mask_v = offs_c < vc
                        c_rows = c_ptr + (v0 + offs_c).to(tl.int64)[:, None] * stride_cv
                        z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
                        for k0 in range(0, D, BLOCK_D):
                            offs_k = k0 + tl.arange(0, BLOCK_D)
                            mask_k = offs_k < D
                            e_blk = tl.load(e_rows + offs_k[None, :] * stride_ed,
                                            mask=repair[:, None] & mask_k[None, :], other=0.0)
                            c_blk = tl.load(c_rows + offs_k[None, :] * stride_cd,
                                            mask=mask_v[:, None] & mask_k[None, :], other=0.0)
                            z = mma(e_blk, c_blk.T, z, PRECISION)
                        x = _repaired_share(z, p_ptr, offs_n, offs_c, repair, mask_v, ld, v0,
                                            bias_ptr, ref, factor, softcap, logit_scale,
                                            HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
                        for d0 in range(0, D, BLOCK_D):
                            offs_d = d0 + tl.arange(0, BLOCK_D)
                            mask_d = offs_d < D
                            mask = repair[:, None] & mask_d[None, :]
                            c_blk = tl.load(c_rows + offs_d[None, :] * stride_cd,
                                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                            acc = tl.load(acc_rows + offs_d[None, :], mask=mask, other=0.0)
                            acc = tl.dot(x, c_blk.to(tl.float32), acc, input_precision="ieee")
                            tl.store(acc_rows + offs_d[None, :], acc, mask=mask)
            else:
                row_at = offs_n.to(tl.int64)[:, None] * vc
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    mask_d = offs_d < D
                    mask = raised[:, None] & mask_d[None, :]
                    acc = tl.load(acc_rows + offs_d[None, :], mask=mask, other=0.0)
                    acc = acc * factor[:, None]
                    if fix:
                        for c0 in range(0, vc, BLOCK_V):
                            offs_c = c0 + tl.arange(0, BLOCK_V)
                            mask_v = offs_c < vc
                            z = tl.load(logits_ptr + row_at + offs_c[None, :],
                                        mask=repair[:, None] & mask_v[None, :], other=0.0)
                            x = _repaired_share(z, p_ptr, offs_n, offs_c, repair, mask_v, ld,
                                                v0, bias_ptr, ref, factor, softcap,
                                                logit_scale, HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
                            c_rows = c_ptr + (v0 + offs_c).to(tl.int64)[:, None] * stride_cv
                            c_blk = tl.load(c_rows + offs_d[None, :] * stride_cd,
                                            mask=mask_v[:, None] & mask_d[None, :], other=0.0)
                            acc = tl.dot(x, c_blk.to(tl.float32), acc, input_precision="ieee")
                    tl.store(acc_rows + offs_d[None, :], acc, mask=mask)
            # The repaired share is exact in fp32: no rounding of the target's p to carry.
            local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
            inside = repair & (local_t >= v0) & (local_t < v0 + vc)
            tl.store(resid_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=inside)


@triton.jit
def _repaired_share(raw, p_ptr, offs_n, offs_c, repair, mask_v, ld, v0, bias_ptr, ref, factor,
                    softcap, logit_scale, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    """What the rows to ``repair`` of one block of a chunk's columns add to the rescaled dE
    accumulator: their exact p under the new reference ``ref``, from the fp32 products ``raw``,
    minus what the 16-bit p ((N, vc), row stride ``ld``) held, rescaled by ``factor``."""
    mask_z = repair[:, None] & mask_v[None, :]
    z = finish_logits(raw, bias_ptr, v0 + offs_c, mask_v, softcap, logit_scale, HAS_BIAS,
                      HAS_SOFTCAP, HAS_SCALE)
    exact = logits_grad(tl.exp(z - ref[:, None]), z, softcap, logit_scale, HAS_SOFTCAP,
                        HAS_SCALE)
    held = tl.load(p_ptr + offs_n.to(tl.int64)[:, None] * ld + offs_c[None, :], mask=mask_z,
                   other=0.0).to(tl.float32)
    return tl.where(mask_z, exact - factor[:, None] * held, 0.0)


@triton.jit
def _finish_de_kernel(
    acc_ptr, ref_ptr, resid_ptr, lse_ptr, tgt_ptr, coef_ptr, t_ptr, c_ptr, de_ptr, N, D, V,
    vocab_start, stride_cv, target_weight, softcap, logit_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid: (token blocks, column blocks of D). One program owns a (BLOCK_N, BLOCK_D) block of
    dE: ``coef * (acc * exp(ref - lse) + (lost - target_weight * dz_t/dproduct) * c[t])``, the
    target term only where this shard holds the target (``lost``: what p_t's rounding took,
    ``resid`` of the probabilities kernel, under the LSE)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    ref = tl.load(ref_ptr + offs_n, mask=mask_n, other=0.0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    at = offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    de = tl.load(acc_ptr + at, mask=mask, other=0.0) * tl.exp(ref - lse)[:, None]
    local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
    owned = local_t >= 0
    z_t = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0.0)
    w = logits_grad(tl.where(owned, target_weight, 0.0), z_t, softcap, logit_scale,
                    HAS_SOFTCAP, HAS_SCALE)
    lost = tl.load(resid_ptr + offs_n, mask=mask_n, other=0.0)
    lost_ref = tl.load(resid_ptr + N + offs_n, mask=mask_n, other=float("-inf"))
    w -= tl.where(owned, lost * tl.exp(lost_ref - lse), 0.0)
    rows = tl.where(owned, local_t, 0).to(tl.int64)
    c_t = tl.load(c_ptr + rows[:, None] * stride_cv + offs_d[None, :], mask=mask & owned[:, None],
                  other=0.0).to(tl.float32)
    de = (de - w[:, None] * c_t) * coef[:, None]
    tl.store(de_ptr + at, cast_out(de, de_ptr.dtype.element_ty, PRECISION), mask=mask)


def supported(e: torch.Tensor) -> bool:
    """Whether this torch can run the engine on ``e``'s device and dtype: 16-bit products with
    an fp32 result need ``torch.mm(..., out_dtype=)`` on CUDA (torch >= 2.8)."""
    if e.dtype == torch.float32 or not e.is_cuda:
        return True
    return hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def fused_dlogits(e: torch.Tensor, c: torch.Tensor, cfg: BlockConfig,
                  pointers: bool = True) -> bool:
    """Whether the backward computes each chunk's logits and dl in one kernel
    (``_chunk_dlogits_gemm_kernel``): :func:`_tma_operands`, and a D whose fp32 rows keep the
    workspace's dl aligned after the dE accumulator."""
    return cfg.gemm_fused_dl and (e.shape[1] * 4) % 16 == 0 and _tma_operands(
        e, c, cfg, (cfg.dl_stages, cfg.dl_block_c), pointers)


def fused_forward(e: torch.Tensor, c: torch.Tensor, cfg: BlockConfig, with_de: bool) -> bool:
    """Whether the forward (``with_de``: the one that makes dE) computes each chunk's logits
    with their statistics and p in one kernel (``_chunk_stats_gemm_kernel``): as
    ``cfg.gemm_fused_fw`` says, on :func:`_tma_operands`, with the kernel's tiles made of
    whole tiles of the filter's grid."""
    wanted = cfg.gemm_fused_fw == "always" or (cfg.gemm_fused_fw == "stats" and not with_de)
    return (wanted and cfg.dl_block_m % cfg.block_n == 0
            and cfg.fw_fused_block_c % cfg.block_v == 0
            and _tma_operands(e, c, cfg, (cfg.fw_fused_stages, cfg.fw_fused_block_c)))


def _tma_operands(e: torch.Tensor, c: torch.Tensor, cfg: BlockConfig, tiles: tuple[int, int],
                  pointers: bool = True) -> bool:
    """16-bit e and c whose rows TMA can load (16-byte aligned starts and strides), on a GPU
    with TMA (Hopper or newer) and the shared memory of a fused kernel's ``tiles`` (stages,
    columns), or the interpreter. Without ``pointers`` the starts are not looked at (under
    torch.compile's tracing, which has none)."""
    if TensorDescriptor is None or e.dtype not in (torch.bfloat16, torch.float16) or (
            c.dtype != e.dtype):
        return False
    if e.is_cuda and not _tma_tiles_fit(e.device, cfg, e.element_size(), *tiles):
        return False
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               and (not pointers or t.data_ptr() % 16 == 0) for t in (e, c))


def _tma_tiles_fit(device: torch.device, cfg: BlockConfig, itemsize: int, stages: int,
                   block_c: int) -> bool:
    """TMA (compute capability >= 9) and shared memory for a fused kernel's pipelined operand
    tiles (``stages`` of ``dl_block_m`` + ``block_c`` rows) and its output tile (consumer
    Blackwell has about 99 KB, not 227)."""
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    bm, bk = cfg.dl_block_m, cfg.dl_block_k
    need = itemsize * (stages * (bm + block_c) * bk + bm * block_c)
    have = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin",
                   None)
    if have is None:  # an older torch: ask triton's driver
        index = device.index if device.index is not None else torch.cuda.current_device()
        have = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return have >= need


def _dl_entry_bytes(fused: bool, itemsize: int) -> int:
    """Bytes per (token, row) of a backward chunk's buffers: dl, plus the fp32 logits unless
    the chunk's kernel is fused."""
    return itemsize if fused else 4 + itemsize


def _num_programs(device: torch.device) -> int:
    """Persistent programs: one per multiprocessor (2 under the interpreter, so that programs
    walk several tiles)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out (fp32) = a @ b`` (``+= a @ b`` with ``accumulate``): products in the inputs' dtype,
    fp32 accumulation and result, one cuBLAS call."""
    if a.dtype == torch.float32:  # TF32 or not, as torch.backends.cuda.matmul says
        torch.addmm(out, a, b, out=out) if accumulate else torch.mm(a, b, out=out)
    elif a.is_cuda:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:  # CPU (the interpreter's tests): fp32 products of 16-bit values are exact
        product = a.float() @ b.float()
        out.add_(product) if accumulate else out.copy_(product)


def _mm_cast(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` in ``out``'s dtype (the inputs'), accumulated in fp32."""
    if a.is_cuda or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.float() @ b.float())


def _chunk_rows(n: int, limit_bytes: int, chunk: int, block_v: int, v: int,
                itemsize: int = 4) -> int:
    """Vocabulary rows per chunk: ``chunk``, fewer if n x chunk values of ``itemsize`` bytes
    exceed the limit, a multiple of ``block_v``, and no more than V needs."""
    rows = min(chunk, max(block_v, limit_bytes // max(1, itemsize * n)))
    return max(block_v, min(rows, triton.cdiv(v, block_v) * block_v) // block_v * block_v)


def _lent_split(n: int, d: int, v: int, itemsize: int, cfg: BlockConfig, fused: bool) -> int:
    """The backward's first row of dC lent to its workspace when it computes dE (v: none)."""
    chunk = _chunk_rows(n, cfg.gemm_bytes, cfg.gemm_chunk_v, cfg.block_v, v)
    return workspace_split(n, d, v, chunk, cfg.block_v, itemsize, cfg.max_lent_fraction,
                           chunk_itemsize=_dl_entry_bytes(fused, itemsize))


def backward_lends_rows(n: int, d: int, v: int, itemsize: int, cfg: BlockConfig,
                        fused: bool) -> bool:
    """Whether a backward that computes dE would lend rows of dC to its workspace (and compute
    their logits twice): where making dE in the forward pays (``gemm_de_in_forward="lent"``).
    ``fused``: whether its chunks run :func:`fused_dlogits` (no fp32 logits in the workspace)."""
    return 0 < n and _lent_split(n, d, v, itemsize, cfg, fused) < v


def forward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    cfg: BlockConfig,
    sum_logits: bool = False,
    softcap: float = 0.0,
    bias: torch.Tensor | None = None,
    mean_logit: bool = False,
    logit_scale: float = 1.0,
    with_de: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Same contract as ``triton_forward.forward``: e (N, D), c (V, D), targets (N,) global ids
    -> ``(lse, target_logit, tile_max, logit_sum)``, fp32, tile maxima on ``cfg.block_n`` x
    ``cfg.block_v`` tiles; all of the finished logits (plus ``bias`` (V,), then capped by
    ``softcap`` when it is > 0).

    ``with_de`` adds ``(acc, ref, resid)``: the softmax half of dE, unnormalized, while the
    logits are at hand (one more product per chunk, which the backward then skips): ``acc``
    (N, D) fp32 holds ``sum_j exp(z_j - ref) dz_j/dproduct c_j`` and ``ref`` (N,) fp32 the
    reference each row is scaled to, raised as larger logits appear (flash attention's online
    rescaling, done only when the running LSE exceeds the reference by more than
    :func:`probs_slack`); ``resid`` (2, N) fp32 what the 16-bit rounding of each target's p took
    (see ``_chunk_pass_kernel``). :func:`finish_de` turns them into dE once the global LSE is
    known. Each chunk's logits are read (fused: computed) once for the statistics and p together
    (p under the reference the chunks before set), the first chunk's twice. Its chunks hold
    ``cfg.gemm_de_fw_bytes`` of fp32 logits: larger ones pass the accumulator through memory
    fewer times."""
    n, v = e.shape[0], c.shape[0]
    bn, bv = cfg.block_n, cfg.block_v
    targets = targets.contiguous()
    tile_max = torch.full((triton.cdiv(n, bn), triton.cdiv(v, bv)), float("-inf"),
                          dtype=torch.float32, device=e.device)
    if n == 0 or v == 0:
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=e.device)
        zsum = torch.zeros((n if sum_logits or mean_logit else 0,), dtype=torch.float32,
                           device=e.device)
        out = (lse, torch.zeros((n,), dtype=torch.float32, device=e.device), tile_max, zsum)
        if with_de:
            out += (torch.zeros(e.shape, dtype=torch.float32, device=e.device),
                    torch.full((n,), float("-inf"), dtype=torch.float32, device=e.device),
                    _no_residual(n, e.device))
        return out
    fused = fused_forward(e, c, cfg, with_de)
    # Fused, the chunks are the same with dE and without (with gemm_fused_fw="always", the same
    # statistics bit for bit), whole column tiles of the kernel.
    chunk = _chunk_rows(n, cfg.gemm_de_fw_bytes if with_de or fused else cfg.gemm_fw_bytes,
                        cfg.gemm_fw_chunk_v, bv, v)
    if fused and chunk < v:
        chunk = max(cfg.fw_fused_block_c, chunk // cfg.fw_fused_block_c * cfg.fw_fused_block_c)
    # Running statistics per column group (a column tile of the fused kernel): the first chunk
    # has the most groups.
    cols = cfg.fw_fused_block_c if fused else max(bv, cfg.gemm_stats_cols // bv * bv)
    stats_n = min(bn, cfg.gemm_stats_n)
    splits = triton.cdiv(min(chunk, v), cols)
    extra = sum_logits or mean_logit
    stats = torch.empty((3 if extra else 2, splits, n), dtype=torch.float32,
                        device=e.device)
    buf = None if fused else torch.empty((n * chunk,), dtype=torch.float32, device=e.device)
    if with_de:
        acc = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        ref = torch.full((n,), float("-inf"), dtype=torch.float32, device=e.device)
        resid = _no_residual(n, e.device)
        p_buf = torch.empty((n * chunk,), dtype=e.dtype, device=e.device)
    else:
        acc = ref = resid = p_buf = None
    flags = dict(SUM_LOGITS=sum_logits, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
                 MEAN_LOGIT=mean_logit, HAS_SCALE=logit_scale != 1.0,
                 ROUNDED=e.dtype != torch.float32, PRECISION=dot_precision(e.dtype))
    scalars = (float(softcap), float(logit_scale), probs_cap(e.dtype, logit_scale))
    if fused:
        bm, bc, bk = cfg.dl_block_m, cfg.fw_fused_block_c, cfg.dl_block_k
        e_desc = TensorDescriptor.from_tensor(e, [bm, bk])
        c_desc = TensorDescriptor.from_tensor(c, [bc, bk])
        programs = _num_programs(e.device)

    def chunk_pass(logits, vc, v0, stats_on, p=None):
        """The statistics (``stats_on``) and/or p (given ``p``) of one chunk, under ``ref``;
        fused: the chunk's logits are computed here (``logits`` is None)."""
        first = int(v0 == 0)
        outputs = (targets, tile_max if bias is None else bias, stats[0], stats[1], stats[-1],
                   tile_max)
        if fused:
            p_desc = (no_p if p is None else
                      TensorDescriptor(p, [n, vc], [chunk, 1], [bm, bc]))
            _chunk_stats_gemm_kernel[(min(programs, triton.cdiv(n, bm) * triton.cdiv(vc, bc)),)](
                e_desc, c_desc, p_desc, *outputs, tile_max if p is None else ref,
                resid if with_de else tile_max, n, v, d, vc, v0, vocab_start, tile_max.shape[0],
                tile_max.shape[1], *scalars, FIRST=bool(first), BLOCK_M=bm, BLOCK_C=bc,
                BLOCK_K=bk, GROUP=cfg.dl_group, STAGES=cfg.fw_fused_stages,
                FLATTEN=cfg.fw_fused_flatten, TILE_N=bn, TILE_V=bv, STATS=stats_on,
                PROBS=p is not None, **flags, num_warps=cfg.fw_fused_warps,
            )
            return
        _chunk_pass_kernel[(triton.cdiv(n, stats_n), triton.cdiv(vc, cols))](
            logits, *outputs, logits if p is None else p, tile_max if p is None else ref,
            resid if with_de else tile_max, n, v, vc, v0, vocab_start, tile_max.shape[1], first,
            *scalars, BLOCK_N=stats_n, TILE_N=bn, BLOCK_V=bv, COLS=cols, STATS=stats_on,
            PROBS=p is not None, **flags, num_warps=cfg.gemm_stats_warps,
        )

    def advance(logits, p, vc, v0, first):
        _advance_reference_kernel[(triton.cdiv(n, bn),)](
            acc, ref, stats[0], p if logits is None else logits, p, e, c,
            tile_max if bias is None else bias, targets, resid, n, d, v, vc,
            chunk if fused else vc, v0, vocab_start, e.stride(0), e.stride(1), c.stride(0),
            c.stride(1), splits, float(softcap), float(logit_scale), probs_slack(e.dtype),
            probs_cap(e.dtype, logit_scale), BLOCK_N=bn,
            BLOCK_V=min(bv, 32) if e.is_cuda else bv, BLOCK_D=min(cfg.out_block_d, 128),
            FIRST=first, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
            HAS_SCALE=logit_scale != 1.0, RECOMPUTE=fused, PRECISION=flags["PRECISION"],
            num_warps=4,
        )

    d = e.shape[1]
    if fused:  # where only the statistics are written: a descriptor of one tile, never used
        no_p = TensorDescriptor.from_tensor(
            torch.empty((bm, bc), dtype=e.dtype, device=e.device), [bm, bc])
    for v0 in range(0, v, chunk):
        vc = min(chunk, v - v0)
        if fused:
            logits = None
        else:
            logits = buf[: n * vc].view(n, vc)
            _mm_fp32(e, c[v0:v0 + vc].t(), logits, accumulate=False)
        if not with_de:
            chunk_pass(logits, vc, v0, True)
            continue
        # One read of the logits makes the statistics and p under the reference of the chunks
        # before; the first chunk, which has none, is read (fused: computed) twice. p's rows
        # are ``chunk`` apart when fused (TMA needs 16-byte strides), else vc.
        p = p_buf[: n * chunk].view(n, chunk)[:, :vc] if fused else p_buf[: n * vc].view(n, vc)
        if v0 == 0:
            chunk_pass(logits, vc, v0, True)
            advance(logits, p, vc, v0, True)
            chunk_pass(logits, vc, v0, False, p)
            _mm_fp32(p, c[v0:v0 + vc], acc, accumulate=False)
        else:
            chunk_pass(logits, vc, v0, True, p)
            _mm_fp32(p, c[v0:v0 + vc], acc, accumulate=True)
            advance(logits, p, vc, v0, False)
    lse = stats[0, 0].clone() if splits == 1 else torch.logsumexp(stats[0], dim=0)
    if sum_logits:
        zsum = stats[2].sum(0)
    elif mean_logit:
        zsum = softmax_weighted_mean(stats[0], stats[2])
    else:
        zsum = stats.new_zeros((0,))
    if with_de:
        return lse, stats[1].sum(0), tile_max, zsum, acc, ref, resid
    return lse, stats[1].sum(0), tile_max, zsum


def _no_residual(n: int, device: torch.device) -> torch.Tensor:
    """(2, n) fp32: nothing lost to rounding yet (0, under a reference of -inf)."""
    resid = torch.zeros((2, n), dtype=torch.float32, device=device)
    resid[1].fill_(float("-inf"))
    return resid


def finish_de(
    acc: torch.Tensor,
    ref: torch.Tensor,
    resid: torch.Tensor,
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    coef: torch.Tensor,
    targets: torch.Tensor,
    c: torch.Tensor,
    vocab_start: int,
    cfg: BlockConfig,
    out_dtype: torch.dtype,
    target_weight: float = 1.0,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """This shard's dE (N, D) in ``out_dtype`` from :func:`forward`'s ``(acc, ref, resid)``:
    each row ``coef_n (sum_j p_j dz_j - target_weight dz_t c_t)`` with ``p = exp(z - lse)``
    under the given ``lse`` (N,) (the global one), ``target_logit`` (N,) the finished target
    logits (for the softcap's derivative) and ``coef`` (N,) fp32 per-token factors (0 at
    ignored tokens)."""
    n, d = acc.shape
    de = torch.empty((n, d), dtype=out_dtype, device=acc.device)
    if n == 0 or d == 0:
        return de
    bn = cfg.block_n
    _finish_de_kernel[(triton.cdiv(n, bn), triton.cdiv(d, cfg.out_block_d))](
        acc, ref, resid, lse.contiguous(), target_logit.contiguous(), coef.contiguous(),
        targets.contiguous(), c, de, n, d, c.shape[0], vocab_start, c.stride(0),
        float(target_weight), float(softcap), float(logit_scale), BLOCK_N=bn,
        BLOCK_D=cfg.out_block_d,
        HAS_SOFTCAP=softcap > 0, HAS_SCALE=logit_scale != 1.0,
        PRECISION=dot_precision(c.dtype if out_dtype != torch.float32 else torch.float32),
        num_warps=4,
    )
    return de


class ChunkDlogits:
    """The backward's launcher of one chunk's dl: ``(v0, vc, ld, logits_buf, dl_buf)`` -> dl
    (N, vc) of rows [v0, v0 + vc), row stride ``ld`` when fused, in ``dl_buf``. Fused: one
    ``_chunk_dlogits_gemm_kernel``; otherwise cuBLAS writes the fp32 logits into
    ``logits_buf`` and ``_chunk_dlogits_kernel`` turns them into dl. ``args``: the kernels'
    tensors after dl (targets, bias, lse, scale, entropy's two), ``scalars`` their floats,
    ``flags`` their constexprs."""

    def __init__(self, e: torch.Tensor, c: torch.Tensor, fused: bool, vocab_start: int,
                 cfg: BlockConfig, args: tuple, scalars: tuple, flags: dict) -> None:
        self.e, self.c, self.fused, self.vocab_start, self.cfg = e, c, fused, vocab_start, cfg
        self.args, self.scalars, self.flags = args, scalars, flags
        if fused:
            self.e_desc = TensorDescriptor.from_tensor(e, [cfg.dl_block_m, cfg.dl_block_k])
            self.c_desc = TensorDescriptor.from_tensor(c, [cfg.dl_block_c, cfg.dl_block_k])
            self.programs = _num_programs(e.device)

    def __call__(self, v0: int, vc: int, ld: int, logits_buf: torch.Tensor | None,
                 dl_buf: torch.Tensor) -> torch.Tensor:
        e, c, cfg = self.e, self.c, self.cfg
        (n, d), v = e.shape, c.shape[0]
        bn, bv = cfg.block_n, cfg.block_v
        if self.fused:
            bm, bc = cfg.dl_block_m, cfg.dl_block_c
            dl = dl_buf[: n * ld].view(n, ld)[:, :vc]
            programs = min(self.programs, triton.cdiv(n, bm) * triton.cdiv(vc, bc))
            _chunk_dlogits_gemm_kernel[(programs,)](
                self.e_desc, self.c_desc, TensorDescriptor(dl, [n, vc], [ld, 1], [bm, bc]),
                *self.args, n, v, d, vc, v0, self.vocab_start, *self.scalars, BLOCK_M=bm,
                BLOCK_C=bc, BLOCK_K=cfg.dl_block_k, GROUP=cfg.dl_group, STAGES=cfg.dl_stages,
                FLATTEN=cfg.dl_flatten, **self.flags, num_warps=cfg.dl_warps,
            )
            return dl
        logits = logits_buf[: n * vc].view(n, vc)
        dl = dl_buf[: n * vc].view(n, vc)
        _mm_fp32(e, c[v0:v0 + vc].t(), logits, accumulate=False)
        _chunk_dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(vc, bv))](
            logits, dl, *self.args, n, v, vc, v0, self.vocab_start, *self.scalars, BLOCK_N=bn,
            BLOCK_V=bv, **self.flags, num_warps=cfg.gemm_num_warps,
        )
        return dl


def backward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    vocab_start: int,
    grad_filter: GradFilter | None,
    tile_max: torch.Tensor,
    cfg: BlockConfig,
    vocab_size: int | None = None,
    target_weight: float = 1.0,
    de_fp32: bool = False,
    on_de_ready: Callable[[torch.Tensor], None] | None = None,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    dbias: torch.Tensor | None = None,
    entropy: tuple[torch.Tensor, torch.Tensor] | None = None,
    logit_scale: float = 1.0,
    dc_accum: torch.Tensor | None = None,
    want_de: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``triton_backward.backward`` for no filter or the budget filter, which
    skips nothing here: the products are dense, so zeroing the tiles it allows to skip would
    save no work and only lose (bounded) accuracy; the gradients are exact (``tile_max`` and
    ``vocab_size``, the filter's inputs, are taken for the shared contract). With ``bias``
    (V,), ``dbias`` (V,) fp32 receives its gradient. With ``dc_accum`` ((V, D) fp32), each
    chunk's ``dl.T @ E`` is added into it by cuBLAS in fp32, and an empty tensor stands for
    dC (the workspace then has storage of its own: there is no dC to lend it). Without
    ``want_de`` (the forward made dE: ``forward(with_de=True)``), dE is an empty tensor and
    only dC is computed: the workspace needs no dE accumulator, so no row is computed twice."""
    if grad_filter is not None and grad_filter.kind != "budget":
        raise ValueError("the gemm engine takes no filter or the budget filter")
    n, d = e.shape
    v = c.shape[0]
    targets, lse, grad_scale = targets.contiguous(), lse.contiguous(), grad_scale.contiguous()
    de_dtype = torch.float32 if de_fp32 else e.dtype
    if n == 0 or v == 0:
        de, dc = zero_gradients(e, c, de_fp32, on_de_ready if want_de else None)
        de = de if want_de else de.new_empty((0,))
        return de, (dc if dc_accum is None else dc.new_empty((0,)))
    bv = cfg.block_v
    dc = (torch.empty(c.shape, dtype=c.dtype, device=c.device) if dc_accum is None
          else c.new_empty((0,)))
    precision = dot_precision(e.dtype)
    size = dc.element_size()
    fused = fused_dlogits(e, c, cfg)
    entry = _dl_entry_bytes(fused, size)
    state = {"de_started": False}
    chunk_dlogits = ChunkDlogits(
        e, c, fused, vocab_start, cfg, (
            targets, lse if bias is None else bias, lse, grad_scale, *(entropy or (lse, lse))),
        (float(target_weight), float(uniform_weight), float(softcap), float(logit_scale)),
        dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, ENTROPY=entropy is not None,
             HAS_SCALE=logit_scale != 1.0, PRECISION=precision))

    def run_chunks(lo, hi, chunk, logits_buf, dl_buf, de_acc, want_dc, want_de, de_done=None):
        for v0 in range(lo, hi, chunk):
            vc = min(chunk, hi - v0)
            rows = c[v0:v0 + vc]
            dl = chunk_dlogits(v0, vc, chunk, logits_buf, dl_buf)
            if want_dc and dbias is not None:
                torch.sum(dl, dim=0, dtype=torch.float32, out=dbias[v0:v0 + vc])
            if want_de:
                _mm_fp32(dl, rows, de_acc, accumulate=state["de_started"])
                state["de_started"] = True
                if de_done is not None and v0 + vc >= hi:
                    de_done()  # before the last dC: the caller may start reducing dE
            if want_dc and dc_accum is not None:
                _mm_fp32(dl.t(), e, dc_accum[v0:v0 + vc], accumulate=True)
            elif want_dc:
                _mm_cast(dl.t(), e, dc[v0:v0 + vc])

    def dc_only_lent(lo: int, chunk: int) -> None:
        """dC of rows [lo, V) (no dE) with the workspace in dC's own unwritten rows: while many
        rows remain, the chunk's buffers sit in the last unwritten rows, and the rows before
        them are written in chunks; then the same with half the chunk on the rows that held
        them; the last few rows get buffers of their own, within gemm_tail_bytes."""
        own = _chunk_rows(n, cfg.gemm_tail_bytes, cfg.tail_chunk_v, bv, v - lo, entry)
        while chunk > own:
            need = n * chunk * entry + 16  # + alignment
            end = (v - triton.cdiv(need, d * size)) // bv * bv
            if end - lo < chunk:
                break
            raw = dc[end:].view(-1).view(torch.uint8)
            raw = raw[(-raw.data_ptr()) % 16:]
            run_chunks(lo, end, chunk, *buffers(raw, chunk), None, want_dc=True, want_de=False)
            lo, chunk = end, max(own, chunk // 2 // bv * bv)
        run_chunks(lo, v, own, *buffers(None, own), None, want_dc=True, want_de=False)

    def buffers(raw: torch.Tensor | None, chunk: int):
        """The chunk's fp32 logits (None when fused) and dl, in ``raw`` (bytes, 16-byte
        aligned) or in their own allocation."""
        if raw is None:
            raw = torch.empty((n * chunk * entry,), dtype=torch.uint8, device=e.device)
        logits = None if fused else raw[: n * chunk * 4].view(torch.float32)
        return logits, raw[n * chunk * (entry - size): n * chunk * entry].view(e.dtype)

    chunk = _chunk_rows(n, cfg.gemm_bytes, cfg.gemm_chunk_v, bv, v)
    if not want_de:
        chunk = _chunk_rows(n, cfg.gemm_dc_bytes, cfg.gemm_chunk_v, bv, v)
        lent_rows = triton.cdiv(n * chunk * entry, d * size)
        if dc_accum is not None or lent_rows > cfg.max_lent_fraction * v:
            run_chunks(0, v, chunk, *buffers(None, chunk), None, want_dc=True, want_de=False)
        else:
            dc_only_lent(0, chunk)
        return e.new_empty((0,), dtype=de_dtype), dc
    split = v if dc_accum is not None else _lent_split(n, d, v, size, cfg, fused)
    if split == v:  # no rows lent: the workspace has buffers of its own
        de_acc = torch.empty((n, d), dtype=torch.float32, device=e.device)
        out = {}

        def finish_de():
            out["de"] = de_acc if de_fp32 else de_acc.to(e.dtype)
            if on_de_ready is not None:
                on_de_ready(out["de"])

        run_chunks(0, v, chunk, *buffers(None, chunk), de_acc, want_dc=True, want_de=True,
                   de_done=finish_de)
        return out["de"], dc
    raw = dc[split:].view(-1).view(torch.uint8)
    de_acc = raw[: n * d * 4].view(torch.float32).view(n, d)
    logits_buf, dl_buf = buffers(raw[n * d * 4:], chunk)
    run_chunks(0, split, chunk, logits_buf, dl_buf, de_acc, want_dc=True, want_de=True)
    run_chunks(split, v, chunk, logits_buf, dl_buf, de_acc, want_dc=False, want_de=True)
    # A copy even for fp32: the accumulator's storage is dC's, about to be written.
    de = de_acc.to(de_dtype, copy=True)
    if on_de_ready is not None:
        on_de_ready(de)
    dc_only_lent(split, chunk)
    return de, dc
