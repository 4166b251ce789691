"""DeepSpeed: a vocabulary-parallel CCE head, the model-parallel unit, and a converter.

* :class:`VocabParallelCCEHead` owns its rank's rows of the output layer and computes the loss in
  its own ``forward(hidden, labels)``. Under ZeRO-3 DeepSpeed gathers a module's parameters for
  its forward only, so a head that holds its shard and computes the loss inside that forward is
  ZeRO-3-safe by construction. Its parameters carry ``tensor_model_parallel`` (DeepSpeed then
  counts them on every TP rank in the gradient norm) and are not ``nn.Linear`` (AutoTP leaves
  them alone).
* :func:`make_mpu` builds the model-parallel unit ``deepspeed.initialize(mpu=...)`` needs, or,
  when the DeepSpeed config sets ``tensor_parallel.autotp_size``, wraps DeepSpeed's own
  tensor-/data-parallel groups (created early, so that the head and AutoTP share them).
  It is mandatory: without it DeepSpeed treats every rank as data-parallel, broadcasts rank 0's
  shard over the others at initialisation and averages the shards' gradients across the
  tensor-parallel ranks, silently training one wrong shard everywhere. The head detects that at
  its first forward (the shards of the TP ranks have become identical) and raises.
* :func:`convert_lm_head` swaps a model's ``nn.Linear`` head for the CCE head and returns a
  module that computes the loss inside its forward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .loss import linear_cross_entropy
from .parallel import vocab_range
from .parallel.collectives import all_gather_dim0, group_device
from .parallel.consistency import report_local_error

TP_ATTRS = {"tensor_model_parallel": True, "partition_dim": 0, "partition_stride": 1}


def _rank_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class VocabParallelCCEHead(nn.Module):
    """Rows ``vocab_range(vocab_size, rank, world)`` of a (vocab_size, hidden_size) output layer.

    ``forward(hidden (..., hidden_size), labels (...))`` returns the loss of
    ``linear_cross_entropy`` (mean over non-ignored tokens by default), the same on every rank
    of ``group``. A bias (this rank's rows) is added to the logits inside the kernels.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        group=None,
        bias: bool = False,
        ignore_index: int = -100,
        reduction: str = "mean",
        filter_eps: Union[str, float, None] = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        rank, world = _rank_world(group)
        if vocab_size < world:
            raise ValueError(f"vocab_size ({vocab_size}) must be >= the group size ({world})")
        self.group, self.vocab_size = group, vocab_size
        self.vocab_start, end = vocab_range(vocab_size, rank, world)
        self.ignore_index, self.reduction, self.filter_eps = ignore_index, reduction, filter_eps
        rows = end - self.vocab_start
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype))
        for p in self.parameters():
            for k, v in TP_ATTRS.items():
                setattr(p, k, v)
        self._shards_checked = world == 1

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group=None, **kwargs) -> "VocabParallelCCEHead":
        """This rank's rows of an existing ``nn.Linear(hidden, vocab)`` head (even split)."""
        vocab, hidden = linear.weight.shape
        head = cls(vocab, hidden, group=group, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        lo, hi = head.vocab_start, head.vocab_start + head.weight.shape[0]
        with torch.no_grad():
            head.weight.copy_(linear.weight[lo:hi])
            if linear.bias is not None:
                head.bias.copy_(linear.bias[lo:hi])
        return head

    def _check_shards_differ(self) -> None:
        """Identical shards on two TP ranks mean DeepSpeed broadcast one over the others."""
        w = self.weight.detach().double()
        stats = torch.stack([w.sum(), (w * w).sum(), w[: min(4, w.shape[0])].sum()])
        world = dist.get_world_size(self.group)
        table = all_gather_dim0(stats.to(group_device(self.group))[None], self.group)
        rows = [tuple(r) for r in table.tolist()]
        if len(set(rows)) < world:
            raise RuntimeError(
                "VocabParallelCCEHead: the vocabulary shards of two tensor-parallel ranks are "
                "identical, so DeepSpeed broadcast one rank's shard over the others (and would "
                "average their gradients). Pass mpu=cce_dist.deepspeed.make_mpu(tp_size) to "
                "deepspeed.initialize."
            )
        self._shards_checked = True

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self._shards_checked:
            self._check_shards_differ()
        return linear_cross_entropy(
            hidden, self.weight, labels, ignore_index=self.ignore_index,
            reduction=self.reduction, filter_eps=self.filter_eps,
            vocab_start=self.vocab_start if self.group else None, group=self.group,
            bias=self.bias,
        )


def _check_tensor_parallel_size(t: int) -> int:
    """The world size, once ``t`` is known to divide it."""
    world = dist.get_world_size()
    if t < 1 or world % t:
        raise ValueError(f"tensor_parallel_size ({t}) must divide the world size ({world})")
    return world


class ModelParallelUnit:
    """Megatron-style getters over a tensor-parallel and a data-parallel group (see
    :func:`make_mpu` for the two ways of building one)."""

    def __init__(self, tp_group, dp_group) -> None:
        self._tp, self._dp = tp_group, dp_group
        self._tp_ranks = dist.get_process_group_ranks(tp_group)
        self._dp_ranks = dist.get_process_group_ranks(dp_group)
        self._tp_size, self._dp_size = len(self._tp_ranks), len(self._dp_ranks)

    @classmethod
    def contiguous(cls, tensor_parallel_size: int) -> "ModelParallelUnit":
        """With world W and TP size t: TP group k is ranks [k t, (k+1) t), DP group j is ranks
        j, j + t, j + 2t, ..."""
        t = tensor_parallel_size
        world, rank = _check_tensor_parallel_size(t), dist.get_rank()
        tp = dp = None
        for k in range(world // t):  # every rank creates every group, in the same order
            ranks = list(range(k * t, (k + 1) * t))
            g = dist.new_group(ranks)
            tp = g if rank in ranks else tp
        for j in range(t):
            ranks = list(range(j, world, t))
            g = dist.new_group(ranks)
            dp = g if rank in ranks else dp
        return cls(tp, dp)

    @classmethod
    def from_deepspeed_groups(cls, tensor_parallel_size: int) -> "ModelParallelUnit":
        """DeepSpeed's own AutoTP groups (``deepspeed.utils.groups``), created now if they do
        not exist yet; ``deepspeed.initialize`` with the same ``autotp_size`` then reuses them."""
        import deepspeed
        from deepspeed.utils import groups

        if not deepspeed.comm.is_initialized():  # wraps the existing torch process group
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        _check_tensor_parallel_size(tensor_parallel_size)
        groups._init_tp_mesh_device(tensor_model_parallel_size=tensor_parallel_size)
        unit = cls(groups.get_tensor_model_parallel_group(), groups.get_data_parallel_group())
        if unit._tp_size != tensor_parallel_size:
            raise ValueError(f"DeepSpeed's tensor-parallel groups have {unit._tp_size} ranks, "
                             f"not tensor_parallel_size={tensor_parallel_size}")
        return unit

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._tp_ranks[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return self._dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)


def make_mpu(tensor_parallel_size: int, config: Optional[dict] = None) -> ModelParallelUnit:
    """The ``mpu`` for ``deepspeed.initialize``: call on every rank after the process group
    exists; pass ``mpu.get_tensor_model_parallel_group()`` as the head's ``group``. Its groups
    are contiguous TP groups and strided DP groups (:meth:`ModelParallelUnit.contiguous`).

    With ``config`` (the DeepSpeed config dict) setting ``tensor_parallel.autotp_size``, the unit
    wraps DeepSpeed's own AutoTP groups instead of building its own (the sizes must agree).
    """
    autotp = ((config or {}).get("tensor_parallel") or {}).get("autotp_size", 0)
    if autotp:
        if autotp != tensor_parallel_size:
            raise ValueError(f"config tensor_parallel.autotp_size ({autotp}) differs from "
                             f"tensor_parallel_size ({tensor_parallel_size})")
        return ModelParallelUnit.from_deepspeed_groups(tensor_parallel_size)
    return ModelParallelUnit.contiguous(tensor_parallel_size)


class _PassHidden(nn.Module):
    """Stands in for the replaced head: hands the hidden states through as the 'logits'."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class CCELossModel(nn.Module):
    """A model whose ``nn.Linear`` head became a :class:`VocabParallelCCEHead`.

    ``forward(*args, labels=..., **kwargs)`` runs the wrapped model (its head now passes the
    hidden states through) and returns the CCE loss. With ``shift_labels`` (causal LMs, as in
    Hugging Face), position t predicts label t + 1.
    """

    def __init__(self, model: nn.Module, head: VocabParallelCCEHead, shift_labels: bool) -> None:
        super().__init__()
        self.model, self.head, self.shift_labels = model, head, shift_labels

    def forward(self, *args, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        hidden = out if isinstance(out, torch.Tensor) else (
            out.logits if hasattr(out, "logits") else out[0])
        if self.shift_labels:
            hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        return self.head(hidden.contiguous(), labels.contiguous())


def convert_lm_head(
    model: nn.Module,
    *,
    group=None,
    head_attr: str = "lm_head",
    untie: bool = False,
    shift_labels: bool = True,
    **head_kwargs,
) -> CCELossModel:
    """Replace ``model.<head_attr>`` (an ``nn.Linear``) by this rank's CCE head shard.

    A head whose weight is shared with another parameter (tied embeddings) is refused with a
    ``ValueError`` unless ``untie=True``, which gives the head its own copy (the embedding keeps
    its weight; from then on they train apart). Returns the :class:`CCELossModel` to train.
    """
    linear = getattr(model, head_attr, None)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"model.{head_attr} must be an nn.Linear, got {type(linear).__name__}")
    shared = [name for name, p in model.named_parameters(remove_duplicate=False)
              if p is linear.weight and not name.startswith(f"{head_attr}.")]
    if shared and not untie:
        raise ValueError(
            f"model.{head_attr}.weight is tied to {shared[0]}: a vocabulary-parallel head cannot "
            f"share it; pass untie=True to give the head its own copy, or keep the tied head"
        )
    head = VocabParallelCCEHead.from_linear(linear, group=group, **head_kwargs)
    setattr(model, head_attr, _PassHidden())
    return CCELossModel(model, head, shift_labels)


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    tp_group=None,
    sp_group=None,
    vocab_start_index: Optional[int] = None,
    vocab_end_index: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """A drop-in for DeepSpeed's ``deepspeed.sequence.linear_cross_entropy.
    vocab_parallel_linear_cross_entropy``: same arguments, same values, computed by cce-dist.

    ``hidden`` (..., H) is identical on every rank of ``tp_group`` (as for a column-parallel
    layer); ``weight`` (V_r, H) and ``bias`` (V_r,) are this rank's contiguous vocabulary rows
    ``[vocab_start_index, vocab_end_index)`` (default: even shards in rank order). Under
    DeepSpeed's sequence parallelism (Ulysses) each rank of ``sp_group`` holds different tokens:
    ``"mean"`` divides by the non-ignored tokens of all SP ranks and ``"mean"`` / ``"sum"``
    return the SP-global value, whose gradient reaches this rank's tokens only (DeepSpeed's
    meaning: the SP ranks' gradients add up to a single process's on the whole sequence).
    ``"none"``: the per-token losses in ``target``'s shape (0 where ignored), not reduced over
    ``sp_group``. ``chunk_size`` is accepted for compatibility and ignored (cce-dist chunks on
    its own). Mixed dtypes follow DeepSpeed (the autocast dtype, else hidden's and weight's
    promoted one). A target outside the vocabulary raises on the CPU and gives NaN on CUDA
    (DeepSpeed raises, after a host synchronization). Returns fp32 (fp64 for fp64 inputs).
    """
    group = tp_group if _rank_world(tp_group)[1] > 1 else None
    try:
        _check_dropin_arguments(weight, reduction, vocab_start_index, vocab_end_index,
                                chunk_size, group)
    except ValueError:
        if group is not None:  # the other ranks raise too instead of waiting in the check
            report_local_error(group)
        raise
    # DeepSpeed's dtype rule: the autocast dtype if autocast is on, else hidden's and weight's
    # promoted dtype; the casts carry the gradients back to the inputs' dtypes.
    device_type = hidden.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else torch.promote_types(hidden.dtype, weight.dtype))
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    per_token = linear_cross_entropy(
        hidden, weight, target, bias=bias, group=group, ignore_index=ignore_index,
        reduction="none", vocab_start=vocab_start_index if group is not None else None)
    if reduction == "none":
        return per_token
    return sequence_parallel_reduce(per_token.sum(), target, ignore_index, reduction, sp_group)


def sequence_parallel_reduce(local_sum: torch.Tensor, target: torch.Tensor, ignore_index: int,
                             reduction: str, sp_group) -> torch.Tensor:
    """DeepSpeed's Ulysses reduction of a loss: ``local_sum`` (a scalar) is the sum of the
    per-token losses of this rank's tokens ``target``; each rank of ``sp_group`` holds its own
    slice of the sequence. ``"sum"``: the sum over every SP rank's tokens; ``"mean"``: that sum
    divided by the non-ignored tokens of all SP ranks (at least 1, so that a rank, or every
    rank, without a valid token gives 0, not NaN). The value is the same on every SP rank; its
    gradient reaches this rank's tokens only, so that the SP ranks' gradients add up to those of
    a single process on the whole sequence (DeepSpeed's engine sums the gradients of the SP
    ranks and averages over data-parallel ranks). Collectives: one all-reduce of a scalar for
    ``"sum"``, two for ``"mean"``, with no host synchronization; without ``sp_group`` (or at
    world size 1), the local reduction and none."""
    sp = sp_group if _rank_world(sp_group)[1] > 1 else None
    loss = local_sum
    if reduction == "mean":
        valid = (target != ignore_index).sum().to(loss.dtype)
        if sp is not None:
            dist.all_reduce(valid, group=sp)
        loss = loss / valid.clamp(min=1)
    if sp is None:
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total, group=sp)
    return loss + (total - loss.detach())  # the SP-global value; the gradient of the local part


def _check_dropin_arguments(weight, reduction, vocab_start_index, vocab_end_index, chunk_size,
                            group) -> None:
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if (vocab_start_index is None) != (vocab_end_index is None):
        raise ValueError("vocab_start_index and vocab_end_index must be given together")
    if vocab_start_index is not None and vocab_end_index - vocab_start_index != weight.shape[0]:
        raise ValueError(f"vocab_end_index - vocab_start_index ({vocab_end_index} - "
                         f"{vocab_start_index}) must equal weight's rows ({weight.shape[0]})")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if group is None and vocab_start_index not in (None, 0):
        raise ValueError(f"vocab_start_index must be 0 without a tensor-parallel group, got "
                         f"{vocab_start_index}")
