"""Hugging Face ``transformers`` causal LMs with cce-dist's loss: ``patch(model)``, one line.

After ``patch(model)``, ``model(input_ids, labels=labels).loss`` is computed by
:func:`cce_dist.linear_cross_entropy` from the hidden states and the output embedding's weight:
no N x V logits exist when labels are given (the output's ``logits`` is None then). Without
labels the model returns its logits as before.

It keeps what ``transformers``' own causal-LM loss does: labels shifted by one (or the
``shift_labels`` keyword), ``ignore_index=-100``, the mean over non-ignored tokens, or the sum
divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), tied input
and output embeddings (the one weight gets both gradients), a bias on the output layer, and
Gemma's ``final_logit_softcapping``, Granite's and Cohere's logit scales, and a mixture of
experts' router loss (``aux_loss`` times ``router_aux_loss_coef``, added as transformers adds
it when labels are given).

Under DeepSpeed's Ulysses sequence parallelism, ``patch(model, sp_group=...)`` makes the loss
the mean over the whole sequence, held in slices by the ranks of ``sp_group`` (see
:func:`patch`).

How: the model's own ``forward`` runs with ``labels=None`` while its output embedding, for that
call, records the hidden states it is given and returns an empty tensor instead of the logits;
the loss is then computed from those hidden states. So any family whose causal-LM head is its
``get_output_embeddings()`` module applied to the decoder's hidden states works; tested: Llama,
Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text).
"""

from __future__ import annotations

import inspect
import os
import types
from typing import Optional, Union

import torch
from torch import nn

from .loss import linear_cross_entropy

IGNORE_INDEX = -100


