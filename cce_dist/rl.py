"""``linear_logprobs_entropy``: per-token logprobs and entropies for RL, without the logits."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from cce_dist.kernels import BACKENDS, resolve_backend
from cce_dist.parallel.consistency import report_local_error
from cce_dist.parallel.logprobs import LogprobsEntropyFunction

from .loss import _world_size, check_vocab_start, flat_inputs
from .validation import check_inputs


def linear_logprobs_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    filter_eps: Union[str, float, None] = "auto",
    vocab_start: Optional[int] = None,
    group: Optional["torch.distributed.ProcessGroup"] = None,
    sequence_parallel: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's log-probability and each token's entropy under ``softmax(e @ c.T / T)``,
    computed blockwise (PPO / GRPO policy losses with an entropy bonus).

    Args:
        e: (..., D) hidden states, bf16 / fp16 / fp32 / fp64; c: (V, D) classifier (with
            ``group``: this rank's vocabulary shard) of the same dtype and device; targets:
            integer tensor of e's leading shape.
        temperature: > 0; the logits are ``e @ c.T / temperature`` (the division is applied
            to the fp32 products inside the kernels).
        ignore_index: tokens with this target get logprob 0 and entropy 0, and no gradient.
        filter_eps: as in :func:`cce_dist.linear_cross_entropy`. The default budget filter
            skips a backward tile only while bounds on the softmax mass of all skipped tiles
            stay within machine epsilon / 8 of each token's mass (and of each row's uniform
            share): the logprob's gradient ``a (onehot - p)`` loses at most that mass times
            ``|a|``; the entropy's gradient ``-b p_j (z_j - sum_k p_k z_k)`` loses at most that
            mass times ``|b|`` times the largest ``|z_j - sum_k p_k z_k|`` among skipped entries
            (their logits are far below the LSE, so this factor is about ``|log p_j|``, a few
            tens at most). ``None`` is exact.
        vocab_start, group, sequence_parallel, backend: as in
            :func:`cce_dist.linear_cross_entropy`.

    Returns:
        ``(logprobs, entropy)``, each of the targets' shape, fp32 (fp64 for fp64 inputs),
        differentiable in ``e`` and ``c`` with any upstream gradients; the same on every rank of
        ``group``. One all-gather in the forward, one dE reduction in the backward.
    """
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("linear_logprobs_entropy does not support torch.func transforms")
    world = _world_size(group, sequence_parallel)
    try:
        eps = check_inputs(e, c, targets, "none", filter_eps, backend, BACKENDS,
                           gathered_rows=world if sequence_parallel else 1,
                           ignore_index=ignore_index)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < temperature and math.isfinite(temperature)
        ):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        check_vocab_start(vocab_start)
    except (TypeError, ValueError):
        if group is not None:
            report_local_error(group)
        raise
    e2, c, t1, start, vocab_size = flat_inputs(
        e, c, targets, group, vocab_start, ignore_index, reduction="none",
        sequence_parallel=sequence_parallel, filter_eps=eps, function=1,
        temperature=float(temperature),
    )
    logprobs, entropy = LogprobsEntropyFunction.apply(
        e2, c, t1, ignore_index, eps, start, vocab_size, resolve_backend(backend, e2), group,
        sequence_parallel, 1.0 / temperature,
    )
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)
