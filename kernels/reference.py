"""Pure-PyTorch chunked reference for the CCE forward and backward.

Same interface as the Triton kernels (``triton_forward`` / ``triton_backward``) and, like them,
it never holds the N x V logits: it walks the vocabulary in chunks of ``chunk_size`` rows. It
runs on any device and is the oracle of the tests. Math is done in float32, or float64 for
float64 inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .combine import softmax_weighted_mean
from .filtering import GradFilter, keep_tiles

DEFAULT_CHUNK = 4096
# The budget filter's tiles here (tokens x vocabulary rows); the chunk is a multiple of TILE_V.
TILE_N, TILE_V = 32, 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    sum_logits: bool = False,
    softcap: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    mean_logit: bool = False,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSE, target logit, tile maxima (and sum of logits) of each token over the rows of ``c``.

    e: (N, D), c: (V, D), targets: (N,) integer global ids. Row v of ``c`` is global id
    ``vocab_start + v``. Returns ``(lse, target_logit, tile_max)``: (N,) and (N,) in float32
    (float64 for float64 inputs), ``target_logit`` 0 where the target is not among these rows;
    and the largest logit of every (TILE_N x TILE_V) tile, (cdiv(N, TILE_N), cdiv(V, TILE_V))
    float32, which the budget filter of :func:`backward` bounds the tiles' mass with; with
    ``sum_logits``, each token's sum of logits over these rows (N,) (else an empty tensor).
    The logits are ``e @ c.T`` plus ``bias`` (V,), then ``softcap * tanh(z / softcap)`` when
    ``softcap`` > 0. With ``mean_logit`` the last output is instead each token's mean logit
    under its softmax over these rows (the entropy's ``sum_j p_j z_j``).
    """
    cdt = _compute_dtype(e.dtype)
    n, v = e.shape[0], c.shape[0]
    lse = torch.full((n,), -math.inf, dtype=cdt, device=e.device)
    tgt = torch.zeros((n,), dtype=cdt, device=e.device)
    zsum = torch.zeros((n if sum_logits or mean_logit else 0,), dtype=cdt, device=e.device)
    maxima = [torch.empty((-(-n // TILE_N), 0), dtype=torch.float32, device=e.device)]
    local_t = targets.long() - vocab_start
    ef = e.to(cdt)
    weighted = []  # per chunk: (its LSE, its softmax-weighted mean logit)
    chunk_size = max(TILE_V, chunk_size // TILE_V * TILE_V)
    for v0 in range(0, v, chunk_size):
        v1 = min(v0 + chunk_size, v)
        logits = _finish(ef @ c[v0:v1].to(cdt).T * logit_scale, bias, v0, v1, softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        inside = (local_t >= v0) & (local_t < v1)
        col = torch.where(inside, local_t - v0, 0)
        tgt = tgt + torch.where(inside, logits.gather(1, col[:, None])[:, 0], 0.0)
        maxima.append(_tile_maxima(logits))
        if sum_logits:
            zsum = zsum + logits.sum(dim=1)
        if mean_logit:  # combined with the chunks' weights in the final LSE below
            weighted.append((torch.logsumexp(logits, dim=1), torch.softmax(logits, dim=1)
                             .mul(logits).sum(dim=1)))
    if mean_logit and weighted:
        parts = torch.stack([w for w, _ in weighted])
        means = torch.stack([m for _, m in weighted])
        zsum = softmax_weighted_mean(parts, means)
    return lse, tgt, torch.cat(maxima, dim=1), zsum


def _finish(raw: torch.Tensor, bias: Optional[torch.Tensor], v0: int, v1: int,
            softcap: float) -> torch.Tensor:
    """Products of rows v0..v1 -> the logits the loss sees (plus bias, then softcap)."""
    z = raw if bias is None else raw + bias[v0:v1].to(raw.dtype)
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _tile_maxima(logits: torch.Tensor) -> torch.Tensor:
    """(n, w) logits -> (cdiv(n, TILE_N), cdiv(w, TILE_V)) fp32 maxima of their tiles."""
    n, w = logits.shape
    n_tiles = -(-n // TILE_N)
    if n == 0:
        return logits.new_empty((0, -(-w // TILE_V)), dtype=torch.float32)
    padded = torch.nn.functional.pad(
        logits, (0, -w % TILE_V, 0, n_tiles * TILE_N - n), value=-math.inf)
    return padded.view(n_tiles, TILE_N, -1, TILE_V).amax(dim=(1, 3)).float()


def backward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    vocab_start: int = 0,
    grad_filter: Optional[GradFilter] = None,
    tile_max: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    de_fp32: bool = False,
    vocab_size: Optional[int] = None,
    target_weight: float = 1.0,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    dbias: Optional[torch.Tensor] = None,
    entropy: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_n grad_scale[n] * (lse[n] - w * logit[n, t_n])`` in ``e`` and ``c``,
    ``w = target_weight`` (1 - label smoothing; the smoothing's uniform term is not here).

    ``lse`` is the LSE over the *whole* vocabulary (all shards); the softmax of this shard is
    ``exp(logits - lse)``. With the per-entry filter, entries with ``|softmax - onehot| < eps``
    are dropped (element-wise; the Triton kernels drop whole tiles); with the budget filter,
    the (TILE_N x TILE_V) tiles that ``filtering.budget_skips`` picks from ``tile_max`` (the
    forward's), except those holding a target. ``vocab_size``: rows of all shards.
    ``uniform_weight`` is subtracted from every entry (label smoothing's eps / V, under a
    softcap); softcap and bias as in :func:`forward`, with ``dbias`` (V,) receiving the bias's
    gradient (in its dtype); ``entropy = (ent_scale, mean_logit)`` adds
    ``ent_scale_n p_j (z_j - mean_logit_n)`` (unfiltered by the per-entry test). Returns
    ``(de, dc)`` in the dtypes of ``e`` and ``c`` (``de`` in the compute dtype with
    ``de_fp32``); ``de`` is this shard's partial contribution.
    """
    cdt = _compute_dtype(e.dtype)
    v = c.shape[0]
    local_t = targets.long() - vocab_start
    ef = e.to(cdt)
    lse = lse.to(cdt)
    scale = grad_scale.to(cdt)
    de = torch.zeros(e.shape, dtype=cdt, device=e.device)
    dc = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    chunk_size = max(TILE_V, chunk_size // TILE_V * TILE_V)
    keep = None
    if grad_filter is not None and grad_filter.kind == "budget" and e.shape[0] > 0 and v > 0:
        grid = (-(-e.shape[0] // TILE_N), -(-v // TILE_V))
        if tile_max is None or tuple(tile_max.shape) != grid:
            raise ValueError(f"the budget filter needs the forward's tile maxima {grid}, got "
                             f"{None if tile_max is None else tuple(tile_max.shape)}")
        keep = keep_tiles(tile_max, lse, TILE_N, TILE_V, v, vocab_size or v, grad_filter)
    for v0 in range(0, v, chunk_size):
        v1 = min(v0 + chunk_size, v)
        cc = c[v0:v1].to(cdt)
        z = _finish(ef @ cc.T * logit_scale, bias, v0, v1, softcap)
        g = torch.exp(z - lse[:, None]) - uniform_weight
        inside = (local_t >= v0) & (local_t < v1)
        col = torch.where(inside, local_t - v0, 0)
        g.scatter_add_(1, col[:, None], -target_weight * inside.to(cdt)[:, None])
        if keep is not None:
            tiles = keep[:, v0 // TILE_V: (v1 + TILE_V - 1) // TILE_V].bool()
            # A tile holding a target is always kept.
            hit = torch.zeros_like(tiles)
            rows = torch.arange(e.shape[0], device=e.device) // TILE_N
            hit[rows[inside], col[inside] // TILE_V] = True
            mask = (tiles | hit).repeat_interleave(TILE_N, 0).repeat_interleave(TILE_V, 1)
            g = torch.where(mask[: g.shape[0], : g.shape[1]], g, 0.0)
        elif grad_filter is not None:
            g = torch.where(g.abs() < grad_filter.value, 0.0, g)
        g = g * scale[:, None]
        if entropy is not None:
            p = torch.exp(z - lse[:, None])
            ent = p * (z - entropy[1].to(cdt)[:, None]) * entropy[0].to(cdt)[:, None]
            if keep is not None:
                ent = torch.where(mask[: g.shape[0], : g.shape[1]], ent, 0.0)
            g = g + ent
        if softcap > 0:
            g = g * (1 - (z / softcap) ** 2)
        if dbias is not None:
            dbias[v0:v1] = g.sum(dim=0).to(dbias.dtype)
        g = g * logit_scale
        de += g @ cc
        dc[v0:v1] = (g.T @ ef).to(c.dtype)
    return (de if de_fp32 else de.to(e.dtype)), dc
