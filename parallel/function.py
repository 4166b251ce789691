"""The autograd function that joins the CCE kernels and the collectives into a loss.

Single device is the case ``group=None``: the same code with the collectives left out.
With a group, ``c`` is this rank's contiguous vocabulary shard starting at global row
``vocab_start``, and:

* forward: one all-gather of the packed per-token [LSE, target logit (, sum of logits with
  label smoothing)] of every shard, combined locally (``LSE = logsumexp_r LSE_r``, the others
  summed: exact), so every rank holds the global LSE and returns the same loss;
* backward: the kernels filter with the global LSE (every rank decides alike), return this
  shard's ``dc`` and a partial ``de`` in fp32, which is all-reduced (or, with sequence
  parallelism, reduce-scattered back to this rank's slice of the sequence) and cast once. The
  reduction starts as soon as the kernels have finished dE and runs while the last dC work is
  computed (eager mode; under torch.compile it follows the backward).

When ``e`` will get a gradient and ``forward_makes_de`` says so (the gemm engine, where its
backward would compute some rows' logits twice), dE is made in the forward instead, while each
chunk's logits are at hand (one product more there, one less in the backward, and no row of dC
computed twice), and kept: the backward scales it by the upstream gradient, starts its
reduction at once and computes only dC meanwhile.
"""

from __future__ import annotations

import functools

import torch
from cce_dist.kernels import (
    cce_backward, cce_backward_into, cce_backward_notify, cce_finish_de, cce_forward,
    cce_forward_with_de, forward_makes_de,
)
from cce_dist.kernels.filtering import decode_filter
from torch._C import _functions

from .collectives import (
    all_gather_dim0,
    all_reduce_,
    gather_stats,
    reduce_scatter_dim0,
    start_reduction,
)
from .main_grad import main_grad_of, placeholder_grad

# Start the dE reduction before dC is complete (see the module docstring); benchmarks turn it
# off to measure what the overlap gains.
OVERLAP_DE_REDUCTION = True


