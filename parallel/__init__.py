"""Vocabulary-parallel glue: who owns which rows, the collectives, and the autograd op.

Single device is the case ``group=None`` of the same op, not a separate code path.
"""

from .function import LinearCrossEntropyFunction

__all__ = ["LinearCrossEntropyFunction"]
