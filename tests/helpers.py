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
