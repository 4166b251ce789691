"""Label smoothing and z-loss, alone and together, single device and vocabulary-parallel,
against float64 torch (``F.cross_entropy(..., label_smoothing=)`` + ``z_loss * LSE^2``)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cce_dist import linear_cross_entropy
from distributed import run_ranks
from helpers import rel_err

OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.3, 1e-3)]


def oracle(e, c, t, reduction, label_smoothing, z_loss, ignore_index=-100):
    """float64 loss and gradients of e and c."""
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    logits = e64.reshape(-1, c.shape[1]) @ c64.T
    flat = t.reshape(-1)
    valid = flat != ignore_index
    ce = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    per_token = ce + torch.where(valid, z_loss * torch.logsumexp(logits, dim=1) ** 2, 0.0)
    if reduction == "none":
        loss = per_token.reshape(t.shape)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / valid.sum().clamp(min=1)
    loss.sum().backward()
    return loss.detach(), e64.grad, c64.grad


def _inputs(n, d, v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return e, c, t


@pytest.mark.parametrize("label_smoothing,z_loss", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_options_match_float64(backend, label_smoothing, z_loss, reduction, filter_eps):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)):
        e, c, t = _inputs(45, 24, 130, dtype, seed=1)
        e.requires_grad_(), c.requires_grad_()
        loss = linear_cross_entropy(e, c, t, reduction=reduction, filter_eps=filter_eps,
                                    backend=backend, label_smoothing=label_smoothing,
                                    z_loss=z_loss)
        want, want_de, want_dc = oracle(e, c, t, reduction, label_smoothing, z_loss)
        assert rel_err(loss, want) < 1e-5, (dtype, loss, want)
        de, dc = torch.autograd.grad(loss.sum(), (e, c))
        assert rel_err(de, want_de) < tol and rel_err(dc, want_dc) < tol, dtype


def test_options_are_exact_in_float64():
    e, c, t = _inputs(12, 8, 30, torch.float64, seed=2)
    e.requires_grad_(), c.requires_grad_()
    for smoothing, z in OPTIONS:
        assert torch.autograd.gradcheck(
            lambda a, b: linear_cross_entropy(a, b, t, label_smoothing=smoothing, z_loss=z,
                                              filter_eps=None), (e, c))


@pytest.mark.parametrize("name,value", [("label_smoothing", 1.0), ("label_smoothing", -0.1),
                                        ("z_loss", -1e-4), ("z_loss", "big")])
def test_bad_option_values_name_the_argument(name, value):
    e, c, t = _inputs(4, 8, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match=name):
        linear_cross_entropy(e, c, t, **{name: value})


def _vp_worker(rank, world, sizes):
    group = dist.group.WORLD
    v = sum(sizes)
    start = sum(sizes[:rank])
    for sp in (False, True):
        for (smoothing, z), backend in zip(OPTIONS[1:], ("triton", "reference", "triton")):
            s = 2 * world
            e_full, c_full, t = _inputs(s * 3, 16, v, torch.float32, seed=3)
            e_full = e_full.view(s, 3, 16)
            t = t.view(s, 3)
            rows = slice(rank * s // world, (rank + 1) * s // world) if sp else slice(None)
            e = e_full[rows].clone().requires_grad_()
            c = c_full[start:start + sizes[rank]].clone().requires_grad_()
            loss = linear_cross_entropy(e, c, t, group=group, sequence_parallel=sp,
                                        backend=backend, label_smoothing=smoothing, z_loss=z)
            want, want_de, want_dc = oracle(e_full, c_full, t, "mean", smoothing, z)
            assert rel_err(loss, want) < 1e-5, (rank, sp, smoothing, z)
            loss.backward()
            assert rel_err(e.grad, want_de.view(s, 3, 16)[rows]) < 1e-5, (rank, sp, smoothing)
            assert rel_err(c.grad, want_dc[start:start + sizes[rank]]) < 1e-5, (rank, sp, z)
    # Ranks that disagree on an option all raise before any collective of the loss.
    e, c, t = _inputs(6, 16, v, torch.float32, seed=4)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(e, c[start:start + sizes[rank]], t, group=group,
                             label_smoothing=0.1 * rank)


@pytest.mark.parametrize("sizes", [[40, 23], [30, 1, 45]])
def test_options_vocabulary_parallel(sizes):
    """Uneven shards over gloo (world 2 and 3), sequence parallel on and off: the global mean
    logit of label smoothing and the z-loss of the global LSE, in the one forward all-gather."""
    run_ranks(len(sizes), _vp_worker, sizes)


def test_return_lse_gives_the_per_token_lse_without_changing_the_loss(backend):
    e, c, t = _inputs(3 * 7, 16, 50, torch.float32, seed=5)
    e, t = e.view(3, 7, 16).requires_grad_(), t.view(3, 7)
    loss, lse = linear_cross_entropy(e, c, t, backend=backend, z_loss=1e-2, return_lse=True)
    want = torch.logsumexp(e.double() @ c.double().T, dim=-1)
    assert lse.shape == t.shape and not lse.requires_grad
    assert rel_err(lse, want) < 1e-6
    assert torch.equal(loss, linear_cross_entropy(e, c, t, backend=backend, z_loss=1e-2))
    loss.backward()  # the extra output does not disturb the gradient
    assert torch.isfinite(e.grad).all()