def patch(
    model: nn.Module,
    *,
    group: Optional["torch.distributed.ProcessGroup"] = None,
    sp_group: Optional["torch.distributed.ProcessGroup"] = None,
    filter_eps: Union[str, float, None] = "auto",
    backend: str = "auto",
) -> nn.Module:
    """Make ``model`` (a ``transformers`` ``...ForCausalLM``) compute its training loss with
    cce-dist; returns the same model, patched in place (``unpatch`` undoes it).

    ``filter_eps``, ``backend``: as in :func:`cce_dist.linear_cross_entropy`.

    ``group``: ranks that hold the same batch (tensor-parallel ranks) share the loss's work by
    vocabulary rows. The output layer stays whole on every rank (generation, checkpoints and
    tied embeddings are unchanged); each rank computes the loss over its contiguous share of
    the rows (``cce_dist.parallel.vocab_range``), the ranks combine it with the loss's own
    collectives, and the weight's (and bias's) gradient comes back whole and the same on every
    rank, as without the group. For a head whose rows are stored sharded, use
    :class:`cce_dist.deepspeed.VocabParallelCCEHead`.

    ``sp_group``: DeepSpeed's Ulysses sequence parallelism (ALST): each rank of ``sp_group``
    runs the model on its own slice of the sequence (the ranks' attention exchanges the rest,
    e.g. ``UlyssesSPAttentionHF``) and passes that slice's ``shift_labels``, the labels shifted
    by one over the whole sequence before it was cut, as ``UlyssesSPDataLoaderAdapter`` does.
    Then:

    * ``loss`` is the mean over the non-ignored tokens of all SP ranks (or their sum divided by
      ``num_items_in_batch``, which then counts the tokens of the whole sequences, all SP ranks
      together, and is the same on every SP rank), the same value on every SP rank. A rank
      whose tokens are all ignored works (it adds 0); if no rank has one the loss is 0.
    * Its gradient reaches this rank's tokens only: each rank's backward gives the parameters
      this slice's share, and the sum over the SP ranks of each parameter's gradient is the
      gradient of a single process on the whole sequence. DeepSpeed's engine sums gradients
      over the SP ranks (and averages them over data-parallel ranks), so its step is that of
      the unsharded batch. The same convention as ``sp_group`` of
      :func:`cce_dist.deepspeed.vocab_parallel_linear_cross_entropy`.
    * ``shift_labels=`` is required when labels are given (``labels=`` alone would be shifted
      within the slice, losing the target that crosses into the next one: ``ValueError``);
      given both, ``labels`` is unused, as in ``transformers``. Every SP rank passes labels of
      the same shape (Ulysses' slices are equal) and the same ``num_items_in_batch``: the first
      call of each shape checks both with one small all-gather over ``sp_group`` before the
      model runs (every call with ``CCE_DIST_DEBUG=1``), and a mismatch or a rank's bad
      argument raises a ``ValueError`` on every SP rank. Every SP rank must pass labels when
      one does (not checked: a call without labels makes no collective of its own).
    * A mixture of experts' router loss is added as the model computes it on this rank's
      tokens.

    Do not pass ``sp_group`` under ``transformers``' Trainer with DeepSpeed's sequence
    parallelism (``sp_backend="deepspeed"``): the Trainer weights each rank's own mean by its
    token count and combines them itself, which is what ``patch(model)`` without ``sp_group``
    returns. With ``group`` too, ``group`` holds the ranks of the same slice (tensor-parallel
    ranks) and ``sp_group`` those of the other slices; they share only this rank.
    """
    sp = _sequence_parallel_group(sp_group, group)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"patch() takes a transformers causal LM whose get_output_embeddings() is "
                        f"an nn.Linear; got {type(model).__name__} with {type(head).__name__}")
    if getattr(model, "_cce_dist_forward", None) is not None:
        return model  # already patched
    original = model.forward
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(model, text_config)
    aux_coef = getattr(model, "router_aux_loss_coef",
                       getattr(text_config, "router_aux_loss_coef", 0.0))
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)  # labels may come positionally
        labels = bound.arguments.get("labels")
        if labels is None:
            return original(*args, **kwargs)
        bound.arguments["labels"] = None
        args, kwargs = bound.args, dict(bound.kwargs)
        if sp is not None:  # before the model's own collectives
            _check_sequence_parallel_call(sp, kwargs.get("shift_labels"),
                                          kwargs.get("num_items_in_batch"))
        # Work on the ModelOutput; a caller that asked for tuples gets one at the end.
        want_tuple = kwargs.get("return_dict") is False or (
            kwargs.get("return_dict") is None and getattr(config, "return_dict", True) is False)
        kwargs["return_dict"] = True
        captured = []

        def record(hidden: torch.Tensor) -> torch.Tensor:
            captured.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)

        head.forward = record
        try:
            outputs = original(*args, **kwargs)
        finally:
            del head.forward
        if len(captured) != 1:
            raise RuntimeError(f"patch(): expected the output embedding to be applied once, it "
                               f"was applied {len(captured)} times")
        hidden = captured[0] if scale == 1.0 else captured[0] * scale
        loss = _causal_lm_loss(
            hidden, head, labels, kwargs.get("num_items_in_batch"),
            kwargs.get("shift_labels"), softcap, filter_eps, backend, group, sp)
        if outputs.get("aux_loss") is not None:  # MoE routers: as transformers adds it
            loss = loss + aux_coef * outputs["aux_loss"].to(loss.device)
        # A fresh output, loss first (outputs[0] is the loss, as transformers returns it) and
        # no logits entry (assigning None to a ModelOutput attribute keeps the dict's value).
        rest = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        out = type(outputs)(loss=loss, **rest)
        return out.to_tuple() if want_tuple else out

    model._cce_dist_forward = original
    model.forward = types.MethodType(forward, model)
    return model


# What a causal LM's forward may do to the logits after its output embedding, and how patch()
# reproduces it: the softcap goes to the kernels, a scale multiplies the hidden states (exact
# when it is a power of two, as Granite's and Cohere's are).
_KNOWN_EPILOGUES = ("final_logit_softcapping", "torch.tanh(logits)", "self.config.logits_scaling",
                    "self.logit_scale", ".float()")


