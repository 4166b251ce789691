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
MuP's output multiplier (``config.use_mup``, megatron-core 0.18+) scales the hidden states
before the loss, which scales the logits exactly as Megatron's ``_scale_logits`` does.

On megatron-core 0.18+, whose ``GPTModel.forward`` takes ``output_processor=``, an unmodified
``GPTModel`` gets the same loss per call with
``model(..., labels=labels, output_processor=cce_output_processor)``.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

try:
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cce_dist.megatron needs megatron-core: pip install 'cce-dist[megatron]'"
    ) from err

from .loss import linear_cross_entropy


def _inference_active() -> bool:
    try:  # megatron-core 0.18+
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return False
    return InferenceMode.is_active()


def _output_multiplier(config) -> float:
    """MuP's logit multiplier, or 1 (configs without MuP, megatron-core < 0.18)."""
    if getattr(config, "use_mup", False):
        return float(getattr(config, "mup_output_mult", 1.0))
    return 1.0


def _lm_loss(hidden_states, weight, labels, output_layer, config, filter_eps, main_grad,
             reduction="none", ignore_index=-100, mup=True):
    """Per-token loss [b, s] (fp32) from hidden states [s (/tp with SP), b, h] and labels [b, s],
    over the output layer's tensor-parallel group and sequence-parallel setting (a scalar for
    another ``reduction``); with ``main_grad``, the weight's gradient goes straight into its
    DDP ``main_grad``."""
    group = getattr(output_layer, "tp_group", None)
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    single = torch.distributed.get_world_size(group) == 1
    multiplier = _output_multiplier(config) if mup else 1.0
    if multiplier != 1.0:
        hidden_states = hidden_states * multiplier
    loss = linear_cross_entropy(
        hidden_states, weight, labels.transpose(0, 1).contiguous(), reduction=reduction,
        ignore_index=ignore_index, filter_eps=filter_eps, group=None if single else group,
        sequence_parallel=bool(output_layer.sequence_parallel) and not single,
        main_grad=main_grad,
    )
    return loss.transpose(0, 1).contiguous() if reduction == "none" else loss


def _check_output_layer(output_layer, parallel_output: bool, who: str) -> None:
    if not parallel_output:
        raise ValueError(
            f"{who}: parallel_output=False asks for gathered logits, which CCE never forms; "
            "use GPTModel's own loss, or parallel_output=True"
        )
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError(f"{who}: an output layer with a bias is not supported")


