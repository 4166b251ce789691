"""``linear_cross_entropy``: cross-entropy of ``e @ c.T`` without materializing the logits."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from cce_dist.kernels import BACKENDS, resolve_backend
from cce_dist.parallel import LinearCrossEntropyFunction

from .validation import check_inputs, check_target_range


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    filter_eps: Union[str, float, None] = "auto",
    vocab_start: Optional[int] = None,
    group: Optional["torch.distributed.ProcessGroup"] = None,
    sequence_parallel: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the logits ``e @ c.T`` against ``targets``, computed blockwise.

    Args:
        e: (..., D) embeddings (hidden states), bf16 / fp16 / fp32 / fp64.
        c: (V, D) classifier of the same dtype and device.
        targets: integer tensor of e's leading shape; entries equal to ``ignore_index`` are
            skipped.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored tokens; 0 if every token is ignored), ``"sum"``
            or ``"none"`` (per-token loss of the targets' shape, 0 where ignored).
        filter_eps: gradient filtering threshold. ``"auto"`` is the input dtype's machine epsilon
            / 32 (2^-12 for bf16, 2^-15 for fp16, 2^-28 for fp32): tiles of the backward in which
            every |softmax - onehot| is under it are skipped. ``None`` (or 0) is exact.
        vocab_start: global id of ``c``'s first row when ``c`` is a vocabulary shard (with
            ``group``); None means 0.
        group: the tensor-parallel process group over which ``c`` is sharded by vocabulary rows;
            None for a single device.
        sequence_parallel: with ``group``, ``e`` is this rank's slice of the sequence-first
            tokens and ``targets`` cover the gathered sequence.
        backend: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1, else the PyTorch
            reference), ``"triton"`` or ``"reference"``.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs), differentiable in ``e`` and ``c``. A token whose
        target lies outside [0, V) and is not ``ignore_index`` raises on the CPU and yields NaN
        on CUDA (see ``cce_dist.validation.check_target_range``).
    """
    eps = check_inputs(e, c, targets, reduction, filter_eps, backend, BACKENDS)
    if group is not None or sequence_parallel:
        raise NotImplementedError(
            "group / sequence_parallel: the vocabulary-parallel path is not implemented yet; "
            "pass group=None"
        )
    if vocab_start not in (None, 0):
        raise ValueError(f"vocab_start must be None or 0 without a group, got {vocab_start!r}")
    vocab_size = c.shape[0]
    check_target_range(targets, vocab_size, ignore_index)
    d = e.shape[-1]
    e2 = e.reshape(-1, d)
    t1 = targets.reshape(-1)
    # The kernels take a row-contiguous e and c; a copy here is rare and explicit.
    if e2.stride(-1) != 1:
        e2 = e2.contiguous()
    if c.stride(-1) != 1:
        c = c.contiguous()
    loss = LinearCrossEntropyFunction.apply(
        e2, c, t1, ignore_index, reduction, eps, 0, vocab_size, resolve_backend(backend, e2)
    )
    if reduction == "none":
        return loss.reshape(targets.shape)
    return loss


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``forward(e, c, targets)``."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        filter_eps: Union[str, float, None] = "auto",
        group: Optional["torch.distributed.ProcessGroup"] = None,
        sequence_parallel: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.filter_eps = filter_eps
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.backend = backend

    def forward(
        self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
        vocab_start: Optional[int] = None,
    ) -> torch.Tensor:
        return linear_cross_entropy(
            e, c, targets, ignore_index=self.ignore_index, reduction=self.reduction,
            filter_eps=self.filter_eps, vocab_start=vocab_start, group=self.group,
            sequence_parallel=self.sequence_parallel, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, filter_eps={self.filter_eps!r}"
