"""linear_logprobs_entropy: targets' log-probabilities and the softmax entropy, with any upstream
gradients, single device and vocabulary-parallel, against float64 torch."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from cce_dist import linear_logprobs_entropy
from distributed import run_ranks
from helpers import rel_err


def oracle(e, c, t, temperature=1.0, ignore_index=-100, a=None, b=None):
    """float64 (logprobs, entropy) and the gradients of sum(a * logprobs + b * entropy)."""
    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    z = (e64.reshape(-1, c.shape[1]) @ c64.T) / temperature
    logp = torch.log_softmax(z, dim=1)
    flat = t.reshape(-1)
    valid = flat != ignore_index
    lp = torch.where(valid, logp.gather(1, flat.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(1), 0.0)
    lp, ent = lp.reshape(t.shape), ent.reshape(t.shape)
    a = torch.zeros_like(lp) if a is None else a.double()
    b = torch.zeros_like(ent) if b is None else b.double()
    de, dc = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), (e64, c64))
    return lp.detach(), ent.detach(), de, dc


def _inputs(n, d, v, dtype, seed, ignore=True):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    return e, c, t


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
@pytest.mark.parametrize("grads", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize("engine", ["gemm", "fused"])
def test_match_float64(backend, temperature, filter_eps, grads, engine, monkeypatch):
    if engine == "fused":
        if backend != "triton":
            pytest.skip("the engines are the Triton backend's")
        from cce_dist.kernels import tiles

        monkeypatch.setattr(tiles, "INTERPRETER_CONFIG",
                            replace(tiles.INTERPRETER_CONFIG, gemm=False))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)):
        e, c, t = _inputs(45, 24, 130, dtype, seed=1)
        e, t = e.view(5, 9, 24).requires_grad_(), t.view(5, 9)
        c.requires_grad_()
        g = torch.Generator().manual_seed(2)
        a = torch.randn(t.shape, generator=g) if grads != "entropy" else None
        b = torch.randn(t.shape, generator=g) if grads != "logprobs" else None
        lp, ent = linear_logprobs_entropy(e, c, t, temperature=temperature,
                                          filter_eps=filter_eps, backend=backend)
        want_lp, want_ent, want_de, want_dc = oracle(e, c, t, temperature, a=a, b=b)
        assert lp.shape == t.shape and ent.shape == t.shape and lp.dtype == torch.float32
        assert rel_err(lp, want_lp) < 1e-5 and rel_err(ent, want_ent) < 1e-5, dtype
        assert torch.all(lp[t == -100] == 0) and torch.all(ent[t == -100] == 0)
        outputs = [x for x, w in ((lp, a), (ent, b)) if w is not None]
        weights = [w for w in (a, b) if w is not None]
        de, dc = torch.autograd.grad(outputs, (e, c), weights)
        assert rel_err(de, want_de) < tol and rel_err(dc, want_dc) < tol, (dtype, grads)


def _peaked(n, d, v, seed):
    """fp32, logits up to ~150 at temperature 0.7, each token's target its largest logit: an
    entropy of ~1e-1 nats left after cancelling logits of ~100."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * 20 / d ** 0.5
    return e, c, (e @ c.T).argmax(1)


@pytest.mark.parametrize("engine", ["gemm", "fused"])
def test_entropy_of_a_peaked_softmax_at_large_logits(backend, engine, monkeypatch):
    """The parts' (column groups', chunks') mean logits are combined under weights normalized by
    their own sum: weights exp(lse_s - LSE) carry the fp32 rounding of an LSE of ~100 (7.6e-6)
    into the mean, 4e-4 nats of entropy and 1e-3 of the gradients here."""
    if engine == "fused":
        if backend != "triton":
            pytest.skip("the engines are the Triton backend's")
        from cce_dist.kernels import tiles

        monkeypatch.setattr(tiles, "INTERPRETER_CONFIG",
                            replace(tiles.INTERPRETER_CONFIG, gemm=False))
    e, c, t = _peaked(64, 32, 400, seed=1)
    e.requires_grad_(), c.requires_grad_()
    lp, ent = linear_logprobs_entropy(e, c, t, temperature=0.7, filter_eps=None,
                                      backend=backend)
    want_lp, want_ent, want_de, want_dc = oracle(e, c, t, 0.7, b=torch.ones(t.shape))
    assert (ent.double() - want_ent).abs().max() < 6e-5
    de, dc = torch.autograd.grad(ent.sum(), (e, c))
    assert rel_err(de, want_de) < 2e-4 and rel_err(dc, want_dc) < 2e-4


