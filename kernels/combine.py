"""Combining per-part token statistics (column groups, chunks, vocabulary shards) on the host."""

from __future__ import annotations

import torch


def softmax_weighted_mean(lse_parts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_s w_s values_s / sum_s w_s`` over dim 0, with ``w_s = exp(lse_s - max_s lse_s)``:
    each part's (P, N) softmax-weighted mean of something (the logits, for the entropy) turned
    into the whole softmax's. The weights are normalized by their own sum: ``exp(lse_s - LSE)``
    would carry the fp32 rounding of the LSE itself (7.6e-6 at |LSE| ~ 100) into every weight,
    an error of that times the mean (4e-4 nats of entropy at logits ~ 100). Parts of -inf LSE
    (no rows) weigh 0."""
    top = lse_parts.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w = torch.exp(lse_parts - top)
    total = (w * torch.where(w > 0, values, 0.0)).sum(dim=0)
    return total / w.sum(dim=0)
