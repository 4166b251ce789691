"""Small pieces the launch entry points share."""

from __future__ import annotations

import os
import resource
import sys

import torch


def token_windows(ids: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive ids at random starts, (count, length) int64;
    a function of ``seed`` only, so a resumed or repeated run sees the same batches."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (count,), generator=g)
    return ids[starts[:, None] + torch.arange(length)]


def exit_cleanly() -> None:
    """Leave without the interpreter's teardown, where gloo's threads sometimes abort a process
    whose work is done ("terminate called without an active exception"), which torchrun would
    report as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def peak_memory_field(cuda: bool) -> str:
    """A summary line's peak memory: ``peak_mb=`` the GPU allocator's peak on CUDA (since the last
    ``torch.cuda.reset_peak_memory_stats``); ``peak_rss_mb=`` this process's peak resident set
    size otherwise (the whole run's, interpreter and libraries included)."""
    if cuda:
        return f"peak_mb={torch.cuda.max_memory_allocated() / 2**20:.0f}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"peak_rss_mb={rss / (2**20 if sys.platform == 'darwin' else 2**10):.0f}"
