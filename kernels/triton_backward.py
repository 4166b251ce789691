"""Triton backward: dE and dC from the global LSE, with tile-level gradient filtering.

The vocabulary is walked in chunks of ``cfg.chunk_v`` rows (``cfg.lent_chunk_v`` when the
workspace is lent by dC, see :func:`workspace_split`). For each chunk:

1. ``_dlogits_kernel`` writes ``dl = (softmax - onehot) * grad_scale`` for the chunk (N x chunk,
   input dtype) and one keep-flag per (token block, vocabulary block) tile. With filtering, a tile
   that the filter proves negligible from the bound its largest logit (recorded by the forward)
   gives is skipped without being recomputed (``filtering.keep_tiles``, computed once before the
   chunks); with the per-entry filter, a recomputed tile whose every |softmax - onehot| is under
   ``eps`` is dropped too. A tile holding a target is never skipped.
2. ``_dc_kernel`` computes ``dC[chunk] = dl.T @ E`` in one pass over the kept tiles of each
   column of tiles: fp32 accumulation, a single rounding, no atomics.
3. ``_de_kernel`` adds ``dl @ C[chunk]`` into an fp32 dE accumulator (each output tile owned by
   one program: deterministic).

Kept tiles are listed per column / per row with a device-side argsort of the flags, so the loops
over tiles have no data-dependent branches and no host synchronization.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .filtering import GradFilter, keep_tiles
from .tiles import (
    BlockConfig, backward_config, cast_out, dot_precision, finish_logits, local_targets,
    logits_grad, logits_tile, mma,
)


@triton.jit
def _dlogits_kernel(
    e_ptr, c_ptr, t_ptr, bias_ptr, lse_ptr, scale_ptr, keep_ptr, dl_ptr, flag_ptr,
    ent_scale_ptr, mean_ptr,
    N, V, D, vocab_start, v0, vc, num_v_blocks, chunk_blocks, eps, target_weight,
    uniform_weight, softcap, logit_scale,
    stride_en, stride_ed, stride_cv, stride_cd, stride_dln,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    FILTER: tl.constexpr, ENTRY_TEST: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ZERO_SKIPPED: tl.constexpr,
    ENTROPY: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """Grid: (token blocks, vocabulary blocks of the chunk). One program owns one tile of dl
    and its keep-flag."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    offs_v = v0 + offs_c  # row of this shard of C
    mask_n = offs_n < N
    mask_v = offs_c < vc
    local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    mask = mask_n[:, None] & mask_v[None, :]
    hit = (offs_v[None, :] == local_t[:, None]) & mask
    dl_ptrs = dl_ptr + offs_n.to(tl.int64)[:, None] * stride_dln + offs_c[None, :]
    if FILTER:
        # keep_ptr: the filter's verdict from the tile bounds (kernels/filtering.py).
        bound_keep = tl.load(keep_ptr + pid_n * num_v_blocks + v0 // BLOCK_V + pid_v)
        has_target = tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0)
        keep = (bound_keep != 0) | (has_target > 0)
        flag = keep.to(tl.int32)
        if keep:
            logits = logits_tile(
                e_ptr, c_ptr, offs_n, offs_v, N, V, D, stride_en, stride_ed, stride_cv,
                stride_cd, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION,
            )
            logits = finish_logits(logits, bias_ptr, offs_v, mask_v, softcap, logit_scale,
                                   HAS_BIAS, HAS_SOFTCAP, HAS_SCALE)
            p = tl.exp(logits - lse[:, None])
            g = tl.where(mask, p - target_weight * hit.to(tl.float32) - uniform_weight, 0.0)
            if ENTRY_TEST:  # the per-entry filter also drops recomputed tiles under eps
                flag = (tl.max(tl.max(tl.abs(g), axis=1), axis=0) >= eps).to(tl.int32)
            g = g * scale[:, None]
            if ENTROPY:
                g += _entropy_term(ent_scale_ptr, mean_ptr, offs_n, mask_n, mask, p, logits)
            g = logits_grad(g, logits, softcap, logit_scale, HAS_SOFTCAP, HAS_SCALE)
            if ZERO_SKIPPED:  # the bias gradient sums dl whole: a dropped tile must read 0
                g = g * flag.to(tl.float32)
            tl.store(dl_ptrs, cast_out(g, dl_ptr.dtype.element_ty, PRECISION), mask=mask)
        elif ZERO_SKIPPED:
            tl.store(dl_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=dl_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(flag_ptr + pid_n * chunk_blocks + pid_v, flag)
    else:
        logits = logits_tile(
            e_ptr, c_ptr, offs_n, offs_v, N, V, D, stride_en, stride_ed, stride_cv, stride_cd,
            BLOCK_N, BLOCK_V, BLOCK_D, PRECISION,
        )
        logits = finish_logits(logits, bias_ptr, offs_v, mask_v, softcap, logit_scale, HAS_BIAS,
                               HAS_SOFTCAP, HAS_SCALE)
        p = tl.exp(logits - lse[:, None])
        g = tl.where(mask, p - target_weight * hit.to(tl.float32) - uniform_weight, 0.0)
        g = g * scale[:, None]
        if ENTROPY:
            g += _entropy_term(ent_scale_ptr, mean_ptr, offs_n, mask_n, mask, p, logits)
        g = logits_grad(g, logits, softcap, logit_scale, HAS_SOFTCAP, HAS_SCALE)
        tl.store(dl_ptrs, cast_out(g, dl_ptr.dtype.element_ty, PRECISION), mask=mask)


@triton.jit
def _entropy_term(ent_scale_ptr, mean_ptr, offs_n, mask_n, mask, p, logits):
    """The entropy's share of the logits' gradient, ``ent_n p_j (z_j - mean_n)`` (0 where
    masked): d(entropy)/dz_j = -p_j (z_j - sum_k p_k z_k), weighed by -ent_n."""
    ent = tl.load(ent_scale_ptr + offs_n, mask=mask_n, other=0.0)
    mean = tl.load(mean_ptr + offs_n, mask=mask_n, other=0.0)
    return tl.where(mask, ent[:, None] * p * (logits - mean[:, None]), 0.0)


@triton.jit
def _dc_kernel(
    dl_ptr, e_ptr, dc_ptr, order_ptr, count_ptr,
    N, D, v0, vc, n_blocks, chunk_blocks,
    stride_dln, stride_en, stride_ed, stride_cv, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DO: tl.constexpr,
    FILTER: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_v = offs_c < vc
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_V, BLOCK_DO), dtype=tl.float32)
    if FILTER:
        count = tl.load(count_ptr + pid_v)
    else:
        count = n_blocks
    for i in range(0, count):
        if FILTER:
            nb = tl.load(order_ptr + i * chunk_blocks + pid_v)
        else:
            nb = i
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = offs_n.to(tl.int64)[:, None]
        dl = tl.load(dl_ptr + rows * stride_dln + offs_c[None, :],
                     mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        e = tl.load(e_ptr + rows * stride_en + offs_d[None, :] * stride_ed,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = mma(tl.trans(dl), e, acc, PRECISION)
    dc_ptrs = dc_ptr + (v0 + offs_c).to(tl.int64)[:, None] * stride_cv + offs_d[None, :] * stride_cd
    tl.store(dc_ptrs, cast_out(acc, dc_ptr.dtype.element_ty, PRECISION),
             mask=mask_v[:, None] & mask_d[None, :])


@triton.jit
def _de_kernel(
    dl_ptr, c_ptr, de_ptr, order_ptr, count_ptr,
    N, D, v0, vc, chunk_blocks, accumulate,
    stride_dln, stride_cv, stride_cd, stride_den,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_DO: tl.constexpr,
    FILTER: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_n = offs_n < N
    mask_d = offs_d < D
    rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    if FILTER:
        count = tl.load(count_ptr + pid_n)
    else:
        count = chunk_blocks
    for i in range(0, count):
        if FILTER:
            vb = tl.load(order_ptr + pid_n * chunk_blocks + i)
        else:
            vb = i
        offs_c = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_c < vc
        dl = tl.load(dl_ptr + rows * stride_dln + offs_c[None, :],
                     mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        c = tl.load(c_ptr + (v0 + offs_c).to(tl.int64)[:, None] * stride_cv
                    + offs_d[None, :] * stride_cd,
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc = mma(dl, c, acc, PRECISION)
    de_ptrs = de_ptr + rows * stride_den + offs_d[None, :]
    mask = mask_n[:, None] & mask_d[None, :]
    if accumulate:
        acc += tl.load(de_ptrs, mask=mask, other=0.0)
    tl.store(de_ptrs, acc, mask=mask)


def zero_gradients(e, c, de_fp32, on_de_ready):
    """No token or no row: dE and dC exactly zero (not uninitialized memory)."""
    de = torch.zeros(e.shape, dtype=torch.float32 if de_fp32 else e.dtype, device=e.device)
    if on_de_ready is not None:
        on_de_ready(de)
    return de, torch.zeros(c.shape, dtype=c.dtype, device=c.device)


def _kept_tile_lists(flags: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per column and per row of the (n_blocks, chunk_blocks) flags: kept tile indices first."""
    dropped = (flags == 0).to(torch.int8)
    by_column = torch.argsort(dropped, dim=0, stable=True).to(torch.int32)
    by_row = torch.argsort(dropped, dim=1, stable=True).to(torch.int32)
    return by_column, flags.sum(0, dtype=torch.int32), by_row, flags.sum(1, dtype=torch.int32)


def workspace_split(
    n: int, d: int, v: int, chunk: int, block_v: int, itemsize: int, max_fraction: float = 1.0,
    chunk_itemsize: Optional[int] = None,
) -> int:
    """First row of dC whose storage is lent to the workspace, or ``v`` if none is.

    The workspace is the fp32 dE accumulator (n x d) and one chunk's buffers (n x chunk values
    of ``chunk_itemsize`` bytes, default ``itemsize``: dl). Placed in the tail rows of dC
    (``itemsize`` bytes per value), which are written last, it costs no memory beyond the
    gradients themselves. The split is a multiple of ``block_v`` (tile maxima are indexed by
    block) and leaves room for at least one chunk before it; at most ``max_fraction`` of the
    rows are lent.
    """
    need = n * d * 4 + n * chunk * (chunk_itemsize or itemsize)
    split = (v - triton.cdiv(need, d * itemsize)) // block_v * block_v
    if split < chunk or v - split > max_fraction * v:
        return v
    return split


def backward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    vocab_start: int,
    grad_filter: Optional[GradFilter],
    tile_max: torch.Tensor,
    cfg: BlockConfig,
    vocab_size: Optional[int] = None,
    target_weight: float = 1.0,
    de_fp32: bool = False,
    on_de_ready: Optional[Callable[[torch.Tensor], None]] = None,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    dbias: Optional[torch.Tensor] = None,
    entropy: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_n grad_scale[n] * loss_n`` for this slice of the vocabulary.

    e: (N, D), c: (V, D); targets: (N,) global ids; lse: (N,) fp32 global LSE; grad_scale: (N,)
    fp32; tile_max: the forward's per-tile maxima (on ``cfg``'s tiles, which the backward walks
    too with the per-entry filter; otherwise ``backward_config``'s taller ones); grad_filter:
    None (exact) or the filter (``kernels/filtering.py``); vocab_size: rows of all shards
    (default: this one's); target_weight: the weight of the one-hot term, 1 - label smoothing
    (whose uniform term the caller adds, or passes as ``uniform_weight``, eps / V, under a
    softcap); softcap, bias (V,): see ``triton_forward.forward``, with ``dbias`` (V,) fp32
    receiving the bias's gradient; ``entropy``: ``(ent_scale, mean_logit)``, (N,) fp32 each,
    adds ``ent_scale_n p_j (z_j - mean_logit_n)`` to the logits' gradient (the entropy's, see
    ``cce_dist.linear_logprobs_entropy``). Returns ``(de, dc)`` in the input dtype (``de`` in
    fp32 with ``de_fp32``); ``de`` is this slice's partial contribution.

    When V is large enough, the fp32 dE accumulator and the dl chunk live in the storage of dC's
    last rows (see :func:`workspace_split`): rows before the split get dE and dC contributions
    chunk by chunk; rows after it first get only their dE contributions, and, once dE is final and
    the workspace free, their dC ones (recomputing their dl, in chunks of ``cfg.tail_chunk_v``).

    ``on_de_ready(de)``, if given, is called with the returned ``de`` as soon as the kernels that
    finish it are launched, before the remaining dC work (the last chunk's dC, or the lent rows'
    dC): a caller can start reducing dE across ranks on another stream while dC completes.
    """
    n, d = e.shape
    v = c.shape[0]
    # The kernels read these (N,) vectors with unit stride.
    targets, lse, grad_scale = targets.contiguous(), lse.contiguous(), grad_scale.contiguous()
    if n == 0 or v == 0:
        return zero_gradients(e, c, de_fp32, on_de_ready)
    # Row-major whatever c's strides: the workspace views dC's tail rows as flat bytes.
    dc = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    use_filter = grad_filter is not None
    entry_test = use_filter and grad_filter.kind == "entry"
    eps = grad_filter.value if entry_test else 0.0
    keep = tile_max  # unused by the kernels without filtering
    if use_filter:
        keep = keep_tiles(tile_max, lse, cfg.block_n, cfg.block_v, v, vocab_size or v,
                          grad_filter)
    tile_n, cfg = cfg.block_n, backward_config(cfg, entry_test)
    if use_filter and cfg.block_n != tile_n:  # a taller tile is kept when any of its parts is
        ratio = cfg.block_n // tile_n
        keep = torch.nn.functional.pad(keep, (0, 0, 0, -keep.shape[0] % ratio))
        keep = keep.view(-1, ratio, keep.shape[1]).amax(dim=1)
    bn, bv, bdo = cfg.block_n, cfg.block_v, cfg.out_block_d
    n_blocks = triton.cdiv(n, bn)
    v_blocks = triton.cdiv(v, bv)
    precision = dot_precision(e.dtype)
    state = {"de_started": False}

    def run_chunks(lo, hi, chunk, dl, de_acc, want_dc, want_de, de_done=None):
        for v0 in range(lo, hi, chunk):
            vc = min(chunk, hi - v0)
            cb = triton.cdiv(vc, bv)
            flags = torch.empty((n_blocks, cb), dtype=torch.int32, device=e.device)
            _dlogits_kernel[(n_blocks, cb)](
                e, c, targets, lse if bias is None else bias, lse, grad_scale, keep, dl, flags,
                *(entropy or (lse, lse)), n, v, d, vocab_start, v0, vc, v_blocks, cb, eps,
                float(target_weight),
                float(uniform_weight), float(softcap), float(logit_scale),
                e.stride(0), e.stride(1), c.stride(0), c.stride(1), dl.stride(0),
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=cfg.block_d, FILTER=use_filter,
                ENTRY_TEST=entry_test, PRECISION=precision, HAS_BIAS=bias is not None,
                HAS_SOFTCAP=softcap > 0, ZERO_SKIPPED=use_filter and dbias is not None,
                ENTROPY=entropy is not None, HAS_SCALE=logit_scale != 1.0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if want_dc and dbias is not None:
                torch.sum(dl[:, :vc], dim=0, dtype=torch.float32, out=dbias[v0:v0 + vc])
            if use_filter:
                by_col, count_col, by_row, count_row = _kept_tile_lists(flags)
            else:
                by_col = count_col = by_row = count_row = flags  # unused by the kernels
            # dE before dC: after the last chunk's dE, the caller may start reducing it.
            if want_de:
                _de_kernel[(n_blocks, triton.cdiv(d, bdo))](
                    dl, c, de_acc, by_row, count_row, n, d, v0, vc, cb,
                    int(state["de_started"]),
                    dl.stride(0), c.stride(0), c.stride(1), de_acc.stride(0),
                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_DO=bdo, FILTER=use_filter, PRECISION=precision,
                    num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
                )
                state["de_started"] = True
                if de_done is not None and v0 + vc >= hi:
                    de_done()
            if want_dc:
                _dc_kernel[(cb, triton.cdiv(d, bdo))](
                    dl, e, dc, by_col, count_col, n, d, v0, vc, n_blocks, cb,
                    dl.stride(0), e.stride(0), e.stride(1), dc.stride(0), dc.stride(1),
                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_DO=bdo, FILTER=use_filter, PRECISION=precision,
                    num_warps=cfg.mm_num_warps, num_stages=cfg.mm_num_stages,
                )

    chunk = max(bv, cfg.lent_chunk_v // bv * bv)
    split = workspace_split(n, d, v, chunk, bv, dc.element_size(), cfg.max_lent_fraction)
    if split == v:  # no rows lent: the workspace has buffers of its own
        chunk = max(bv, cfg.chunk_v // bv * bv)
        de_acc = torch.empty((n, d), dtype=torch.float32, device=e.device)
        dl = torch.empty((n, min(chunk, v_blocks * bv)), dtype=e.dtype, device=e.device)
        out = {}

        def finish_de():
            out["de"] = de_acc if de_fp32 else de_acc.to(e.dtype)
            if on_de_ready is not None:
                on_de_ready(out["de"])

        run_chunks(0, v, chunk, dl, de_acc, want_dc=True, want_de=True, de_done=finish_de)
        return out["de"], dc
    raw = dc[split:].view(-1).view(torch.uint8)
    de_acc = raw[: n * d * 4].view(torch.float32).view(n, d)
    dl = raw[n * d * 4: n * d * 4 + n * chunk * dc.element_size()].view(dc.dtype).view(n, chunk)
    run_chunks(0, split, chunk, dl, de_acc, want_dc=True, want_de=True)
    run_chunks(split, v, chunk, dl, de_acc, want_dc=False, want_de=True)
    # A copy even for fp32: the accumulator's storage is dC's, about to be written.
    de = de_acc.to(torch.float32 if de_fp32 else e.dtype, copy=True)
    if on_de_ready is not None:
        on_de_ready(de)
    tail_chunk = max(bv, cfg.tail_chunk_v // bv * bv)
    dl = torch.empty((n, min(tail_chunk, triton.cdiv(v - split, bv) * bv)), dtype=e.dtype,
                     device=e.device)
    run_chunks(split, v, tail_chunk, dl, None, want_dc=True, want_de=False)
    return de, dc
