"""Pure-PyTorch chunked reference for the CCE forward and backward.

Same interface as the Triton kernels (``cce_dist.kernels.triton_cce``) and, like them, it never
holds the N x V logits: it walks the vocabulary in chunks of ``chunk_size`` rows. It runs on any
device and is the oracle of the tests. Math is done in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

DEFAULT_CHUNK = 4096


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE and target logit of each token over the rows of ``c``.

    e: (N, D), c: (V, D), targets: (N,) integer global ids. Row v of ``c`` is global id
    ``vocab_start + v``. Returns ``(lse, target_logit)``, both (N,) in float32 (float64 for
    float64 inputs); ``target_logit`` is 0 where the target is not among these rows.
    """
    cdt = _compute_dtype(e.dtype)
    n, v = e.shape[0], c.shape[0]
    lse = torch.full((n,), -math.inf, dtype=cdt, device=e.device)
    tgt = torch.zeros((n,), dtype=cdt, device=e.device)
    local_t = targets.long() - vocab_start
    ef = e.to(cdt)
    for v0 in range(0, v, chunk_size):
        v1 = min(v0 + chunk_size, v)
        logits = ef @ c[v0:v1].to(cdt).T
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        inside = (local_t >= v0) & (local_t < v1)
        col = torch.where(inside, local_t - v0, 0)
        tgt = tgt + torch.where(inside, logits.gather(1, col[:, None])[:, 0], 0.0)
    return lse, tgt


def backward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    vocab_start: int = 0,
    filter_eps: Optional[float] = None,
    chunk_size: int = DEFAULT_CHUNK,
    de_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_n grad_scale[n] * (lse[n] - logit[n, t_n])`` in ``e`` and ``c``.

    ``lse`` is the LSE over the *whole* vocabulary (all shards); the softmax of this shard is
    ``exp(logits - lse)``. With ``filter_eps``, entries with ``|softmax - onehot| < filter_eps``
    are dropped (element-wise; the Triton kernels drop whole tiles). Returns ``(de, dc)`` in the
    dtypes of ``e`` and ``c`` (``de`` in the compute dtype with ``de_fp32``); ``de`` is this
    shard's partial contribution.
    """
    cdt = _compute_dtype(e.dtype)
    v = c.shape[0]
    local_t = targets.long() - vocab_start
    ef = e.to(cdt)
    lse = lse.to(cdt)
    scale = grad_scale.to(cdt)
    de = torch.zeros(e.shape, dtype=cdt, device=e.device)
    dc = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    for v0 in range(0, v, chunk_size):
        v1 = min(v0 + chunk_size, v)
        cc = c[v0:v1].to(cdt)
        g = torch.exp(ef @ cc.T - lse[:, None])
        inside = (local_t >= v0) & (local_t < v1)
        col = torch.where(inside, local_t - v0, 0)
        g.scatter_add_(1, col[:, None], -inside.to(cdt)[:, None])
        if filter_eps is not None:
            g = torch.where(g.abs() < filter_eps, 0.0, g)
        g = g * scale[:, None]
        de += g @ cc
        dc[v0:v1] = (g.T @ ef).to(c.dtype)
    return (de if de_fp32 else de.to(e.dtype)), dc
