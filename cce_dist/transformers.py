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

How: the model's own ``forward`` runs with ``labels=None`` while its output embedding, for that
call, records the hidden states it is given and returns an empty tensor instead of the logits;
the loss is then computed from those hidden states. So any family whose causal-LM head is its
``get_output_embeddings()`` module applied to the decoder's hidden states works; tested: Llama,
Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text).
"""

from __future__ import annotations

import inspect
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
    """
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
            kwargs.get("shift_labels"), softcap, filter_eps, backend, group)
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


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`."""
    original = getattr(model, "_cce_dist_forward", None)
    if original is not None:
        del model.forward
        del model._cce_dist_forward
    return model


def _causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels, softcap,
                    filter_eps, backend, group=None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)``, without the logits; with a
    ``group``, over this rank's share of the rows (see :func:`patch`)."""
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
        hidden, weight, shift_labels, ignore_index=IGNORE_INDEX, reduction=reduction,
        filter_eps=filter_eps, backend=backend, bias=bias,
        softcap=softcap if softcap else None, group=group, vocab_start=vocab_start)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
