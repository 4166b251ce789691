"""Bounds checking for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

On the CPU the interpreter's loads and stores go straight to host memory, so a wrong mask or
stride reads garbage or corrupts the heap, often far from where the bug is. Inside
:func:`checked_memory`, every launch records the byte span of each tensor argument, and every
load and store checks that each of its masked-in addresses (with the element's full width)
lies inside one of them; the first one outside raises :class:`OutOfBounds`, naming the kernel,
the access and the nearest argument. This is the CPU counterpart of
``compute-sanitizer --tool memcheck``, and stricter: an access outside a tensor's own view
(say, into a neighbouring view of the same storage) is caught too.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) that the view ``t`` may touch (empty for an empty tensor)."""
    lo = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


_state = threading.local()


@contextlib.contextmanager
def checked_memory():
    """Check every interpreted load and store against the launch's tensor arguments."""
    from triton.runtime import interpreter as interp

    grid_init = interp.GridExecutor._init_args_hst
    masked_load = interp.InterpreterBuilder.create_masked_load
    masked_store = interp.InterpreterBuilder.create_masked_store
    counts = {"launches": 0, "accesses": 0}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = grid_init(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _state.kernel = self.fn.__name__
        # A TMA descriptor's accesses are checked against its base tensor (the view it wraps).
        _state.spans = [(name, *_span(getattr(a, "base", a))) for name, a in named
                        if isinstance(getattr(a, "base", a), torch.Tensor)]
        counts["launches"] += 1
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        addrs = np.asarray(ptrs.data).astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        addrs = addrs[live]
        if addrs.size == 0:
            return
        counts["accesses"] += int(addrs.size)
        width = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addrs.shape, dtype=bool)
        for _, lo, hi in _state.spans:
            inside |= (addrs >= lo) & (addrs + width <= hi)
        if not inside.all():
            bad = int(addrs[~inside][0])
            name, lo, hi = min(_state.spans, key=lambda s: min(abs(bad - s[1]), abs(bad - s[2])))
            raise OutOfBounds(
                f"{_state.kernel}: {kind} of {int((~inside).sum())} element(s) outside every "
                f"tensor argument; first at byte {bad - lo:+d} from the start of '{name}' "
                f"(which spans {hi - lo} bytes)"
            )

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return masked_store(self, ptrs, value, mask, cache_policy)

    interp.GridExecutor._init_args_hst = init_args
    interp.InterpreterBuilder.create_masked_load = load
    interp.InterpreterBuilder.create_masked_store = store
    try:
        yield counts
    finally:
        interp.GridExecutor._init_args_hst = grid_init
        interp.InterpreterBuilder.create_masked_load = masked_load
        interp.InterpreterBuilder.create_masked_store = masked_store
