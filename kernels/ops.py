"""The CCE forward and backward as PyTorch custom ops.

Registering them with ``torch.library`` makes them opaque to ``torch.compile`` (which then never
traces into the Triton launch code or the chunk loop) and gives them fake implementations for
shape propagation. Each op picks its backend: the Triton kernels on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``), the pure-PyTorch reference otherwise; float64 always goes
to the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from . import reference
from .filtering import decode_filter
from .tiles import BlockConfig, default_config, interpreting

if __name__ != "cce_dist.kernels.ops":  # see kernels/__init__.py: register the ops only once
    raise ImportError(f"import cce_dist.kernels.ops, not {__name__}: a second copy would register "
                      f"the cce_dist:: custom ops again")

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE, target logits and the loss are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str, e: torch.Tensor) -> str:
    """'triton' or 'reference' for this input (see the module docstring)."""
    if backend == "auto":
        use_triton = (e.is_cuda or interpreting()) and e.dtype in TRITON_DTYPES
        return "triton" if use_triton else "reference"
    if backend == "triton" and e.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes bf16, fp16 or fp32 inputs, got {e.dtype}")
    if backend == "triton" and not (e.is_cuda or interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    return backend


def tile_grid(
    n: int, v: int, backend: str, device: torch.device, dtype: torch.dtype
) -> tuple[int, int]:
    """Shape of the per-tile maxima the forward records."""
    if backend != "triton":
        return (triton.cdiv(n, reference.TILE_N), triton.cdiv(v, reference.TILE_V))
    cfg: BlockConfig = default_config(device, dtype)
    return (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))


@torch.library.custom_op("cce_dist::forward", mutates_args=())
def cce_forward(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, vocab_start: int, backend: str,
    sum_logits: bool = False, softcap: float = 0.0, bias: torch.Tensor | None = None,
    mean_logit: bool = False, logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D), (V, D), (N,) -> lse (N,), target logit (N,) (fp32; fp64 for fp64 inputs), the
    per-tile maxima (fp32, on the backend's tiles: :func:`tile_grid`), and with ``sum_logits``
    each token's sum of logits over these rows (N,) (label smoothing), else an empty tensor.
    The logits are ``e @ c.T + bias`` ((V,) or None), capped by ``softcap`` when it is > 0.
    With ``mean_logit`` the last output is instead each token's softmax-weighted mean logit
    over these rows (N,) (the entropy's). ``logit_scale`` (1 / temperature) multiplies the
    products in fp32, before any bias (not both)."""
    _check_scale(logit_scale, bias)
    if backend == "triton":
        from . import gemm_engine, triton_forward

        cfg = default_config(e.device, e.dtype)
        engine = gemm_engine if cfg.gemm and gemm_engine.supported(e) else triton_forward
        return engine.forward(e, c, targets, vocab_start, cfg, sum_logits, softcap, bias,
                              mean_logit, logit_scale)
    return reference.forward(e, c, targets, vocab_start, sum_logits=sum_logits,
                             softcap=softcap, bias=bias, mean_logit=mean_logit,
                             logit_scale=logit_scale)


def _gemm_engine_runs(e: torch.Tensor, backend: str) -> bool:
    if backend != "triton":
        return False
    from . import gemm_engine

    return default_config(e.device, e.dtype).gemm and gemm_engine.supported(e)


def forward_makes_de(e: torch.Tensor, c: torch.Tensor, backend: str) -> bool:
    """Whether the loss's forward should make dE (:func:`cce_forward_with_de`), so that the
    backward (``skip_de=True``) computes only dC: on the gemm engine, as its config's
    ``gemm_de_in_forward`` says ("lent": where the backward would otherwise lend dC's rows to its
    workspace and compute their logits twice)."""
    if not _gemm_engine_runs(e, backend):
        return False
    from . import gemm_engine

    if e.dtype == torch.float16:
        # dE would be kept in fp16 scaled by 1 / tokens before the loss scale lifts it: it could
        # fall under fp16's smallest numbers, which loss scaling exists to avoid.
        return False
    cfg = default_config(e.device, e.dtype)
    if cfg.gemm_de_in_forward == "lent":
        return gemm_engine.backward_lends_rows(e.shape[0], e.shape[1], c.shape[0],
                                               e.element_size(), cfg,
                                               gemm_engine.fused_dlogits(e, c, cfg, pointers=False))
    return cfg.gemm_de_in_forward == "always"


