"""Megatron-Core: cce-dist as the output-layer loss of ``GPTModel``.

``CCEGPTModel`` is a drop-in subclass of ``megatron.core.models.gpt.GPTModel`` (same constructor
arguments, plus ``cce_filter_eps``) whose ``_postprocess`` computes the per-token loss with
``cce_dist.linear_cross_entropy`` over the model's own output-layer weight (the shared embedding
weight when tied), its tensor-parallel group and its sequence-parallel setting. The padded
vocabulary rows are part of the softmax, exactly as in Megatron's own loss. It returns the loss
[b, s] in fp32, as ``compute_language_model_loss`` does, so a training script's ``loss_func``
and ``loss_mask`` stay unchanged.

Megatron's own path still serves what CCE cannot: no labels (logits are returned, e.g. for
inference), multi-token prediction, deferred embedding wgrad, and a pipeline stage without the
output layer. ``parallel_output=False`` and an output-layer bias are refused at construction.
"""

from __future__ import annotations

import contextlib
from typing import Union

import torch

try:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cce_dist.megatron needs megatron-core: pip install 'cce-dist[megatron]'"
    ) from err

from .loss import linear_cross_entropy


class CCEGPTModel(GPTModel):
    """``GPTModel`` whose language-model loss is cce-dist's vocabulary-parallel CCE."""

    def __init__(self, *args, cce_filter_eps: Union[str, float, None] = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.cce_filter_eps = cce_filter_eps
        if self.post_process:
            if not self.parallel_output:
                raise ValueError(
                    "CCEGPTModel: parallel_output=False asks for gathered logits, which CCE "
                    "never forms; use GPTModel, or parallel_output=True"
                )
            if getattr(self.output_layer, "bias", None) is not None:
                raise ValueError("CCEGPTModel: an output layer with a bias is not supported")

    def _cce_serves(self, labels, kwargs) -> bool:
        return (
            labels is not None
            and self.post_process
            and self.config.mtp_num_layers is None
            and not kwargs.get("mtp_in_postprocess")
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and not getattr(self.config, "defer_embedding_wgrad_compute", False)
        )

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if args or not self._cce_serves(labels, kwargs):
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, **kwargs
            )
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        group = getattr(self.output_layer, "tp_group", None)
        if group is None:
            group = parallel_state.get_tensor_model_parallel_group()
        single = torch.distributed.get_world_size(group) == 1
        # hidden_states: [s (/tp under sequence parallelism), b, h]; labels: [b, s].
        loss = linear_cross_entropy(
            hidden_states, weight, labels.transpose(0, 1).contiguous(), reduction="none",
            filter_eps=self.cce_filter_eps, group=None if single else group,
            sequence_parallel=bool(self.output_layer.sequence_parallel) and not single,
        )
        return loss.transpose(0, 1).contiguous()


def cpu_shims() -> None:
    """Let Megatron-Core run on the CPU over gloo (tests, examples): it asks for the current
    CUDA device and forks the CUDA RNG tracker, neither of which exists without a GPU."""
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