def _reduce(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored tokens; all ignored gives 0 (and zero gradients), not NaN. Every
    # rank holds all targets, so the count needs no collective.
    return total / valid.sum().clamp(min=1).to(total.dtype)


SECOND_DERIVATIVE_ERROR = (
    "linear_cross_entropy does not support second derivatives (double backward): its backward "
    "is computed by kernels that are not themselves differentiable. create_graph=True is fine "
    "as long as nothing differentiates the gradients of this loss again."
)


def _first_order_only(backward):
    """Run ``backward`` without recording a graph; if the caller asked for one
    (``create_graph=True``), the gradients get a node that raises
    :data:`SECOND_DERIVATIVE_ERROR` when differentiated, instead of torch's generic "no
    autograd formula" deep in the custom op."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        tensors = [i for i, g in enumerate(outputs) if g is not None]
        err = _functions.DelayedError(SECOND_DERIVATIVE_ERROR.encode(), len(tensors))
        flagged = err(*[outputs[i].detach().requires_grad_() for i in tensors])
        flagged = flagged if isinstance(flagged, tuple) else (flagged,)
        outputs = list(outputs)
        for i, g in zip(tensors, flagged):
            outputs[i] = g
        return tuple(outputs)

    return wrapper


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss_n = LSE_n - logit_{n, t_n} over all vocabulary rows (all shards), plus label
    smoothing's ``eps (logit_{n, t_n} - mean_j logit_{n, j})`` and ``z_loss LSE_n^2``, reduced.

    The logits are ``e @ c.T + bias`` (this shard's (V_r,) bias, or None), capped to
    ``softcap * tanh(z / softcap)`` when ``softcap`` > 0.

    Inputs: e (N, D) (with ``sequence_parallel``: this rank's (N / world, D) slice), c (V_r, D)
    of the same float dtype, targets (N,) integer global ids. Outputs: the loss, fp32 (fp64 for
    fp64 inputs) scalar, or (N,) for ``reduction="none"`` with 0 at ignored tokens and NaN at
    tokens whose target is outside [0, vocab_size) or differs between the ranks (no host sync
    needed to flag them; their gradients are NaN too in the latter case); and the global LSE
    (N,), not differentiable.

    ``main_grad``: when ``c`` is a parameter under Megatron's DDP, its gradient is added into
    ``c.main_grad`` by the kernels, following Megatron's protocol (``parallel/main_grad.py``).
    """

    @staticmethod
    def forward(
        ctx,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        filter_eps: float | None,
        vocab_start: int,
        vocab_size: int,
        backend: str,
        group=None,
        sequence_parallel: bool = False,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float = 0.0,
        bias: torch.Tensor | None = None,
        main_grad: bool = False,
        want_de: bool = False,
    ) -> torch.Tensor:
        if group is not None and sequence_parallel:
            e = all_gather_dim0(e, group)
        smoothing = label_smoothing > 0
        grad_filter = decode_filter(filter_eps)
        fuse_de = (want_de and forward_makes_de(e, c, backend)
                   and (grad_filter is None or grad_filter.kind == "budget")
                   and not (smoothing and softcap > 0))
        if fuse_de:
            lse, target_logit, tile_max, logit_sum, acc, ref, resid = cce_forward_with_de(
                e, c, targets, vocab_start, smoothing, softcap, bias)
        else:
            lse, target_logit, tile_max, logit_sum = cce_forward(
                e, c, targets, vocab_start, backend, smoothing, softcap, bias)
        agree = None
        if group is not None:
            rows = [lse, target_logit] + ([logit_sum] if smoothing else [])
            stats, agree = gather_stats(rows, targets, group)
            lse = torch.logsumexp(stats[:, 0], dim=0)
            target_logit = stats[:, 1].sum(dim=0)
            if smoothing:
                logit_sum = stats[:, 2].sum(dim=0)
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < vocab_size)
        if agree is not None:  # targets that differ between ranks: NaN, not a wrong loss
            in_range = in_range & agree
            valid = valid | ~agree
        per_token = lse - target_logit
        if smoothing:  # (1 - eps) CE + eps (LSE - mean logit), the mean over the whole vocabulary
            per_token = per_token + label_smoothing * (target_logit - logit_sum / vocab_size)
        if z_loss:
            per_token = per_token + z_loss * lse * lse
        per_token = torch.where(valid, per_token, 0.0)
        per_token = torch.where(valid & ~in_range, torch.nan, per_token)
        de = None
        if fuse_de:
            # The per-token factors known now (the mean's count, ignored tokens, targets the
            # ranks disagree on); the backward multiplies by the upstream gradient.
            coef = valid.to(lse.dtype)
            if reduction == "mean":
                coef = coef / valid.sum().clamp(min=1).to(lse.dtype)
            if agree is not None:
                coef = torch.where(agree, coef, torch.nan)
            de = cce_finish_de(acc, ref, resid, _softmax_lse(lse, z_loss), target_logit, coef,
                               targets, c, vocab_start, group is not None or smoothing,
                               1.0 - label_smoothing, softcap)
            del acc, ref, resid
        ctx.save_for_backward(e, c, targets, lse, tile_max, valid, bias, agree)
        # Not a saved tensor: the backward scales it in place (one dE in memory, not two) and
        # drops it; a second backward (retain_graph) computes dE the usual way. (So hooks on
        # saved tensors, e.g. activation offloading, do not see it.) dE made here is exact: the
        # budget filter then skips tiles of dC's products only.
        ctx.de_fwd = de
        ctx.config = (reduction, filter_eps, vocab_start, vocab_size, backend, group,
                      sequence_parallel, label_smoothing, z_loss, softcap)
        ctx.param = c if main_grad else None  # the parameter itself: its main_grad at backward
        ctx.mark_non_differentiable(lse)
        return _reduce(per_token, valid, reduction), lse

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
        e, c, targets, lse, tile_max, valid, bias, agree = ctx.saved_tensors
        de_fwd, ctx.de_fwd = ctx.de_fwd, None
        (reduction, filter_eps, vocab_start, vocab_size, backend, group, sequence_parallel,
         label_smoothing, z_loss, softcap) = ctx.config
        grad_out = grad_out.to(lse.dtype)
        upstream = grad_out if reduction != "none" else torch.where(valid, grad_out, 0.0)
        if reduction == "mean":
            grad_out = grad_out / valid.sum().clamp(min=1).to(lse.dtype)
        grad_scale = torch.where(valid, grad_out.expand(valid.shape), 0.0)
        if agree is not None:  # ranks disagreed on these targets: NaN gradients too
            grad_scale = torch.where(agree, grad_scale, torch.nan)
        grad_scale = grad_scale.contiguous()
        lse = _softmax_lse(lse, z_loss)
        # Label smoothing: the kernels weigh the one-hot term by 1 - eps; its uniform term
        # -eps / V is rank one and added here (to dE before any reduction across ranks). Under
        # a softcap each logit's share is scaled by its own tanh' : the kernels subtract it,
        # unfiltered (the filter's bounds cover the softmax, not this term).
        smooth = label_smoothing / vocab_size
        in_kernel = bool(label_smoothing) and softcap > 0
        uniform = (_UniformTerm(e, c, grad_scale, smooth, bias)
                   if label_smoothing and not in_kernel else None)
        if in_kernel:
            filter_eps = None
        dc_accum = None if ctx.param is None else main_grad_of(ctx.param)
        kw = dict(vocab_size=vocab_size, target_weight=1.0 - label_smoothing, softcap=softcap,
                  uniform_weight=smooth if in_kernel else 0.0, bias=bias)
        args = (e, c, targets, lse, grad_scale, tile_max, vocab_start, filter_eps, backend)
        if de_fwd is not None:
            return _backward_with_de(de_fwd, upstream, uniform, args, kw, dc_accum, ctx.param,
                                     group, sequence_parallel, e.dtype)
        if group is None:
            de, dc, dbias = _kernels_backward(args, kw, dc_accum, de_fp32=uniform is not None)
            if uniform is not None:
                de, dc = uniform.add_to_de(de).to(e.dtype), uniform.add_to_dc(dc, dc_accum)
                dbias = uniform.add_to_dbias(dbias)
            return _grads(de, dc, dbias, bias, ctx.param, dc_accum)
        if OVERLAP_DE_REDUCTION and not torch.compiler.is_compiling():
            pending = []

            def reduce_de(de):
                if uniform is not None:
                    de = uniform.add_to_de(de)
                pending.append(start_reduction(de, group, scatter=sequence_parallel))

            _, dc, dbias = cce_backward_notify(*args, on_de_ready=reduce_de, dc_accum=dc_accum,
                                               **kw)
            de, work = pending[0]
            work.wait()
        else:
            de, dc, dbias = _kernels_backward(args, kw, dc_accum, de_fp32=True)
            if uniform is not None:
                de = uniform.add_to_de(de)
            de = reduce_scatter_dim0(de, group) if sequence_parallel else all_reduce_(de, group)
        if uniform is not None:
            dc, dbias = uniform.add_to_dc(dc, dc_accum), uniform.add_to_dbias(dbias)
        return _grads(de.to(e.dtype), dc, dbias, bias, ctx.param, dc_accum)


