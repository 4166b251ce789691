"""The autograd function behind ``cce_dist.linear_logprobs_entropy``: per-token log-probabilities
of the targets and entropies of the softmax, without the N x V logits.

With ``z = e @ c.T * logit_scale`` (1 / temperature, applied in fp32) over all vocabulary rows
(all shards):

* ``logprob_n = z_{n, t_n} - LSE_n`` (0 at ignored tokens);
* ``entropy_n = LSE_n - sum_j p_{n, j} z_{n, j}`` (0 at ignored tokens).

Forward: the kernels give each shard's LSE, target logit and softmax-weighted mean logit; one
all-gather of the packed three combines them (``LSE = logsumexp_r LSE_r``, the target summed,
the mean weighted by ``exp(LSE_r - LSE)``: exact). Backward, for upstream gradients ``a`` (of the
logprobs) and ``b`` (of the entropies): ``dz_j = -a (p_j - onehot_j) - b p_j (z_j - mean)``, one
kernel pass per shard with the same filter as the loss; dE is reduced across ranks as the loss's.
"""

from __future__ import annotations

from typing import Optional

import torch

from cce_dist.kernels import cce_backward, cce_forward
from cce_dist.kernels.combine import softmax_weighted_mean

from .collectives import all_gather_dim0, all_reduce_, gather_stats, reduce_scatter_dim0
from .function import _first_order_only


class LogprobsEntropyFunction(torch.autograd.Function):
    """Inputs: e (N, D) (with ``sequence_parallel``: this rank's (N / world, D) slice), c (V_r,
    D), targets (N,) global ids. Outputs: logprobs (N,), entropy (N,), fp32 (fp64 for fp64
    inputs); NaN where a non-ignored target is outside [0, vocab_size)."""

    @staticmethod
    def forward(
        ctx,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        filter_eps: Optional[float],
        vocab_start: int,
        vocab_size: int,
        backend: str,
        group=None,
        sequence_parallel: bool = False,
        logit_scale: float = 1.0,
    ):
        if group is not None and sequence_parallel:
            e = all_gather_dim0(e, group)
        lse, target_logit, tile_max, mean = cce_forward(
            e, c, targets, vocab_start, backend, False, 0.0, None, True, logit_scale)
        if group is not None:
            stats, agree = gather_stats([lse, target_logit, mean], targets, group)
            lse = torch.logsumexp(stats[:, 0], dim=0)
            target_logit = stats[:, 1].sum(dim=0)
            mean = softmax_weighted_mean(stats[:, 0], stats[:, 2])
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < vocab_size)
        bad = valid & ~in_range
        if group is not None:  # targets that differ between ranks: NaN, not a wrong value
            bad = bad | ~agree
        logprobs = torch.where(valid, target_logit - lse, 0.0)
        entropy = torch.where(valid, lse - mean, 0.0)
        logprobs = torch.where(bad, torch.nan, logprobs)
        entropy = torch.where(bad, torch.nan, entropy)
        ctx.save_for_backward(e, c, targets, lse, tile_max, valid, mean)
        ctx.config = (filter_eps, vocab_start, vocab_size, backend, group, sequence_parallel,
                      logit_scale)
        return logprobs, entropy

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_logprobs: Optional[torch.Tensor],
                 grad_entropy: Optional[torch.Tensor]):
        e, c, targets, lse, tile_max, valid, mean = ctx.saved_tensors
        (filter_eps, vocab_start, vocab_size, backend, group, sequence_parallel,
         logit_scale) = ctx.config
        zeros = torch.zeros_like(lse)
        a = zeros if grad_logprobs is None else grad_logprobs.to(lse.dtype)
        b = zeros if grad_entropy is None else grad_entropy.to(lse.dtype)
        grad_scale = torch.where(valid, -a, 0.0).contiguous()
        ent_scale = torch.where(valid, -b, 0.0).contiguous()
        de, dc, _ = cce_backward(
            e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
            de_fp32=group is not None, vocab_size=vocab_size, ent_scale=ent_scale,
            mean_logit=mean.contiguous(), logit_scale=logit_scale)
        if group is not None:
            de = reduce_scatter_dim0(de, group) if sequence_parallel else all_reduce_(de, group)
        return (de.to(e.dtype), dc) + (None,) * 9
