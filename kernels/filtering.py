"""Which backward tiles may be skipped: the gradient filter, shared by every backend.

Two filters, chosen by :class:`GradFilter`:

* ``budget`` (the default): a tile is skipped only when a *bound on the probability mass it
  holds* is small, and the bounds of all tiles skipped stay within a budget, per token and per
  vocabulary row. The forward's tile maxima give the bound for free: every token n of token
  block b has, in vocabulary tile j of width w_j,

      sum_{v in j} p_{n,v} <= w_j * exp(tile_max[b, j] - min_{n' in b} LSE_{n'}) =: bound[b, j].

  Per token (what dE loses), the skipped bounds of a block row sum to at most
  ``budget * V_r / V`` (this shard's share of the budget: the shards' skips add up to at most
  ``budget``). Per vocabulary row (what dC loses), the skipped mass of a tile column, summed over
  its tokens, is at most ``budget`` times the mass that column would hold under a uniform
  softmax (``N * w_j / V``). Within each limit the tiles with the smallest bounds go first
  (a sort and a cumulative sum on the device: no host synchronization). So a near-uniform
  softmax, where every tile holds about w_j / V, skips nothing, and a peaked one skips the tiles
  whose mass is provably negligible. Tiles holding a target are never skipped.
* ``entry`` (an explicit ``filter_eps`` float): the criterion of the CCE paper. A tile is dropped
  when every |softmax - onehot| in it is under ``eps``; its bound lets the kernels skip it
  without recomputing it. This bounds each entry, not what is dropped in total: near a uniform
  softmax over a large vocabulary (early training) every entry is under ``eps`` and tokens lose
  almost all of their gradient's softmax term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class GradFilter:
    kind: str  # "budget" or "entry"
    value: float  # the budget (fraction of probability mass) or the per-entry threshold

    def encode(self) -> float:
        """One float for the custom-op boundary and the cross-rank check: -budget or eps."""
        return -self.value if self.kind == "budget" else self.value


def decode_filter(code: Optional[float]) -> Optional[GradFilter]:
    if code is None:
        return None
    return GradFilter("budget", -code) if code < 0 else GradFilter("entry", code)


def default_budget(dtype: torch.dtype) -> float:
    """The 'auto' budget: the dtype's machine epsilon / 8 (2^-10 for bf16, 2^-13 for fp16,
    2^-26 for fp32): what is skipped stays under the rounding of the gradients themselves."""
    return torch.finfo(dtype).eps / 8


def _extents(total: int, tiles: int, block: int, device) -> torch.Tensor:
    """(tiles,) sizes of the blocks of ``block`` that cover ``total`` (the last one partial)."""
    return (total - torch.arange(tiles, device=device) * block).clamp(max=block)


def _max_prob(tile_max: torch.Tensor, lse: torch.Tensor, block_n: int) -> torch.Tensor:
    """(n_tiles, v_tiles): a bound on the largest probability in each tile,
    exp(tile max - the smallest LSE of the tile's tokens)."""
    n_tiles = tile_max.shape[0]
    padded = torch.nn.functional.pad(lse.float(), (0, n_tiles * block_n - lse.shape[0]),
                                     value=math.inf)
    return torch.exp(tile_max - padded.view(n_tiles, block_n).amin(dim=1)[:, None])


def tile_bounds(tile_max: torch.Tensor, lse: torch.Tensor, block_n: int, block_v: int,
                v: int) -> torch.Tensor:
    """(n_tiles, v_tiles) fp32 upper bounds on the probability mass any token of a token block
    holds in a vocabulary tile of this shard (``v`` rows), from the forward's tile maxima and
    the global LSE (N,)."""
    widths = _extents(v, tile_max.shape[1], block_v, lse.device)
    return widths * _max_prob(tile_max, lse, block_n)


def _within(cost: torch.Tensor, limit: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim``, the cheapest entries of ``cost`` whose running sum stays <= ``limit``."""
    ordered, order = cost.sort(dim=dim)
    fits = ordered.cumsum(dim=dim) <= limit
    return torch.zeros_like(fits).scatter(dim, order, fits)


def budget_skips(tile_max: torch.Tensor, lse: torch.Tensor, block_n: int, block_v: int, v: int,
                 vocab_size: int, budget: float) -> torch.Tensor:
    """(n_tiles, v_tiles) bool: the tiles the budget filter skips (see the module docstring).

    tile_max: the forward's per-tile maxima of this shard (fp32); lse: (N,) global LSE;
    v: rows of this shard; vocab_size: rows of all shards.
    """
    n = lse.shape[0]
    bound = tile_bounds(tile_max, lse, block_n, block_v, v)
    per_token = _within(bound, budget * v / vocab_size, dim=1)
    tokens = _extents(n, bound.shape[0], block_n, lse.device)
    column_limit = budget * n * _extents(v, bound.shape[1], block_v, lse.device) / vocab_size
    per_row = _within(bound * tokens[:, None], column_limit[None, :], dim=0)
    return per_token & per_row


def keep_tiles(tile_max: torch.Tensor, lse: torch.Tensor, block_n: int, block_v: int, v: int,
               vocab_size: int, grad_filter: GradFilter) -> torch.Tensor:
    """(n_tiles, v_tiles) int8: 1 where the backward must compute the tile (before the tiles
    holding a target, which the kernels always keep), 0 where the filter proves it negligible."""
    if grad_filter.kind == "budget":
        skip = budget_skips(tile_max, lse, block_n, block_v, v, vocab_size, grad_filter.value)
    else:  # every entry of the tile is provably under eps
        skip = _max_prob(tile_max, lse, block_n) < grad_filter.value
    return (~skip).to(torch.int8)