class CCEGPTModel(GPTModel):
    """``GPTModel`` whose language-model loss is cce-dist's vocabulary-parallel CCE.

    ``cce_filter_eps``: the loss's ``filter_eps``. ``cce_main_grad``: add the output weight's
    gradient straight into its fp32 ``main_grad`` under Megatron's DDP (no (V/tp, D) gradient
    tensor, no bf16 rounding per micro-batch); None (default) follows the config's
    ``gradient_accumulation_fusion``, as Megatron's own output layer does. ``True`` turns it on
    without that setting, whose other layers need APEX's or Transformer Engine's kernels."""

    def __init__(self, *args, cce_filter_eps: str | float | None = "auto",
                 cce_main_grad: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cce_filter_eps = cce_filter_eps
        self.cce_main_grad = cce_main_grad
        if self.post_process:
            _check_output_layer(self.output_layer, self.parallel_output, "CCEGPTModel")

    def _cce_serves(self, labels, kwargs) -> bool:
        return (
            labels is not None
            and self.post_process
            and self.config.mtp_num_layers is None
            and not kwargs.get("mtp_in_postprocess")
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and not getattr(self.config, "defer_embedding_wgrad_compute", False)
            and kwargs.get("output_processor") is None
            and not _inference_active()
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
        main_grad = self.cce_main_grad
        if main_grad is None:
            main_grad = bool(self.config.gradient_accumulation_fusion)
        return _lm_loss(hidden_states, weight, labels, self.output_layer, self.config,
                        self.cce_filter_eps, main_grad)


def cce_output_processor(
    *,
    hidden_states: torch.Tensor,
    output_layer,
    output_weight,
    labels,
    config,
    scale_logits,
    runtime_gather_output=None,
    inference_context=None,
    context=None,
    **_unused,
) -> torch.Tensor:
    """``GPTModel.forward(..., output_processor=cce_output_processor)`` (megatron-core 0.18+).

    With labels: the per-token loss [b, s] from cce-dist (``context`` may be a dict with
    ``filter_eps`` and ``main_grad``; the latter defaults to the config's
    ``gradient_accumulation_fusion``, see :class:`CCEGPTModel`). Without labels: Megatron's own logits [b, s, v/tp], as without a processor.
    Multi-token prediction has already run when the processor is called, so it composes with it.
    Refuses inference (pass no processor there) and what CCE cannot honour (gathered logits,
    an output-layer bias).
    """
    if inference_context is not None or _inference_active():
        raise ValueError("cce_output_processor serves training and evaluation losses; call "
                         "GPTModel without output_processor for inference")
    weight = output_layer.weight if output_weight is None else output_weight
    if labels is None:
        logits, _ = output_layer(hidden_states, weight=output_weight,
                                 runtime_gather_output=runtime_gather_output)
        return scale_logits(logits).transpose(0, 1).contiguous()
    gather = runtime_gather_output
    parallel_output = not (gather if gather is not None else output_layer.gather_output)
    _check_output_layer(output_layer, parallel_output, "cce_output_processor")
    context = context if isinstance(context, dict) else {}
    main_grad = context.get("main_grad", bool(config.gradient_accumulation_fusion))
    if main_grad and config.mtp_num_layers and not config.gradient_accumulation_fusion:
        # MTP's own output-layer calls would return real gradients, which DDP's hook then
        # ignores (the loss has flagged the weight's gradient as added to main_grad).
        raise ValueError("cce_output_processor: main_grad=True with multi-token prediction "
                         "needs gradient_accumulation_fusion, so that every use of the output "
                         "weight adds its gradient into main_grad")
    return _lm_loss(hidden_states, weight, labels, output_layer, config,
                    context.get("filter_eps", "auto"), main_grad)


class CCELinearCrossEntropyModule(ColumnParallelLinear):
    """The interface of Megatron-LM's ``LinearCrossEntropyModule``, computed by cce-dist.

    Megatron-LM's main branch builds its output layer as ``LinearCrossEntropyModule`` (a
    ``ColumnParallelLinear`` whose forward returns the loss when asked) under
    ``cross_entropy_fusion_impl='linear'``, with a Blackwell-only kernel. Released
    megatron-core (up to 0.19.2) has no such module; this class offers the same forward on any
    GPU that runs Triton, for code written against that interface:

    ``forward(input_ [s, b, h], weight=None, runtime_gather_output=None,
    output_cross_entropy_loss=False, labels=None [b, s], reduction="none", ignore_index=-100)``
    returns ``ColumnParallelLinear``'s ``(logits, bias)`` without ``output_cross_entropy_loss``,
    else the loss: [b, s] fp32 for ``reduction="none"``, a scalar otherwise. Constructor: that of
    ``ColumnParallelLinear``, plus ``cce_filter_eps`` and ``cce_main_grad`` (see
    :class:`CCEGPTModel`; None follows ``gradient_accumulation_fusion``). ``gather_output`` and
    a bias are refused for the loss, as in :class:`CCEGPTModel`.
    """

    def __init__(self, *args, cce_filter_eps: Union[str, float, None] = "auto",
                 cce_main_grad: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cce_filter_eps = cce_filter_eps
        self.cce_main_grad = cce_main_grad

    def forward(self, input_, weight=None, runtime_gather_output=None,
                output_cross_entropy_loss: bool = False, labels=None, reduction: str = "none",
                ignore_index: int = -100):
        if not output_cross_entropy_loss:
            return super().forward(input_, weight, runtime_gather_output)
        if labels is None:
            raise ValueError("CCELinearCrossEntropyModule: output_cross_entropy_loss=True needs "
                             "labels [b, s]")
        gather = runtime_gather_output
        _check_output_layer(self, not (gather if gather is not None else self.gather_output),
                            "CCELinearCrossEntropyModule")
        main_grad = self.cce_main_grad
        if main_grad is None:
            main_grad = bool(self.config.gradient_accumulation_fusion)
        return _lm_loss(input_, self.weight if weight is None else weight, labels, self,
                        self.config, self.cce_filter_eps, main_grad, reduction, ignore_index,
                        mup=False)  # the module is the plain product, as Megatron-LM's


def cpu_shims() -> None:
    """Let Megatron-Core run on the CPU over gloo (tests, examples): it asks for the current
    CUDA device and forks the CUDA RNG tracker, neither of which exists without a GPU."""
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
