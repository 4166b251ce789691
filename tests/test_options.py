"""Label smoothing, z-loss, a bias and a logit softcap, alone and together, single device and
vocabulary-parallel, against float64 torch (``F.cross_entropy(softcap * tanh((e @ c.T + bias) /
softcap), label_smoothing=)`` + ``z_loss * LSE^2``)."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs
from distributed import run_ranks
from helpers import rel_err

OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.3, 1e-3)]


def oracle(e, c, t, reduction, label_smoothing, z_loss, ignore_index=-100, bias=None,
           softcap=None):
    """float64 loss and gradients of e and c (and of bias, when given: a 4th output)."""
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    logits = e64.reshape(-1, c.shape[1]) @ c64.T
    if bias is not None:
        b64 = bias.detach().double().requires_grad_()
        logits = logits + b64
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
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
    if bias is not None:
        return loss.detach(), e64.grad, c64.grad, b64.grad
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


# (softcap, bias, label_smoothing, z_loss)
LOGIT_OPTIONS = [(None, True, 0.0, 0.0), (5.0, False, 0.0, 0.0), (3.0, True, 0.0, 1e-2),
                 (5.0, True, 0.1, 1e-3), (None, True, 0.2, 0.0)]


def _fused_engine(monkeypatch):
    """Run the fused tile kernels where the gemm engine would run (CUDA on old torch)."""
    from cce_dist.kernels import tiles

    monkeypatch.setattr(tiles, "INTERPRETER_CONFIG", replace(tiles.INTERPRETER_CONFIG, gemm=False))


@pytest.mark.parametrize("softcap,with_bias,label_smoothing,z_loss", LOGIT_OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
@pytest.mark.parametrize("engine", ["gemm", "fused"])
def test_bias_and_softcap_match_float64(backend, softcap, with_bias, label_smoothing, z_loss,
                                        reduction, filter_eps, engine, monkeypatch):
    if engine == "fused":
        if backend != "triton":
            pytest.skip("the engines are the Triton backend's")
        _fused_engine(monkeypatch)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)):
        e, c, t = _inputs(45, 24, 130, dtype, seed=1)
        bias = (torch.randn(130, generator=torch.Generator().manual_seed(9)) * 2).to(dtype)
        bias = bias.requires_grad_() if with_bias else None
        e.requires_grad_(), c.requires_grad_()
        loss = linear_cross_entropy(e, c, t, reduction=reduction, filter_eps=filter_eps,
                                    backend=backend, label_smoothing=label_smoothing,
                                    z_loss=z_loss, bias=bias, softcap=softcap)
        want = oracle(e, c, t, reduction, label_smoothing, z_loss, bias=bias, softcap=softcap)
        assert rel_err(loss, want[0]) < 1e-5, (dtype, loss, want[0])
        inputs = (e, c) if bias is None else (e, c, bias)
        got = torch.autograd.grad(loss.sum(), inputs)
        for name, x, y in zip(("dE", "dC", "dbias"), got, want[1:]):
            assert x.dtype == dtype and rel_err(x, y) < tol, (dtype, name)


def test_bias_and_softcap_are_exact_in_float64():
    e, c, t = _inputs(12, 8, 30, torch.float64, seed=2)
    bias = torch.randn(30, dtype=torch.float64)
    for softcap, with_bias, smoothing, z in LOGIT_OPTIONS:
        args = (e.requires_grad_(), c.requires_grad_(), bias.requires_grad_())
        assert torch.autograd.gradcheck(
            lambda a, b, bb: linear_cross_entropy(
                a, b, t, label_smoothing=smoothing, z_loss=z, filter_eps=None, softcap=softcap,
                bias=bb if with_bias else None), args)


@pytest.mark.parametrize("engine", ["gemm", "fused"])
@pytest.mark.parametrize("filter_code", [-0.05, 2.0 ** -12])
def test_bias_is_one_more_column_of_c_under_any_filter(engine, filter_code, monkeypatch):
    """With peaked logits and a filter that skips tiles (a budget of 5%, or the per-entry
    threshold): the kernels with a bias give the statistics and gradients of a classifier with
    one more column (and e a column of ones), dbias that column's dC, so a skipped tile
    contributes to neither (the gemm engine, whose products are dense, skips none)."""
    from cce_dist.kernels import cce_backward, cce_forward

    if engine == "fused":
        _fused_engine(monkeypatch)
    elif filter_code > 0:
        pytest.skip("the per-entry filter always runs on the fused kernels")
    e, c, t = make_inputs("zipf", 64, 32, 300, dtype=torch.float32, seed=3)
    e = e * 4
    bias = 0.3 * torch.randn(300, generator=torch.Generator().manual_seed(1))
    e1, c1 = torch.cat([e, torch.ones(64, 1)], 1), torch.cat([c, bias[:, None]], 1)
    scale = torch.full((64,), 1 / 64)
    lse, tgt, tile_max, _ = cce_forward(e, c, t, 0, "triton", False, 0.0, bias)
    lse1, tgt1, tile_max1, _ = cce_forward(e1, c1, t, 0, "triton")
    assert rel_err(lse, lse1.double()) < 1e-6 and rel_err(tgt, tgt1.double()) < 1e-6
    assert rel_err(tile_max, tile_max1.double()) < 1e-6
    de, dc, dbias = cce_backward(e, c, t, lse, scale, tile_max, 0, filter_code, "triton",
                                 bias=bias)
    de1, dc1, _ = cce_backward(e1, c1, t, lse, scale, tile_max, 0, filter_code, "triton")
    exact = cce_backward(e, c, t, lse, scale, tile_max, 0, None, "triton", bias=bias)[2]
    if engine == "gemm":  # dense products: the budget filter skips nothing there
        assert torch.equal(dbias, exact)
    else:
        assert not torch.equal(dbias, exact), "the filter must skip something here"
    assert rel_err(de, de1[:, :-1].double()) < 1e-5 and rel_err(dc, dc1[:, :-1].double()) < 1e-5
    assert rel_err(dbias, dc1[:, -1].double()) < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    ({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"),
    ({"softcap": float("inf")}, "softcap"), ({"bias": torch.zeros(9)}, "bias"),
    ({"bias": torch.zeros(10, dtype=torch.int64)}, "bias"), ({"bias": [0.0] * 10}, "bias"),
])
def test_bad_bias_and_softcap_name_the_argument(kwargs, match):
    e, c, t = _inputs(4, 8, 10, torch.float32, seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(e, c, t, **kwargs)


def _vp_bias_worker(rank, world, sizes):
    group = dist.group.WORLD
    v = sum(sizes)
    start = sum(sizes[:rank])
    rows_of = slice(start, start + sizes[rank])
    for sp in (False, True):
        for (softcap, _, smoothing, z), backend in zip(LOGIT_OPTIONS[2:],
                                                      ("triton", "reference", "triton")):
            s = 2 * world
            e_full, c_full, t = _inputs(s * 3, 16, v, torch.float32, seed=3)
            bias_full = torch.randn(v, generator=torch.Generator().manual_seed(5))
            e_full, t = e_full.view(s, 3, 16), t.view(s, 3)
            rows = slice(rank * s // world, (rank + 1) * s // world) if sp else slice(None)
            e = e_full[rows].clone().requires_grad_()
            c = c_full[rows_of].clone().requires_grad_()
            bias = bias_full[rows_of].clone().requires_grad_()
            loss = linear_cross_entropy(e, c, t, group=group, sequence_parallel=sp,
                                        backend=backend, label_smoothing=smoothing, z_loss=z,
                                        bias=bias, softcap=softcap)
            want, want_de, want_dc, want_db = oracle(e_full, c_full, t, "mean", smoothing, z,
                                                     bias=bias_full, softcap=softcap)
            what = (rank, sp, softcap, smoothing, z, backend)
            assert rel_err(loss, want) < 1e-5, what
            loss.backward()
            assert rel_err(e.grad, want_de.view(s, 3, 16)[rows]) < 1e-5, what
            assert rel_err(c.grad, want_dc[rows_of]) < 1e-5, what
            assert rel_err(bias.grad, want_db[rows_of]) < 1e-5, what
    # Ranks that disagree on the softcap, or on whether there is a bias, all raise.
    e, c, t = _inputs(6, 16, v, torch.float32, seed=4)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(e, c[rows_of], t, group=group, softcap=10.0 + rank)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(e, c[rows_of], t, group=group,
                             bias=torch.zeros(sizes[rank]) if rank == 0 else None)


@pytest.mark.parametrize("sizes", [[40, 23], [30, 1, 45]])
def test_bias_and_softcap_vocabulary_parallel(sizes):
    """Uneven shards over gloo (world 2 and 3), sequence parallel on and off: each rank's bias
    shard and its gradient, the softcap with label smoothing and z-loss."""
    run_ranks(len(sizes), _vp_bias_worker, sizes)


def test_module_form_takes_the_options():
    from cce_dist import LinearCrossEntropy

    e, c, t = _inputs(20, 16, 40, torch.float32, seed=3)
    bias = torch.randn(40)
    module = LinearCrossEntropy(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, filter_eps=None)
    want = linear_cross_entropy(e, c, t, label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                                filter_eps=None, bias=bias)
    assert torch.equal(module(e, c, t, bias=bias), want)
    assert "softcap=4.0" in repr(module)