def test_exact_in_float64():
    e, c, t = _inputs(12, 8, 30, torch.float64, seed=2)
    e.requires_grad_(), c.requires_grad_()
    for temperature in (1.0, 0.5):
        assert torch.autograd.gradcheck(
            lambda x, y: linear_logprobs_entropy(x, y, t, temperature=temperature,
                                                 filter_eps=None), (e, c))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan"), True, "1"])
def test_bad_temperature_names_the_argument(temperature):
    e, c, t = _inputs(4, 8, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs_entropy(e, c, t, temperature=temperature)


def _vp_worker(rank, world, sizes):
    group = dist.group.WORLD
    v = sum(sizes)
    start = sum(sizes[:rank])
    rows_of = slice(start, start + sizes[rank])
    for sp in (False, True):
        for backend, temperature in (("triton", 1.0), ("reference", 0.7), ("triton", 1.5)):
            s = 2 * world
            e_full, c_full, t = _inputs(s * 3, 16, v, torch.float32, seed=3)
            e_full, t = e_full.view(s, 3, 16), t.view(s, 3)
            g = torch.Generator().manual_seed(4)
            a, b = torch.randn(t.shape, generator=g), torch.randn(t.shape, generator=g)
            rows = slice(rank * s // world, (rank + 1) * s // world) if sp else slice(None)
            e = e_full[rows].clone().requires_grad_()
            c = c_full[rows_of].clone().requires_grad_()
            lp, ent = linear_logprobs_entropy(e, c, t, group=group, sequence_parallel=sp,
                                              backend=backend, temperature=temperature)
            want_lp, want_ent, want_de, want_dc = oracle(e_full, c_full, t, temperature, a=a,
                                                         b=b)
            what = (rank, sp, backend, temperature)
            assert rel_err(lp, want_lp) < 1e-5 and rel_err(ent, want_ent) < 1e-5, what
            ((lp * a).sum() + (ent * b).sum()).backward()
            assert rel_err(e.grad, want_de.view(s, 3, 16)[rows]) < 1e-5, what
            assert rel_err(c.grad, want_dc[rows_of]) < 1e-5, what
    # A peaked softmax at large logits: the ranks' mean logits combined without the rounding
    # of a global LSE of ~100 (see test_entropy_of_a_peaked_softmax_at_large_logits).
    e_full, c_full, t = _peaked(12, 16, v, seed=6)
    _, ent = linear_logprobs_entropy(e_full, c_full[rows_of], t, group=group, temperature=0.7,
                                     backend="reference")
    assert (ent.double() - oracle(e_full, c_full, t, 0.7)[1]).abs().max() < 6e-5, rank
    # Ranks that disagree on the temperature all raise before any collective of the function.
    e, c, t = _inputs(6, 16, v, torch.float32, seed=5)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs_entropy(e, c[rows_of], t, group=group, temperature=1.0 + rank)


@pytest.mark.parametrize("sizes", [[40, 23], [30, 1, 45]])
def test_vocabulary_parallel(sizes):
    """Uneven shards over gloo (world 2 and 3), sequence parallel on and off: the global LSE,
    target logit and softmax-weighted mean logit from one all-gather, dE reduced."""
    run_ranks(len(sizes), _vp_worker, sizes)
