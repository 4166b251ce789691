"""Hugging Face ``transformers`` causal LMs with cce-dist's loss: ``patch(model)``, one line.

After ``patch(model)``, ``model(input_ids, labels=labels).loss`` is computed by
:func:`cce_dist.linear_cross_entropy` from the hidden states and the output embedding's weight:
no N x V logits exist when labels are given (the output's ``logits`` is None then). Without
labels the model returns its logits as before.

It keeps what ``transformers``' own causal-LM loss does: labels shifted by one (or the
``shift_labels`` keyword), ``ignore_index=-100``, the mean over non-ignored tokens, or the sum
divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), tied input
and output embeddings (the one weight gets both gradients), a bias on the output layer, and
Gemma's ``final_logit_softcapping``.

How: the model's own ``forward`` runs with ``labels=None`` while its output embedding, for that
call, records the hidden states it is given and returns an empty tensor instead of the logits;
the loss is then computed from those hidden states. So any family whose causal-LM head is its
``get_output_embeddings()`` module applied to the decoder's hidden states works; tested: Llama,
Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text).
"""

from __future__ import annotations

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

    ``filter_eps``, ``backend``: as in :func:`cce_dist.linear_cross_entropy`. ``group``: not yet
    supported (a vocabulary-sharded output layer needs the model's tensor parallelism to shard
    it: use :class:`cce_dist.deepspeed.VocabParallelCCEHead` there).
    """
    if group is not None:
        raise NotImplementedError(
            "cce_dist.transformers.patch(group=...) is not supported yet: shard the output layer "
            "with cce_dist.deepspeed.VocabParallelCCEHead (DeepSpeed) or CCEGPTModel (Megatron)")
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

    def forward(self, *args, labels: Optional[torch.Tensor] = None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        captured = []

        def record(hidden: torch.Tensor) -> torch.Tensor:
            captured.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)

        head.forward = record
        try:
            outputs = original(*args, labels=None, **kwargs)
        finally:
            del head.forward
        if len(captured) != 1:
            raise RuntimeError(f"patch(): expected the output embedding to be applied once, it "
                               f"was applied {len(captured)} times")
        loss = _causal_lm_loss(
            captured[0], head, labels, kwargs.get("num_items_in_batch"),
            kwargs.get("shift_labels"), softcap, filter_eps, backend)
        # A fresh output, loss first (outputs[0] is the loss, as transformers returns it) and
        # no logits entry (assigning None to a ModelOutput attribute keeps the dict's value).
        rest = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        return type(outputs)(loss=loss, **rest)

    model._cce_dist_forward = original
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`."""
    original = getattr(model, "_cce_dist_forward", None)
    if original is not None:
        del model.forward
        del model._cce_dist_forward
    return model


def _causal_lm_loss(hidden, head, labels, num_items_in_batch, shift_labels, softcap,
                    filter_eps, backend) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)``, without the logits."""
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
    loss = linear_cross_entropy(
        hidden, weight, shift_labels, ignore_index=IGNORE_INDEX, reduction=reduction,
        filter_eps=filter_eps, backend=backend, bias=head.bias,
        softcap=softcap if softcap else None)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
