"""``linear_logprobs_entropy``: per-token logprobs and entropies for RL, without the logits."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from cce_dist.kernels import BACKENDS, resolve_backend
from cce_dist.parallel import shard_layout
from cce_dist.parallel.consistency import report_local_error
from cce_dist.parallel.logprobs import LogprobsEntropyFunction

from .loss import _world_size
from .validation import check_inputs, check_target_range


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
                           gathered_rows=world if sequence_parallel else 1)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0.0 < temperature and math.isfinite(temperature)
        ):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        if vocab_start is not None and (
            isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
        ):
            raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")
    except (TypeError, ValueError):
        if group is not None:
            report_local_error(group)
        raise
    d = e.shape[-1]
    e2 = e.reshape(-1, d)
    t1 = targets.reshape(-1).contiguous()
    if group is None:
        if vocab_start not in (None, 0):
            raise ValueError(f"vocab_start must be None or 0 without a group, got {vocab_start!r}")
        start, vocab_size = 0, c.shape[0]
    else:
        layout = shard_layout(
            group, rows=e2.shape[0], d=d, shard_rows=c.shape[0], vocab_start=vocab_start,
            dtype=e.dtype, reduction="none", ignore_index=ignore_index,
            sequence_parallel=sequence_parallel, num_targets=t1.numel(), filter_eps=eps,
            function=1, temperature=float(temperature),
        )
        start, vocab_size = layout.vocab_start, layout.vocab_size
    check_target_range(targets, vocab_size, ignore_index)
    if e2.stride(-1) != 1:
        e2 = e2.contiguous()
    if c.stride(-1) != 1:
        c = c.contiguous()
    logprobs, entropy = LogprobsEntropyFunction.apply(
        e2, c, t1, ignore_index, eps, start, vocab_size, resolve_backend(backend, e2), group,
        sequence_parallel, 1.0 / temperature,
    )
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)