@torch.library.custom_op("cce_dist::forward_with_de", mutates_args=())
def cce_forward_with_de(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, vocab_start: int,
    sum_logits: bool = False, softcap: float = 0.0, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """:func:`cce_forward` on the gemm engine (see :func:`forward_makes_de`) that also
    returns the softmax half of dE while the logits are at hand: ``acc`` (N, D) fp32, ``ref``
    (N,) fp32 and ``resid`` (2, N) fp32 (``gemm_engine.forward``), for :func:`cce_finish_de`."""
    from . import gemm_engine

    cfg = default_config(e.device, e.dtype)
    return gemm_engine.forward(e, c, targets, vocab_start, cfg, sum_logits, softcap, bias,
                               with_de=True)


@cce_forward_with_de.register_fake
def _(e, c, targets, vocab_start, sum_logits=False, softcap=0.0, bias=None):
    lse, tgt, tile_max, zsum = cce_forward(e, c, targets, vocab_start, "triton", sum_logits,
                                           softcap, bias)
    return (lse, tgt, tile_max, zsum, e.new_empty(e.shape, dtype=torch.float32),
            e.new_empty((e.shape[0],), dtype=torch.float32),
            e.new_empty((2, e.shape[0]), dtype=torch.float32))


@torch.library.custom_op("cce_dist::finish_de", mutates_args=())
def cce_finish_de(
    acc: torch.Tensor, ref: torch.Tensor, resid: torch.Tensor, lse: torch.Tensor,
    target_logit: torch.Tensor,
    coef: torch.Tensor, targets: torch.Tensor, c: torch.Tensor, vocab_start: int,
    de_fp32: bool = False, target_weight: float = 1.0, softcap: float = 0.0,
) -> torch.Tensor:
    """This shard's dE (N, D) from :func:`cce_forward_with_de`'s ``acc``, ``ref`` and
    ``resid``, under the (global) ``lse`` (N,), times ``coef`` (N,) per token; in c's dtype, or
    fp32 with ``de_fp32`` (``gemm_engine.finish_de``)."""
    from . import gemm_engine

    cfg = default_config(c.device, c.dtype)
    return gemm_engine.finish_de(acc, ref, resid, lse, target_logit, coef, targets, c,
                                 vocab_start,
                                 cfg, torch.float32 if de_fp32 else c.dtype, target_weight,
                                 softcap)


@cce_finish_de.register_fake
def _(acc, ref, resid, lse, target_logit, coef, targets, c, vocab_start, de_fp32=False,
      target_weight=1.0, softcap=0.0):
    return acc.new_empty(acc.shape, dtype=torch.float32 if de_fp32 else c.dtype)


def _check_scale(logit_scale: float, bias: torch.Tensor | None) -> None:
    if bias is not None and logit_scale != 1.0:
        raise ValueError("the kernels take a logit_scale (temperature) or a bias, not both")


@cce_forward.register_fake
def _(e, c, targets, vocab_start, backend, sum_logits=False, softcap=0.0, bias=None,
      mean_logit=False, logit_scale=1.0):
    n, v = e.shape[0], c.shape[0]
    stat_dtype = loss_dtype(e.dtype)
    return (
        e.new_empty((n,), dtype=stat_dtype),
        e.new_empty((n,), dtype=stat_dtype),
        e.new_empty(tile_grid(n, v, backend, e.device, e.dtype), dtype=torch.float32),
        e.new_empty((n if sum_logits or mean_logit else 0,), dtype=stat_dtype),
    )


@torch.library.custom_op("cce_dist::backward", mutates_args=())
def cce_backward(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    tile_max: torch.Tensor,
    vocab_start: int,
    filter_eps: float | None,
    backend: str,
    de_fp32: bool = False,
    vocab_size: int = -1,
    target_weight: float = 1.0,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    ent_scale: torch.Tensor | None = None,
    mean_logit: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    skip_de: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial dE (N, D), dC (V, D) and d bias (V,) (empty without ``bias``) from the global
    LSE, in the inputs' dtypes (dE in fp32, or fp64 for fp64 inputs, with ``de_fp32``: for a
    cross-rank sum without a bf16 rounding).

    ``filter_eps``: the gradient filter as one float (``GradFilter.encode``: the per-entry
    threshold, or minus the budget), None for exact; ``vocab_size``: rows of all shards (-1:
    this shard's); ``target_weight``: weight of the one-hot term (1 - label smoothing);
    ``uniform_weight``: subtracted from every softmax entry (label smoothing's eps / V, when a
    softcap makes it other than rank one); ``softcap``, ``bias``: as in :func:`cce_forward`;
    ``ent_scale``, ``mean_logit`` (N,) fp32: add ``ent_scale_n p_j (z_j - mean_logit_n)`` to
    the logits' gradient (an entropy's, weighed by minus its upstream gradient);
    ``logit_scale``: as in :func:`cce_forward`; ``skip_de``: dE came from
    :func:`cce_forward_with_de` (the gemm engine only): an empty dE is returned."""
    return _backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
                     de_fp32, None, vocab_size, target_weight, softcap, uniform_weight, bias,
                     ent_scale, mean_logit, logit_scale, skip_de=skip_de)


def _fake_de(e, de_fp32, skip_de):
    dtype = loss_dtype(e.dtype) if de_fp32 else e.dtype
    return e.new_empty((0,), dtype=dtype) if skip_de else torch.empty_like(e, dtype=dtype)


@cce_backward.register_fake
def _(e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
      de_fp32=False, vocab_size=-1, target_weight=1.0, softcap=0.0, uniform_weight=0.0,
      bias=None, ent_scale=None, mean_logit=None, logit_scale=1.0, skip_de=False):
    dbias = c.new_empty((0,)) if bias is None else torch.empty_like(bias)
    return _fake_de(e, de_fp32, skip_de), torch.empty_like(c), dbias


# The accumulating variant is an op of its own, with the mutated buffer first and always
# positional: torch < 2.13 bumps a mutated argument's version by its position in the call.
@torch.library.custom_op("cce_dist::backward_into", mutates_args=("dc_accum",))
def cce_backward_into(
    dc_accum: torch.Tensor,
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    tile_max: torch.Tensor,
    vocab_start: int,
    filter_eps: float | None,
    backend: str,
    de_fp32: bool = False,
    vocab_size: int = -1,
    target_weight: float = 1.0,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    skip_de: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cce_backward` whose dC is added into ``dc_accum`` ((V, D) float, a gradient
    accumulator such as Megatron's fp32 ``main_grad``) instead of being returned: returns dE and
    d bias. The default engine adds each chunk's product into an fp32 accumulator without
    rounding it to c's dtype first."""
    de, _, dbias = _backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps,
                             backend, de_fp32, None, vocab_size, target_weight, softcap,
                             uniform_weight, bias, dc_accum=dc_accum, skip_de=skip_de)
    return de, dbias


