"""Who owns which vocabulary rows."""

from __future__ import annotations


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank`` in the even contiguous split of ``vocab_size`` rows
    over ``world_size`` ranks: the first ``vocab_size % world_size`` ranks own one row more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if vocab_size < 0:
        raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_tiling(starts: list[int], sizes: list[int]) -> int:
    """The shards ``[start, start + size)`` must tile ``[0, V)`` exactly; returns V.

    Raises ``ValueError`` describing the first overlap or gap (in rank terms).
    """
    order = sorted(range(len(starts)), key=lambda r: (starts[r], sizes[r]))
    expected = 0
    for r in order:
        if starts[r] != expected:
            kind = "overlaps the previous shard" if starts[r] < expected else "leaves a gap before it"
            raise ValueError(
                f"vocabulary shards must tile [0, V) without overlap or gap: rank {r}'s shard "
                f"[{starts[r]}, {starts[r] + sizes[r]}) {kind} (expected it to start at {expected}); "
                f"all shards (start, size) by rank: {list(zip(starts, sizes))}"
            )
        expected += sizes[r]
    return expected
