"""Local CCE math on local tensors: Triton kernels and a pure-PyTorch reference.

Nothing here knows about torch.distributed. The forward gives, for the vocabulary rows it is
handed, each token's LSE and target logit; the backward takes the LSE it is given (the global one
when the vocabulary is sharded) and returns this slice's partial dE and its dC.
"""

from .ops import (
    BACKENDS,
    cce_backward,
    cce_backward_notify,
    cce_forward,
    loss_dtype,
    resolve_backend,
)

__all__ = [
    "BACKENDS", "cce_backward", "cce_backward_notify", "cce_forward", "loss_dtype",
    "resolve_backend",
]
