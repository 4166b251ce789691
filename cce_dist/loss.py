"""``linear_cross_entropy``: cross-entropy of ``e @ c.T`` without materializing the logits."""

from __future__ import annotations

import torch
from torch import nn

from cce_dist.kernels import BACKENDS, resolve_backend
from cce_dist.parallel import LinearCrossEntropyFunction, shard_layout
from cce_dist.parallel.consistency import report_local_error

from .validation import check_inputs, check_options, check_target_range


def _world_size(group, sequence_parallel: bool) -> int:
    if group is None:
        if sequence_parallel:
            raise ValueError("sequence_parallel=True needs a group")
        return 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")
    return dist.get_world_size(group)


def check_vocab_start(vocab_start) -> None:
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    ):
        raise ValueError(f"vocab_start must be None or an int >= 0, got {vocab_start!r}")


def flat_inputs(e, c, targets, group, vocab_start, ignore_index, **fields):
    """e (..., D) -> (N, D), targets -> contiguous (N,), c and e row-contiguous, and this
    shard's first global row and the vocabulary size: 0 and c's rows without a group, else the
    layout every rank of ``group`` checked (``fields``: the call's options, which the ranks
    must share; see ``shard_layout``). Targets outside the vocabulary raise on the CPU."""
    d = e.shape[-1]
    e2 = e.reshape(-1, d)
    # Narrow integer targets (uint8, int8, int16) would wrap ignore_index and the vocabulary
    # size in comparisons (-100 as uint8 is class 156): their values, widened.
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.to(torch.int64)
    # The kernels read targets with unit stride; a strided view (t[::2], expand, labels[:, -1:])
    # becomes a copy of N integers here.
    t1 = targets.reshape(-1).contiguous()
    if group is None:
        if vocab_start not in (None, 0):
            raise ValueError(f"vocab_start must be None or 0 without a group, got {vocab_start!r}")
        start, vocab_size = 0, c.shape[0]
    else:
        layout = shard_layout(
            group, rows=e2.shape[0], d=d, shard_rows=c.shape[0], vocab_start=vocab_start,
            dtype=e.dtype, ignore_index=ignore_index, num_targets=t1.numel(), **fields,
        )
        start, vocab_size = layout.vocab_start, layout.vocab_size
    check_target_range(targets, vocab_size, ignore_index)
    # The kernels take a row-contiguous e and c; a copy here is rare and explicit.
    if e2.stride(-1) != 1:
        e2 = e2.contiguous()
    if c.stride(-1) != 1:
        c = c.contiguous()
    return e2, c, t1, start, vocab_size


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    filter_eps: str | float | None = "auto",
    vocab_start: int | None = None,
    group: torch.distributed.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    backend: str = "auto",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    main_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits ``e @ c.T`` against ``targets``, computed blockwise.

    Args:
        e: (..., D) embeddings (hidden states), bf16 / fp16 / fp32 / fp64.
        c: (V, D) classifier of the same dtype and device.
        targets: integer tensor of e's leading shape; entries equal to ``ignore_index`` are
            skipped.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (over non-ignored tokens; 0 if every token is ignored), ``"sum"``
            or ``"none"`` (per-token loss of the targets' shape, 0 where ignored).
        filter_eps: gradient filtering. ``"auto"`` (default): the budget filter, which skips a
            backward tile only while bounds on the probability mass of all skipped tiles stay
            within the input dtype's machine epsilon / 8 (2^-10 for bf16) per token and per
            vocabulary row (``cce_dist/kernels/filtering.py``); a near-uniform softmax loses
            nothing. A float: the per-entry threshold of the CCE paper (tiles whose every
            |softmax - onehot| is under it are dropped). ``None`` (or 0) is exact.
        vocab_start: global id of ``c``'s first row when ``c`` is a vocabulary shard (with
            ``group``); None means 0.
        group: the tensor-parallel process group over which ``c`` is sharded by vocabulary rows;
            None for a single device.
        sequence_parallel: with ``group``, ``e`` is this rank's slice of the sequence-first
            tokens and ``targets`` cover the gathered sequence.
        backend: ``"auto"`` (Triton on CUDA or under TRITON_INTERPRET=1, else the PyTorch
            reference), ``"triton"`` or ``"reference"``.
        label_smoothing: in [0, 1): ``F.cross_entropy``'s meaning, ``(1 - eps) * CE + eps *
            (LSE - mean_j z_j)`` with the mean over the whole (global) vocabulary.
        z_loss: >= 0: adds ``z_loss * LSE^2`` per token (PaLM's auxiliary loss).
        return_lse: also return each token's log-sum-exp over the whole vocabulary (targets'
            shape, fp32 / fp64, not differentiable; the same on every rank), which the forward
            computes anyway: for logging the z-loss term without a second pass.
        bias: (V,) (with ``group``: this rank's rows) added to the logits inside the kernels;
            differentiable. Any float dtype, on c's device.
        softcap: > 0: the logits (after the bias) become ``softcap * tanh(z / softcap)``
            (Gemma 2); label smoothing's mean, the z-loss and the filter all see the capped
            logits. With label smoothing too, the backward runs unfiltered.
        main_grad: Megatron-Core's gradient-accumulation fusion. When ``c`` is a parameter
            under Megatron's ``DistributedDataParallel`` (it carries ``main_grad`` and
            ``grad_added_to_main_grad``), the backward adds dC into ``c.main_grad`` (in fp32
            on the default engine) instead of returning a (V, D) gradient, and follows
            Megatron's protocol (``cce_dist/parallel/main_grad.py``). Otherwise no effect.

    Returns:
        The loss (with ``return_lse``: ``(loss, lse)``) in fp32 (fp64 for fp64 inputs),
        differentiable in ``e`` and ``c``, the same on every rank of ``group``. A token whose
        target lies outside [0, V) and is not ``ignore_index`` raises on the CPU and yields NaN
        on CUDA (see ``cce_dist.validation.check_target_range``).

    With a group, every rank must make the same call (same e rows, D, dtype, reduction,
    ignore_index, filter_eps) with its own shard; the ranks check this against each other, once
    per shape (every call with ``CCE_DIST_DEBUG=1``; see ``cce_dist.parallel.consistency``), and
    a mismatch raises ``ValueError`` on every rank.
    """
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "linear_cross_entropy does not support torch.func transforms (vmap, grad, jacrev, "
            "...): call it on whole batches and differentiate it with torch.autograd "
            "(loss.backward() / torch.autograd.grad)"
        )
    world = _world_size(group, sequence_parallel)
    try:
        eps = check_inputs(
            e, c, targets, reduction, filter_eps, backend, BACKENDS,
            gathered_rows=world if sequence_parallel else 1, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        )
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise TypeError(f"bias must be None or a floating-point tensor, got {got}")
            if tuple(bias.shape) != (c.shape[0],):
                raise ValueError(f"bias must have shape ({c.shape[0]},) (one entry per row of c), "
                                 f"got {tuple(bias.shape)}")
            if bias.device != c.device:
                raise ValueError(f"bias must be on c's device {c.device}, got {bias.device}")
        check_vocab_start(vocab_start)
        if not isinstance(main_grad, bool):
            raise TypeError(f"main_grad must be a bool, got {type(main_grad).__name__}")
    except (TypeError, ValueError):
        if group is not None:
            report_local_error(group)
        raise
    e2, c, t1, start, vocab_size = flat_inputs(
        e, c, targets, group, vocab_start, ignore_index,
        reduction=reduction, sequence_parallel=sequence_parallel, filter_eps=eps,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=float(softcap or 0.0), has_bias=bias is not None,
    )
    loss, lse = LinearCrossEntropyFunction.apply(
        e2, c, t1, ignore_index, reduction, eps, start, vocab_size,
        resolve_backend(backend, e2), group, sequence_parallel, float(label_smoothing),
        float(z_loss), float(softcap or 0.0), None if bias is None else bias.contiguous(),
        main_grad, torch.is_grad_enabled() and e2.requires_grad,
    )
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    return (loss, lse.reshape(targets.shape)) if return_lse else loss


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``forward(e, c, targets, vocab_start=None,
    bias=None)``; the other options are the module's."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        filter_eps: str | float | None = "auto",
        group: torch.distributed.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        backend: str = "auto",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        # Bad options fail here, not at the first call.
        check_options(reduction, filter_eps, backend, BACKENDS, ignore_index, label_smoothing,
                      z_loss, softcap)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.filter_eps = filter_eps
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.backend = backend

    def forward(
        self, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor,
        vocab_start: int | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_cross_entropy(
            e, c, targets, ignore_index=self.ignore_index, reduction=self.reduction,
            filter_eps=self.filter_eps, vocab_start=vocab_start, group=self.group,
            sequence_parallel=self.sequence_parallel, backend=self.backend,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, bias=bias,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name in (
            "label_smoothing", "z_loss", "softcap") if getattr(self, name))
        return f"reduction={self.reduction!r}, filter_eps={self.filter_eps!r}{extra}"
