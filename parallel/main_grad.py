"""Megatron-Core's fused weight-gradient protocol, for the classifier.

Megatron's ``DistributedDataParallel`` gives each parameter an fp32 ``main_grad`` (a view into
its contiguous gradient buffer) and a flag ``grad_added_to_main_grad``. Its own linear layers,
under ``gradient_accumulation_fusion``, add the weight gradient into ``main_grad`` themselves,
set the flag, and hand autograd a placeholder gradient: the DDP's post-accumulation hook (which
must fire, to mark the parameter ready for its bucket's reduction) then adds nothing, unless
the parameter is marked ``zero_out_wgrad`` (a tied embedding on one pipeline stage, whose other
use's gradient is real and must be added).

The loss follows the same protocol, so that dC is never a (V, D) tensor of its own: the kernels
add it into ``main_grad`` in fp32, without the per-micro-batch bf16 rounding either.
"""

from __future__ import annotations

import torch


def main_grad_of(c: torch.Tensor) -> torch.Tensor | None:
    """``c.main_grad`` when ``c`` is a parameter under Megatron's DDP, else None."""
    grad = getattr(c, "main_grad", None)
    if not hasattr(c, "grad_added_to_main_grad") or not isinstance(grad, torch.Tensor):
        return None
    if grad.shape != c.shape or grad.device != c.device or not grad.is_floating_point():
        return None
    return grad


def placeholder_grad(c: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor | None:
    """What autograd receives for ``c`` once dC is in ``main_grad``; marks it added.

    * ``zero_out_wgrad`` (tied embedding on one stage): None. The embedding's own gradient
      reaches the parameter anyway, fires DDP's hook, and is the only thing the hook must add.
    * otherwise: a tensor of c's dtype, shape and strides over ``main_grad``'s storage (which
      is at least as large when ``main_grad`` is fp32 and c 16-bit or fp32), so that no (V, D)
      buffer is allocated. Autograd passes it to the hook, which ignores its values (the flag)
      and drops it, as it drops Megatron's own ``torch.empty`` placeholder. Without room in
      that storage, an uninitialized tensor, as Megatron's. If ``c.grad`` is still set
      (nothing cleared it since the last backward), zeros: autograd adds into it in place.

    As with Megatron's own fused layers, every other use of ``c`` in the same backward must add
    its gradient into ``main_grad`` itself (Megatron's layers do under
    ``gradient_accumulation_fusion``): DDP's hook ignores ``c.grad`` once the flag is set.
    """
    c.grad_added_to_main_grad = True
    if getattr(c, "zero_out_wgrad", False):
        return None
    if c.grad is not None:  # autograd would add into it in place: hand it zeros, not an alias
        return torch.zeros_like(c)
    if torch.compiler.is_compiling():  # a storage alias cannot be traced: Megatron's own way
        return torch.empty_like(c, memory_format=torch.contiguous_format)
    storage = main_grad.untyped_storage()
    offset = main_grad.storage_offset() * main_grad.element_size()
    size = c.element_size()
    fits = (c.is_contiguous() and main_grad.is_contiguous() and offset % size == 0
            and storage.nbytes() - offset >= c.numel() * size)
    if not fits:
        return torch.empty_like(c, memory_format=torch.contiguous_format)
    return c.new_empty((0,)).set_(storage, offset // size, c.shape, c.stride())
