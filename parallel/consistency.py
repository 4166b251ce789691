"""Cross-rank agreement on the call: one small all-gather of each rank's metadata.

Every rank gathers every rank's (rows of e, D, vocabulary shard, dtype, reduction, ...) and runs
the same checks on the same data, so a mismatch raises the same ``ValueError`` on every rank
instead of hanging a later collective or returning a silently wrong loss. The result (this rank's
first global row and the global vocabulary size) is cached per group and local signature: the
check costs one collective the first time a shape is seen, none after. With ``CCE_DIST_DEBUG=1``
it runs on every call, which also catches a rank that alone changes its shape between calls.

A rank whose own arguments fail the local checks (wrong dtype, shape, ...) joins this gather
with an error flag before raising, so the first call with a bad argument on any rank raises on
all of them. Outside debug mode, a later call that fails on one rank only while the others reuse
their cached layout is not caught this way: they then wait in the forward's all-gather (NCCL's
timeout ends it).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .collectives import all_gather_dim0, group_device
from .shards import check_tiling

DEBUG_ENV = "CCE_DIST_DEBUG"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
# (field, must it be equal on every rank)
_FIELDS = (
    ("rows of e", True), ("D", True), ("dtype", True), ("reduction", True),
    ("ignore_index", True), ("sequence_parallel", True), ("number of targets", True),
    ("filter_eps", True), ("label_smoothing", True), ("z_loss", True), ("softcap", True),
    ("bias given", True), ("function", True), ("temperature", True), ("shard rows", False),
    ("vocab_start", False),
    ("rejected its arguments", False),
)
_COLUMN = {name: i for i, (name, _) in enumerate(_FIELDS)}
_cache: dict = {}


@dataclass(frozen=True)
class ShardLayout:
    vocab_start: int  # this rank's first global row
    vocab_size: int  # rows of all shards together


def _eps_bits(eps: Optional[float]) -> int:
    return -1 if eps is None else struct.unpack("<q", struct.pack("<d", eps))[0]


def shard_layout(
    group,
    *,
    rows: int,
    d: int,
    shard_rows: int,
    vocab_start: Optional[int],
    dtype: torch.dtype,
    reduction: str,
    ignore_index: int,
    sequence_parallel: bool,
    num_targets: int,
    filter_eps: Optional[float],
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    has_bias: bool = False,
    function: int = 0,
    temperature: float = 1.0,
) -> ShardLayout:
    """Check that all ranks of ``group`` agree and return this rank's :class:`ShardLayout`.

    ``function``: 0 for ``linear_cross_entropy``, 1 for ``linear_logprobs_entropy`` (whose
    ``temperature`` is checked too): ranks that call different functions raise."""
    signature = (
        rows, d, _DTYPES.index(dtype), _REDUCTIONS.index(reduction), ignore_index,
        int(sequence_parallel), num_targets, _eps_bits(filter_eps), _eps_bits(label_smoothing),
        _eps_bits(z_loss), _eps_bits(softcap), int(has_bias), function, _eps_bits(temperature),
        shard_rows,
        -1 if vocab_start is None else vocab_start, 0,
    )
    # The cache is keyed by the fields every rank must share, so that all ranks hit or miss it
    # together: a key with this rank's own shard in it would let a rank whose shard changed
    # gather alone while the others, hitting, went on to the forward's collective.
    shared = tuple(value for value, (_, equal) in zip(signature, _FIELDS) if equal)
    own = tuple(value for value, (_, equal) in zip(signature, _FIELDS) if not equal)
    key = (id(group), shared)
    debug = os.environ.get(DEBUG_ENV, "0") == "1"
    if not debug and key in _cache:
        layout, cached_own = _cache[key]
        if own != cached_own:
            raise ValueError(
                f"linear_cross_entropy: this rank's vocabulary shard (rows, vocab_start) changed "
                f"from {cached_own[:2]} to {own[:2]} since an earlier call of the same shape on "
                f"this group, whose checked layout the ranks reuse; set {DEBUG_ENV}=1 to check "
                f"the layout on every call when shards change between calls"
            )
        return layout
    mine = torch.tensor(signature, dtype=torch.int64, device=group_device(group))
    table = all_gather_dim0(mine[None], group).tolist()  # one row per rank
    layout = _check(table, dist.get_rank(group), sequence_parallel)
    _cache[key] = (layout, own)
    return layout


def report_local_error(group) -> None:
    """Called by a rank whose own arguments failed its local checks, before it raises: the
    ranks still in :func:`shard_layout` learn of it and raise too instead of waiting."""
    row = torch.zeros((1, len(_FIELDS)), dtype=torch.int64, device=group_device(group))
    row[0, -1] = 1
    all_gather_dim0(row, group)


def _check(table: list[list[int]], rank: int, sequence_parallel: bool) -> ShardLayout:
    world = len(table)
    failed = [r for r, row in enumerate(table) if row[-1]]
    if failed:
        raise ValueError(
            f"linear_cross_entropy: rank(s) {failed} rejected their arguments (their own error "
            f"names the argument); no rank computed the loss"
        )
    for i, (name, equal) in enumerate(_FIELDS):
        values = [row[i] for row in table]
        if equal and len(set(values)) != 1:
            if name == "dtype":
                values = [str(_DTYPES[v]) for v in values]
            elif name == "reduction":
                values = [_REDUCTIONS[v] for v in values]
            elif name in ("filter_eps", "label_smoothing", "z_loss"):
                values = [None if v == -1 else struct.unpack("<d", struct.pack("<q", v))[0]
                          for v in values]
            raise ValueError(
                f"linear_cross_entropy: the ranks of the group disagree on {name}: "
                f"{values} (by rank); every rank must make the same call with its own shard"
            )
    rows, num_targets = table[0][_COLUMN["rows of e"]], table[0][_COLUMN["number of targets"]]
    want = rows * world if sequence_parallel else rows
    if num_targets != want:
        raise ValueError(
            f"targets must cover {'the gathered sequence: ' if sequence_parallel else ''}"
            f"{want} tokens, got {num_targets}"
        )
    sizes = [row[_COLUMN["shard rows"]] for row in table]
    starts = [row[_COLUMN["vocab_start"]] for row in table]
    given = [s != -1 for s in starts]
    if any(given) and not all(given):
        raise ValueError(
            f"vocab_start must be given on every rank or on none; given on ranks "
            f"{[r for r, g in enumerate(given) if g]} of {world}"
        )
    if not any(given):
        starts = [sum(sizes[:r]) for r in range(world)]
    vocab_size = check_tiling(starts, sizes)
    return ShardLayout(vocab_start=starts[rank], vocab_size=vocab_size)