def _kernels_backward(args, kw, dc_accum, **flags):
    """(dE, dC, d bias) from the backward op; with ``dc_accum`` (main_grad) dC is added into it
    by ``cce_backward_into`` and None stands for it."""
    if dc_accum is None:
        return cce_backward(*args, **kw, **flags)
    de, dbias = cce_backward_into(dc_accum, *args, **kw, **flags)
    return de, None, dbias


def _softmax_lse(lse: torch.Tensor, z_loss: float) -> torch.Tensor:
    """The LSE whose softmax is the gradient's softmax term. d(z LSE^2)/dlogits = 2 z LSE
    softmax: the softmax term scaled by f = 1 + 2 z LSE, i.e. the softmax of an LSE lowered by
    log f (exact while f > 0: LSE > -1 / 2z)."""
    if not z_loss:
        return lse
    return lse - torch.log((1 + 2 * z_loss * lse).clamp(min=torch.finfo(lse.dtype).tiny))


def _backward_with_de(de_fwd, upstream, uniform, args, kw, dc_accum, param, group,
                      sequence_parallel, dtype):
    """The backward when the forward made dE (``de_fwd``, scaled by every per-token factor but
    the upstream gradient ``upstream``, a scalar or (N,)): dE is finished (and its reduction
    started) first, then the kernels compute only dC, which the reduction overlaps."""
    de = de_fwd.mul_(upstream[:, None] if upstream.dim() else upstream)
    if uniform is not None:
        de = uniform.add_to_de(de if de.dtype == uniform.scale.dtype else de.float())
    work = None
    if group is not None:
        if OVERLAP_DE_REDUCTION and not torch.compiler.is_compiling():
            de, work = start_reduction(de, group, scatter=sequence_parallel)
        elif sequence_parallel:
            de = reduce_scatter_dim0(de, group)
        else:
            de = all_reduce_(de, group)
    _, dc, dbias = _kernels_backward(args, kw, dc_accum, skip_de=True)
    if work is not None:
        work.wait()
    if uniform is not None:
        dc, dbias = uniform.add_to_dc(dc, dc_accum), uniform.add_to_dbias(dbias)
    return _grads(de.to(dtype), dc, dbias, kw["bias"], param, dc_accum)


