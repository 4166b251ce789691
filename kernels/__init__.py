"""Local CCE math on local tensors: Triton kernels and a pure-PyTorch reference.

Nothing here knows about torch.distributed. The forward gives, for the vocabulary rows it is
handed, each token's LSE and target logit; the backward takes the LSE it is given (the global one
when the vocabulary is sharded) and returns this slice's partial dE and its dC.
"""

# This folder is cce_dist.kernels (pyproject's package-dir). With the repository root on
# sys.path (a script or `python -c` run there) it is also importable as a top-level "kernels",
# and transformers imports any "kernels" it finds to probe the version of the Hugging Face
# package of that name. Imported under that name it stays empty: importing ops.py a second time
# would register the cce_dist:: custom ops again and leave the live ones with freed schemas
# (the "vector::reserve" / std::bad_alloc crashes inside the op's dispatch).
if __name__ == "cce_dist.kernels":
    from .ops import (
        BACKENDS,
        cce_backward,
        cce_backward_into,
        cce_backward_notify,
        cce_finish_de,
        cce_forward,
        cce_forward_with_de,
        forward_makes_de,
        loss_dtype,
        resolve_backend,
    )

    __all__ = [
        "BACKENDS", "cce_backward", "cce_backward_into", "cce_backward_notify", "cce_finish_de",
        "cce_forward", "cce_forward_with_de", "forward_makes_de", "loss_dtype", "resolve_backend",
    ]
