"""Argument checks of ``linear_cross_entropy``: every one runs before any kernel or collective."""

from __future__ import annotations

import numbers
import os
from typing import Optional, Union

import torch

from cce_dist.kernels.filtering import GradFilter, default_budget

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
CHECK_TARGETS_ENV = "CCE_DIST_CHECK_TARGETS"


def default_filter_eps(dtype: torch.dtype) -> float:
    """A per-entry threshold of the CCE paper's filter: 2^-12 for bf16, i.e. the dtype's machine
    epsilon / 32 (the default before the budget filter; pass it as ``filter_eps`` to get it)."""
    return torch.finfo(dtype).eps / 32


def check_inputs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    reduction: str,
    filter_eps: Union[str, float, None],
    backend: str,
    backends: tuple[str, ...],
    gathered_rows: int = 1,
    ignore_index: int = -100,
    **options,
) -> Optional[float]:
    """Raise ``TypeError`` / ``ValueError`` naming the bad argument; return the resolved filter
    as one float (``GradFilter.encode``: minus the budget for 'auto', the per-entry threshold for
    a float) or None for exact. The scalar options (``options``: label_smoothing, z_loss,
    softcap) are :func:`check_options`'.

    ``gathered_rows``: with sequence parallelism over w ranks, targets cover w times e's rows.
    """
    for name, t in (("e", e), ("c", c), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if c.dim() != 2:
        raise ValueError(f"c must be 2-D (V, D), got shape {tuple(c.shape)}")
    if e.dim() < 1:
        raise ValueError("e must have shape (..., D), got a 0-d tensor")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(
            f"e's last dim ({e.shape[-1]}) must equal c's dim 1 (D = {c.shape[1]}); "
            f"got e {tuple(e.shape)}, c {tuple(c.shape)}"
        )
    if e.shape[-1] == 0:
        raise ValueError(f"e and c must have a hidden size D > 0, got e {tuple(e.shape)}, "
                         f"c {tuple(c.shape)}")
    if e.dtype not in FLOAT_DTYPES:
        raise TypeError(f"e must be bf16, fp16, fp32 or fp64, got {e.dtype}")
    if c.dtype != e.dtype:
        raise TypeError(f"c's dtype ({c.dtype}) must equal e's dtype ({e.dtype})")
    if c.device != e.device or targets.device != e.device:
        raise ValueError(
            f"e, c and targets must be on one device, got {e.device}, {c.device}, {targets.device}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    lead = tuple(e.shape[:-1])
    if gathered_rows > 1:
        if not lead:
            raise ValueError("with sequence_parallel, e must be (s_local, ..., D)")
        lead = (lead[0] * gathered_rows, *lead[1:])
    if tuple(targets.shape) != lead:
        what = "e's leading shape" + (
            f" with dim 0 gathered over {gathered_rows} ranks" if gathered_rows > 1 else ""
        )
        raise ValueError(f"targets' shape {tuple(targets.shape)} must equal {what} {lead}")
    check_options(reduction, filter_eps, backend, backends, ignore_index, **options)
    if isinstance(filter_eps, str):  # "auto"
        return GradFilter("budget", default_budget(e.dtype)).encode()
    if filter_eps is None:
        return None
    return float(filter_eps) if filter_eps > 0 else None


def check_ignore_index(ignore_index) -> None:
    """``ignore_index`` must be an integer (a float such as 1.5 would silently ignore nothing)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_options(
    reduction: str,
    filter_eps: Union[str, float, None],
    backend: str,
    backends: tuple[str, ...],
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> None:
    """The options that do not depend on the tensors; raise ``TypeError`` / ``ValueError``
    naming the bad one (:func:`check_inputs` runs them; the module's constructor too)."""
    check_ignore_index(ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if not (filter_eps is None or (isinstance(filter_eps, str) and filter_eps == "auto") or (
        not isinstance(filter_eps, bool) and isinstance(filter_eps, (int, float))
        and 0.0 <= filter_eps < 1.0
    )):
        raise ValueError(f"filter_eps must be 'auto', None or a float in [0, 1), got {filter_eps!r}")
    for name, value, upper in (("label_smoothing", label_smoothing, 1.0),
                               ("z_loss", z_loss, float("inf"))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 <= value < upper
        ):
            raise ValueError(f"{name} must be a float in [0, {upper}), got {value!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float))
        or not 0.0 < softcap < float("inf")
    ):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Targets outside [0, vocab_size) that are not ``ignore_index``.

    On the CPU: a ``ValueError`` (the check is cheap there). On CUDA the default is no check,
    which needs no host sync: such a token's loss is NaN, so it cannot pass unnoticed. With
    ``CCE_DIST_CHECK_TARGETS=1`` a device-side assertion fires instead (asynchronously).
    """

    def out_of_range() -> torch.Tensor:
        return ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)

    if targets.device.type == "cpu":
        bad = out_of_range()
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"targets must be in [0, {vocab_size}) or equal ignore_index ({ignore_index}); "
                f"found {first}"
            )
    elif os.environ.get(CHECK_TARGETS_ENV, "0") == "1":
        torch._assert_async(~out_of_range().any(), "cce_dist: a target is outside [0, vocab_size)")
