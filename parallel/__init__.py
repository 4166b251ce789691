"""Vocabulary-parallel glue: who owns which rows, the collectives, and the autograd op.

Single device is the case ``group=None`` of the same op, not a separate code path.
"""

from .consistency import ShardLayout, shard_layout
from .function import LinearCrossEntropyFunction
from .shards import vocab_range

__all__ = ["LinearCrossEntropyFunction", "ShardLayout", "shard_layout", "vocab_range"]
