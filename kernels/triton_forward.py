"""Triton forward: per-token LSE and target logit over a slice of the vocabulary.

Grid: (token blocks, vocabulary splits). Each program walks its split's vocabulary blocks with
an online log-sum-exp (as in the fused-softmax / flash-attention tutorials) and writes one
partial LSE and one partial target logit per token; a tiny logsumexp / sum over the splits
finishes the job. No locks and no atomics, so the result is deterministic. Each program also
writes the largest logit of every (token block, vocabulary block) tile it saw, which the
backward uses to skip negligible tiles without recomputing them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .combine import softmax_weighted_mean
from .tiles import BlockConfig, dot_precision, finish_logits, local_targets, logits_tile


@triton.jit
def _forward_kernel(
    e_ptr, c_ptr, t_ptr, bias_ptr, lse_part_ptr, tgt_part_ptr, zsum_part_ptr, tile_max_ptr,
    N, V, D, vocab_start, blocks_per_split, num_v_blocks, num_n_tiles, num_v_tiles, softcap,
    logit_scale,
    stride_en, stride_ed, stride_cv, stride_cd,
    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, BLOCK_V: tl.constexpr, TILE_V: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, SUM_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MEAN_LOGIT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """Grid: (token blocks, vocabulary splits). One program owns one token block's partial LSE,
    target logit (and, with SUM_LOGITS, sum of logits) over its split's vocabulary blocks."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    local_t = local_targets(t_ptr, offs_n, mask_n, vocab_start, V)
    tiles = pid_n * (BLOCK_N // TILE_N) + tl.arange(0, BLOCK_N // TILE_N)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    vb_begin = pid_s * blocks_per_split
    vb_end = tl.minimum(vb_begin + blocks_per_split, num_v_blocks)
    for vb in range(vb_begin, vb_end):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        logits = logits_tile(
            e_ptr, c_ptr, offs_n, offs_v, N, V, D, stride_en, stride_ed, stride_cv, stride_cd,
            BLOCK_N, BLOCK_V, BLOCK_D, PRECISION,
        )
        mask_v = offs_v < V
        logits = finish_logits(logits, bias_ptr, offs_v, mask_v, softcap, logit_scale, HAS_BIAS,
                               HAS_SOFTCAP, HAS_SCALE)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        # One maximum per TILE_N x TILE_V tile: the backward's filtering grid.
        if BLOCK_V == TILE_V:
            row_max = tl.max(logits, axis=1)
            _store_tile_max(tile_max_ptr, row_max, mask_n, tiles, vb, num_n_tiles, num_v_tiles,
                            BLOCK_N, TILE_N)
        else:
            row_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
            group = tl.arange(0, BLOCK_V) // TILE_V
            for j in tl.static_range(BLOCK_V // TILE_V):
                part = tl.max(tl.where((group == j)[None, :], logits, float("-inf")), axis=1)
                row_max = tl.maximum(row_max, part)
                _store_tile_max(tile_max_ptr, part, mask_n, tiles, vb * (BLOCK_V // TILE_V) + j,
                                num_n_tiles, num_v_tiles, BLOCK_N, TILE_N)
        m_new = tl.maximum(m, row_max)
        rescale = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        s = s * rescale + tl.sum(p, axis=1)
        m = m_new
        hit = (offs_v[None, :] == local_t[:, None]) & mask_v[None, :]
        tgt += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        if SUM_LOGITS:  # label smoothing's mean logit
            zsum += tl.sum(tl.where(mask_v[None, :], logits, 0.0), axis=1)
        if MEAN_LOGIT:  # sum_j exp(z_j - m) z_j (the entropy's), rescaled with s
            zsum = zsum * rescale + tl.sum(p * tl.where(mask_v[None, :], logits, 0.0), axis=1)
    lse = m + tl.log(s)
    if MEAN_LOGIT:
        zsum = zsum / s
    tl.store(lse_part_ptr + pid_s * N + offs_n, lse, mask=mask_n)
    tl.store(tgt_part_ptr + pid_s * N + offs_n, tgt, mask=mask_n)
    if SUM_LOGITS or MEAN_LOGIT:
        tl.store(zsum_part_ptr + pid_s * N + offs_n, zsum, mask=mask_n)


@triton.jit
def _store_tile_max(tile_max_ptr, row_max, mask_n, tiles, vt, num_n_tiles, num_v_tiles,
                    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr):
    """Stores, for vocabulary tile ``vt``, the largest of ``row_max`` over each TILE_N rows."""
    tile_max = tl.max(tl.reshape(tl.where(mask_n, row_max, float("-inf")),
                                 (BLOCK_N // TILE_N, TILE_N)), axis=1)
    vts = tl.zeros_like(tiles) + vt
    tl.store(tile_max_ptr + tiles * num_v_tiles + vts, tile_max,
             mask=(tiles < num_n_tiles) & (vts < num_v_tiles))


def forward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    cfg: BlockConfig,
    sum_logits: bool = False,
    softcap: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    mean_logit: bool = False,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """e: (N, D), c: (V, D) of one float dtype; targets: (N,) integer global ids.

    Returns ``(lse, target_logit, tile_max, logit_sum)``: (N,) float32, (N,) float32 (0 where the
    target is not in these rows), (cdiv(N, block_n), cdiv(V, block_v)) float32, and with
    ``sum_logits`` each token's sum of logits over these rows, (N,) float32 (else empty). The
    logits are ``e @ c.T`` plus ``bias`` (V,), then capped by ``softcap`` when it is > 0.
    With ``mean_logit`` (instead of ``sum_logits``) the last output is each token's mean logit
    under its softmax over these rows, ``sum_j p_j z_j / sum_j p_j`` (the entropy's).
    """
    n, d = e.shape
    v = c.shape[0]
    targets = targets.contiguous()  # read with unit stride
    n_tiles = triton.cdiv(n, cfg.block_n)
    v_tiles = triton.cdiv(v, cfg.block_v)
    n_blocks = triton.cdiv(n, cfg.fw_block_n)
    v_blocks = triton.cdiv(v, cfg.fw_block_v)
    tile_max = torch.empty((n_tiles, v_tiles), dtype=torch.float32, device=e.device)
    extra = sum_logits or mean_logit
    zeros = torch.zeros((n if extra else 0,), dtype=torch.float32, device=e.device)
    if n == 0 or v == 0:
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=e.device)
        return lse, torch.zeros((n,), dtype=torch.float32, device=e.device), tile_max, zeros
    splits = max(1, min(v_blocks, triton.cdiv(cfg.target_programs, n_blocks)))
    blocks_per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, blocks_per_split)
    parts = torch.empty((3 if extra else 2, splits, n), dtype=torch.float32, device=e.device)
    lse_part, tgt_part, zsum_part = parts[0], parts[1], parts[-1]
    _forward_kernel[(n_blocks, splits)](
        e, c, targets, tile_max if bias is None else bias, lse_part, tgt_part, zsum_part,
        tile_max, n, v, d, vocab_start, blocks_per_split, v_blocks, n_tiles, v_tiles,
        float(softcap), float(logit_scale), e.stride(0), e.stride(1), c.stride(0), c.stride(1),
        BLOCK_N=cfg.fw_block_n, TILE_N=cfg.block_n, BLOCK_V=cfg.fw_block_v, TILE_V=cfg.block_v,
        BLOCK_D=cfg.fw_block_d, PRECISION=dot_precision(e.dtype), SUM_LOGITS=sum_logits,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, MEAN_LOGIT=mean_logit,
        HAS_SCALE=logit_scale != 1.0,
        num_warps=cfg.fw_num_warps, num_stages=cfg.fw_num_stages,
    )
    lse = lse_part[0].clone() if splits == 1 else torch.logsumexp(lse_part, dim=0)
    if sum_logits:
        zeros = zsum_part.sum(dim=0)
    elif mean_logit:
        zeros = softmax_weighted_mean(lse_part, zsum_part)
    return lse, tgt_part.sum(dim=0), tile_max, zeros