@cce_backward_into.register_fake
def _(dc_accum, e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
      de_fp32=False, vocab_size=-1, target_weight=1.0, softcap=0.0, uniform_weight=0.0,
      bias=None, skip_de=False):
    dbias = c.new_empty((0,)) if bias is None else torch.empty_like(bias)
    return _fake_de(e, de_fp32, skip_de), dbias


def cce_backward_notify(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    tile_max: torch.Tensor,
    vocab_start: int,
    filter_eps: float | None,
    backend: str,
    on_de_ready: Callable[[torch.Tensor], None],
    vocab_size: int = -1,
    target_weight: float = 1.0,
    softcap: float = 0.0,
    uniform_weight: float = 0.0,
    bias: torch.Tensor | None = None,
    ent_scale: torch.Tensor | None = None,
    mean_logit: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    dc_accum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cce_backward` with ``de_fp32`` that calls ``on_de_ready(de)`` as soon as the
    partial dE is final, before the rest of dC (Triton; the reference calls it at the end).

    Not a custom op (a callable cannot cross that boundary): eager callers only, e.g. to start
    the cross-rank dE reduction while dC is still being computed.
    """
    return _backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
                     True, on_de_ready, vocab_size, target_weight, softcap, uniform_weight, bias,
                     ent_scale, mean_logit, logit_scale, dc_accum)


def _backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend,
              de_fp32, on_de_ready, vocab_size, target_weight, softcap=0.0, uniform_weight=0.0,
              bias=None, ent_scale=None, mean_logit=None, logit_scale=1.0, dc_accum=None,
              skip_de=False):
    _check_scale(logit_scale, bias)
    grad_filter = decode_filter(filter_eps)
    if skip_de and (not _gemm_engine_runs(e, backend) or ent_scale is not None or (
            grad_filter is not None and grad_filter.kind != "budget")):
        raise ValueError("skip_de needs the gemm engine, no entropy term, "
                         "and no filter or the budget filter")
    if dc_accum is not None and (dc_accum.shape != c.shape or not dc_accum.is_floating_point()
                                 or dc_accum.device != c.device):
        raise ValueError(f"dc_accum must be a float tensor of c's shape {tuple(c.shape)} on "
                         f"{c.device}, got {dc_accum.dtype} {tuple(dc_accum.shape)} on "
                         f"{dc_accum.device}")
    vocab_size = vocab_size if vocab_size >= 0 else c.shape[0]
    dbias = None
    if bias is not None:
        dbias = torch.zeros(bias.shape, dtype=loss_dtype(e.dtype), device=bias.device)
    entropy = None
    if ent_scale is not None and mean_logit is not None:
        entropy = (ent_scale.contiguous(), mean_logit.contiguous())
    options = dict(softcap=softcap, uniform_weight=uniform_weight, bias=bias, dbias=dbias,
                   entropy=entropy, logit_scale=logit_scale)
    de, dc = _engine_backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, grad_filter,
                              backend, de_fp32, on_de_ready, vocab_size, target_weight, options,
                              dc_accum, skip_de)
    dbias = c.new_empty((0,)) if bias is None else dbias.to(bias.dtype)
    return de, dc, dbias


def _engine_backward(e, c, targets, lse, grad_scale, tile_max, vocab_start, grad_filter, backend,
                     de_fp32, on_de_ready, vocab_size, target_weight, options, dc_accum=None,
                     skip_de=False):
    if backend == "triton":
        from . import gemm_engine, triton_backward

        cfg = default_config(e.device, e.dtype)
        # cuBLAS products unless the per-entry filter can skip tiles (kernels/tiles.py).
        gemm = cfg.gemm and gemm_engine.supported(e) and (
            grad_filter is None or grad_filter.kind == "budget")
        kw = dict(de_fp32=de_fp32, on_de_ready=on_de_ready, vocab_size=vocab_size,
                  target_weight=target_weight, **options)
        if skip_de or (gemm and (dc_accum is None or dc_accum.dtype == torch.float32)):
            accum = dc_accum if dc_accum is None or dc_accum.dtype == torch.float32 else None
            de, dc = gemm_engine.backward(e, c, targets, lse, grad_scale, vocab_start,
                                          grad_filter, tile_max, cfg, dc_accum=accum,
                                          want_de=not skip_de, **kw)
            return de, (dc if accum is not None or dc_accum is None else _accumulate(dc, dc_accum))
        de, dc = triton_backward.backward(e, c, targets, lse, grad_scale, vocab_start,
                                          grad_filter, tile_max, cfg, **kw)
        return de, _accumulate(dc, dc_accum)
    de, dc = reference.backward(
        e, c, targets, lse, grad_scale, vocab_start, grad_filter, tile_max, de_fp32=de_fp32,
        vocab_size=vocab_size, target_weight=target_weight, **options,
    )
    if on_de_ready is not None:
        on_de_ready(de)
    return de, _accumulate(dc, dc_accum)


def _accumulate(dc: torch.Tensor, dc_accum: torch.Tensor | None) -> torch.Tensor:
    """Engines without an accumulating dC product: dC, added into ``dc_accum`` if given (then
    an empty tensor stands for dC)."""
    if dc_accum is None:
        return dc
    dc_accum.add_(dc)
    return dc.new_empty((0,))
