"""Peak memory of one call, shared by the benchmark scripts (GPU only)."""

from __future__ import annotations

from typing import Callable

import torch


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Largest allocation above the memory in use before ``fn()`` (MB), while it runs; what it
    returns (e.g. gradients) is included, then freed."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20