def _grads(de, dc, dbias, bias, param, dc_accum):
    """The Function's input gradients: e, c (Megatron's placeholder once dC is in main_grad),
    None for the 12 options, bias's, and None for ``main_grad`` and ``want_de``."""
    if dc_accum is not None:
        dc = placeholder_grad(param, dc_accum)
    return (de, dc) + (None,) * 12 + (None if bias is None else dbias, None, None)


class _UniformTerm:
    """The gradient of label smoothing's uniform term, -eps / V on every logit of every valid
    token: rank one in both dE (scale_n * sum of this shard's rows of c) and dC (the same row,
    sum_n scale_n e_n, for every row of c), and -eps / V sum_n scale_n for every bias entry."""

    def __init__(self, e, c, grad_scale, smooth, bias=None):
        cdt = grad_scale.dtype
        self.de_row = -smooth * c.to(cdt).sum(dim=0)  # (D,)
        self.scale = grad_scale
        self.dc_row = -smooth * (grad_scale @ e.to(cdt))  # (D,)
        self.dbias = -smooth * grad_scale.sum() if bias is not None else None

    def add_to_dbias(self, dbias: torch.Tensor) -> torch.Tensor:
        if self.dbias is None:
            return dbias
        return (dbias.to(self.dbias.dtype) + self.dbias).to(dbias.dtype)

    def add_to_de(self, de: torch.Tensor) -> torch.Tensor:
        """de: (N, D) in the compute dtype, updated in place."""
        return de.add_(self.scale[:, None] * self.de_row)

    def add_to_dc(self, dc: torch.Tensor, dc_accum: torch.Tensor | None = None) -> torch.Tensor:
        """dC plus the row; with ``dc_accum`` (dC already added into it), into that instead."""
        if dc_accum is not None:
            dc_accum.add_(self.dc_row.to(dc_accum.dtype))
            return dc
        return (dc.to(self.dc_row.dtype) + self.dc_row).to(dc.dtype)