def _logit_scale(model: nn.Module, text_config) -> float:
    """The factor a model's forward applies to its logits (Granite divides by
    ``logits_scaling``, Cohere multiplies by ``logit_scale``); refuses a forward that does
    something else to them after the output embedding."""
    try:
        source = inspect.getsource(type(model).forward).split("\n")
    except (OSError, TypeError):
        source = []
    start = next((i for i, line in enumerate(source) if "self.lm_head(" in line), None)
    if start is not None:
        for line in source[start + 1:]:
            code = line.split("#")[0].strip()
            if "loss_function(" in code or code.startswith("return"):
                break
            if code.startswith("logits") and "=" in code and not any(
                    known in code for known in _KNOWN_EPILOGUES):
                raise NotImplementedError(
                    f"patch(): {type(model).__name__}'s forward changes the logits after its "
                    f"output layer in a way patch() does not reproduce: {code!r}")
    scale = 1.0
    if getattr(text_config, "logits_scaling", None):
        scale /= float(text_config.logits_scaling)
    if isinstance(getattr(model, "logit_scale", None), (int, float)):
        scale *= float(model.logit_scale)
    return scale


class _RowsOfReplicated(torch.autograd.Function):
    """Forward: rows [start, end) of a tensor every rank of ``group`` holds whole (the rank's
    contiguous share, ``vocab_range``). Backward: every rank's rows' gradients, gathered into
    the whole tensor's gradient, the same on every rank (one all-gather)."""

    @staticmethod
    def forward(ctx, whole: torch.Tensor, start: int, end: int, group) -> torch.Tensor:
        ctx.rows, ctx.group = whole.shape[0], group
        return whole[start:end].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        from .parallel import vocab_range
        from .parallel.collectives import all_gather_dim0

        world = dist.get_world_size(ctx.group)
        most = -(-ctx.rows // world)  # shards differ by one row at most: pad to the largest
        padded = grad.new_zeros((most, *grad.shape[1:]))
        padded[: grad.shape[0]] = grad
        gathered = all_gather_dim0(padded, ctx.group).view(world, most, *grad.shape[1:])
        sizes = [end - start for start, end in (vocab_range(ctx.rows, r, world)
                                                for r in range(world))]
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)]), None, None, None


def _sequence_parallel_group(sp_group, group):
    """``sp_group`` if it has more than one rank, else None; refuses what is not a process
    group, and a ``group`` that shares ranks other than this one with it (local checks, no
    collective)."""
    if sp_group is None:
        return None
    import torch.distributed as dist

    if not isinstance(sp_group, dist.ProcessGroup):
        raise TypeError(f"patch(): sp_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(sp_group).__name__}")
    if dist.get_world_size(sp_group) == 1:
        return None
    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"patch(): group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(group).__name__}")
        shared = (set(dist.get_process_group_ranks(group))
                  & set(dist.get_process_group_ranks(sp_group)))
        if shared != {dist.get_rank()}:
            raise ValueError(
                f"patch(): group (the ranks of one sequence slice) and sp_group (the ranks of "
                f"the other slices) must share this rank only; they share ranks {sorted(shared)}")
    return sp_group


_checked_calls: set = set()


