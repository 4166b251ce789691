"""float64 oracles shared by the tests."""

import torch
import torch.nn.functional as F


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    if denom == 0:
        return float((x - ref).norm())
    return float((x - ref).norm() / denom)


def float64_reference(e, c, targets, ignore_index=-100, reduction="mean"):
    """Loss and grads of F.cross_entropy on the materialized float64 logits."""
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    logits = e64 @ c64.T
    loss = F.cross_entropy(
        logits.reshape(-1, c.shape[0]), targets.reshape(-1), ignore_index=ignore_index,
        reduction=reduction,
    )
    if reduction == "none":
        loss = loss.reshape(targets.shape)
        loss.backward(torch.ones_like(loss))
    else:
        loss.backward()
    return loss.detach(), e64.grad, c64.grad


def float64_oracle(e_in, c_in, targets, ignore_index=-100, reduction="mean"):
    """Loss, gradients of the views and gradients of the *leaves* of ``e_in`` / ``c_in``
    (objects with ``leaf`` and ``view``: the loss sees ``view(leaf)``), on materialized float64
    logits, with the library's conventions: the mean is over non-ignored tokens and is 0 when
    there are none. Returns ``(loss, (de_view, dc_view), (de_leaf, dc_leaf), (loss_mag, de_mag,
    dc_mag))`` where the magnitudes are the norms of the same sums taken in absolute values (for
    the loss, of |LSE| + |target logit|): the scale of their rounding error when their terms
    cancel (a target of probability ~1, all rows of c equal, ...)."""
    e64 = e_in.leaf.detach().double().requires_grad_()
    c64 = c_in.leaf.detach().double().requires_grad_()
    e, c = e_in.view(e64), c_in.view(c64)
    e.retain_grad(), c.retain_grad()
    t = targets.reshape(-1)
    logits = e.reshape(-1, c.shape[1]) @ c.T
    valid = t != ignore_index
    picked = logits.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    per_token = torch.where(valid, torch.logsumexp(logits, dim=1) - picked, 0.0)
    def reduce(x):
        if reduction == "none":
            return x.reshape(targets.shape)
        return x.sum() if reduction == "sum" else x.sum() / valid.sum().clamp(min=1)

    loss = reduce(per_token)
    loss_mag = float(reduce(torch.where(
        valid, torch.logsumexp(logits, dim=1).abs() + picked.abs(), 0.0)).detach().norm())
    loss.sum().backward()
    with torch.no_grad():
        dl = torch.softmax(logits, dim=1)
        dl[valid, t[valid]] += 1.0  # |softmax - onehot| <= softmax + onehot
        dl = dl * valid[:, None] / (valid.sum().clamp(min=1) if reduction == "mean" else 1)
        e_abs = e.reshape(-1, c.shape[1]).abs()
        mags = (float((dl @ c.abs()).norm()), float((dl.T @ e_abs).norm()))
    return loss.detach(), (e.grad, c.grad), (e64.grad, c64.grad), (loss_mag, *mags)
