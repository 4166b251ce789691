"""Collectives on flat dim-0-concatenated buffers, and the sequence-parallel gather.

torch renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to ``all_gather_single`` /
``reduce_scatter_single`` (2.13); both take outputs concatenated along dim 0, which is also the
only layout gloo accepts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...), rank order."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def gather_stats(rows: list[torch.Tensor], targets: torch.Tensor,
                 group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token statistics of this rank's shard, k rows of (N,) -> (world, k, N), every rank's,
    in one all-gather; and (N,) bool, whether every rank holds the same target for the token
    (the targets ride in the same gather, as floats: exact below 2^24 for fp32 statistics)."""
    world, n = dist.get_world_size(group), rows[0].shape[0]
    stats = all_gather_dim0(torch.stack([*rows, targets.to(rows[0].dtype)]), group)
    stats = stats.view(world, len(rows) + 1, n)
    ids = stats[:, -1]
    return stats[:, :-1], (ids == ids[:1]).all(dim=0)


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """(world * n, ...) on each rank -> this rank's (n, ...) slice of the sum over ranks."""
    world = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _reduce_scatter(out, x.contiguous(), group=group)
    return out


def start_reduction(x: torch.Tensor, group, scatter: bool):
    """Start summing ``x`` over the group without waiting: returns ``(out, work)``; ``out`` holds
    the sum (all-reduce, in place) or this rank's dim-0 slice of it (``scatter``) once
    ``work.wait()`` has returned (on NCCL: once the current stream has waited for it)."""
    if scatter:
        world = dist.get_world_size(group)
        out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
        return out, _reduce_scatter(out, x.contiguous(), group=group, async_op=True)
    return x, dist.all_reduce(x, group=group, async_op=True)


def all_reduce_(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


def group_device(group) -> torch.device:
    """Where this group's collectives take their tensors: the current GPU for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
