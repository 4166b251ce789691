"""The autograd function that joins the CCE kernels into a loss.

Single device is the case ``group=None``. The vocabulary-parallel combine of partial LSEs and
target logits, and the reduction of dE, slot in between the kernel calls here.
"""

from __future__ import annotations

from typing import Optional

import torch

from cce_dist.kernels import cce_backward, cce_forward


def _reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored tokens; all ignored gives 0 (and zero gradients), not NaN.
    return total / valid.sum().clamp(min=1).to(total.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss_n = LSE_n - logit_{n, t_n} over all vocabulary rows, reduced.

    Inputs: e (N, D), c (V, D) of one float dtype, targets (N,) integer. Output: fp32 (fp64 for
    fp64 inputs) scalar, or (N,) for ``reduction="none"`` with 0 at ignored tokens and NaN at
    tokens whose target is outside [0, vocab_size) (no host sync needed to flag them).
    """

    @staticmethod
    def forward(
        ctx,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        filter_eps: Optional[float],
        vocab_start: int,
        vocab_size: int,
        backend: str,
    ) -> torch.Tensor:
        lse, target_logit, tile_max = cce_forward(e, c, targets, vocab_start, backend)
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < vocab_size)
        per_token = torch.where(valid, lse - target_logit, 0.0)
        per_token = torch.where(valid & ~in_range, torch.nan, per_token)
        ctx.save_for_backward(e, c, targets, lse, tile_max, valid)
        ctx.config = (reduction, filter_eps, vocab_start, backend)
        return _reduce(per_token, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        e, c, targets, lse, tile_max, valid = ctx.saved_tensors
        reduction, filter_eps, vocab_start, backend = ctx.config
        grad_out = grad_out.to(lse.dtype)
        if reduction == "mean":
            grad_out = grad_out / valid.sum().clamp(min=1).to(lse.dtype)
        grad_scale = torch.where(valid, grad_out.expand(valid.shape), 0.0).contiguous()
        de, dc = cce_backward(
            e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend
        )
        return de, dc, None, None, None, None, None, None, None