def _check_sequence_parallel_call(sp, shift_labels, num_items_in_batch) -> None:
    """Local checks of a call under ``sp_group``, then, the first time a call of its kind is
    seen (every time with ``CCE_DIST_DEBUG=1``), one all-gather over ``sp`` of every rank's
    (rejected, labels' shape, num_items_in_batch): every rank raises the same error on a
    mismatch, before the model's own collectives could wait on a missing rank."""
    from .parallel.collectives import all_gather_dim0, group_device
    from .parallel.consistency import DEBUG_ENV

    error = None
    if shift_labels is None:
        error = ("patch(sp_group=...): pass shift_labels= (the labels shifted by one over the "
                 "whole sequence, then cut into the SP ranks' slices, as DeepSpeed's "
                 "UlyssesSPDataLoaderAdapter gives them); labels= alone would be shifted "
                 "within this rank's slice, losing the target at its end")
    elif shift_labels.dim() > 4:
        error = f"patch(sp_group=...): shift_labels has {shift_labels.dim()} dimensions"
    shape = tuple(shift_labels.shape) if error is None else ()
    has_items = num_items_in_batch is not None
    key = (id(sp), shape, has_items)
    if error is None and key in _checked_calls and os.environ.get(DEBUG_ENV, "0") != "1":
        return
    items = float(num_items_in_batch) if has_items and error is None else 0.0
    dims = list(shape) + [-1] * (4 - len(shape))
    row = torch.tensor([[int(error is not None), len(shape), *dims, int(has_items), items]],
                       dtype=torch.float64, device=group_device(sp))
    table = all_gather_dim0(row, sp).tolist()
    if error is not None:
        raise ValueError(error)
    failed = [r for r, x in enumerate(table) if x[0]]
    if failed:
        raise ValueError(f"patch(sp_group=...): SP rank(s) {failed} rejected their arguments "
                         f"(their own error names it); no rank computed the loss")
    for name, cols in (("the shape of shift_labels", slice(1, 6)),
                       ("whether num_items_in_batch is given", slice(6, 7)),
                       ("num_items_in_batch", slice(7, 8))):
        values = [tuple(x[cols]) for x in table]
        if len(set(values)) != 1:
            if cols.start == 1:
                values = [tuple(int(d) for d in v[1:1 + int(v[0])]) for v in values]
            raise ValueError(f"patch(sp_group=...): the SP ranks disagree on {name}: {values} "
                             f"(by SP rank); every SP rank holds an equal slice of the same "
                             f"sequences")
    _checked_calls.add(key)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`."""
    original = getattr(model, "_cce_dist_forward", None)
    if original is not None:
        del model.forward
        del model._cce_dist_forward
    return model


def _causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels, softcap,
                    filter_eps, backend, group=None, sp=None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)``, without the logits; with a
    ``group``, over this rank's share of the rows; with ``sp``, over the tokens of every SP
    rank (see :func:`patch`)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(f"patch(): labels {tuple(shift_labels.shape)} do not match the hidden "
                         f"states {tuple(hidden.shape[:-1])} (logits_to_keep must be 0 when "
                         f"labels are given)")
    weight = head.weight
    if weight.dim() != 2 or weight.numel() == 0:
        raise RuntimeError(
            f"patch(): the output embedding's weight is {tuple(weight.shape)} when the loss "
            f"needs it: a parameter-sharding wrapper (ZeRO-3 / FSDP) released it when its module "
            f"returned. DeepSpeed ZeRO-3 keeps it (tested); for other wrappers, use "
            f"cce_dist.deepspeed.convert_lm_head or compute the loss inside the head")
    hidden = hidden.to(weight.dtype)
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    bias, vocab_start = head.bias, None
    if group is not None:
        import torch.distributed as dist

        from .parallel import vocab_range

        vocab_start, end = vocab_range(weight.shape[0], dist.get_rank(group),
                                       dist.get_world_size(group))
        weight = _RowsOfReplicated.apply(weight, vocab_start, end, group)
        bias = None if bias is None else _RowsOfReplicated.apply(bias, vocab_start, end, group)
    loss = linear_cross_entropy(
        hidden, weight, shift_labels, ignore_index=IGNORE_INDEX,
        reduction="sum" if sp is not None else reduction, filter_eps=filter_eps,
        backend=backend, bias=bias, softcap=softcap if softcap else None, group=group,
        vocab_start=vocab_start)
    if sp is not None:
        from .deepspeed import sequence_parallel_reduce

        loss = sequence_parallel_reduce(loss, shift_labels, IGNORE_INDEX, reduction, sp)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
