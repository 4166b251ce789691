"""Bad input: a clear TypeError / ValueError naming the argument, before any kernel runs."""

import pytest
import torch

import cce_dist
from cce_dist import linear_cross_entropy


@pytest.fixture
def good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))


@pytest.fixture
def no_kernels(monkeypatch):
    """Any kernel launch during a bad call fails the test."""
    import cce_dist.parallel.function as fn

    def boom(*a, **k):
        raise AssertionError("a kernel ran before the argument check")

    monkeypatch.setattr(fn, "cce_forward", boom)
    monkeypatch.setattr(fn, "cce_backward", boom)


@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda e, c, t: (e, c[0], t), ValueError, "c must be 2-D"),
        (lambda e, c, t: (e, c[:, :5], t), ValueError, "e's last dim"),
        (lambda e, c, t: (e, c.double(), t), TypeError, "c's dtype"),
        (lambda e, c, t: (e.int(), c.int(), t), TypeError, "e must be"),
        (lambda e, c, t: (e, c, t.float()), TypeError, "targets must be an integer"),
        (lambda e, c, t: (e, c, t.bool()), TypeError, "targets must be an integer"),
        (lambda e, c, t: (e, c, t[:3]), ValueError, "targets' shape"),
        (lambda e, c, t: (e, c, t[:, None]), ValueError, "targets' shape"),
        (lambda e, c, t: (e, c, t.tolist()), TypeError, "targets must be a torch.Tensor"),
        (lambda e, c, t: (e, c.to("meta"), t), ValueError, "one device"),
        (lambda e, c, t: (e[:, :0], c[:, :0], t), ValueError, "hidden size D > 0"),
    ],
)
def test_bad_tensors(good, no_kernels, mutate, exc, word):
    with pytest.raises(exc, match=word):
        linear_cross_entropy(*mutate(*good))


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"filter_eps": "fast"}, ValueError, "filter_eps"),
        ({"filter_eps": 2.0}, ValueError, "filter_eps"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"vocab_start": 3}, ValueError, "vocab_start"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"softcap": 0.0}, ValueError, "softcap"),
    ],
)
def test_bad_options(good, no_kernels, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        linear_cross_entropy(*good, **kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"filter_eps": 2.0}, ValueError, "filter_eps"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"softcap": float("inf")}, ValueError, "softcap"),
    ],
)
def test_the_module_checks_its_options_when_built(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        cce_dist.LinearCrossEntropy(**kwargs)


def test_logprobs_check_ignore_index(good, no_kernels):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cce_dist.linear_logprobs_entropy(*good, ignore_index=-100.0)


@pytest.mark.parametrize("bad", [10, -1, 1000])
def test_target_out_of_range_on_cpu(good, no_kernels, bad):
    e, c, t = good
    t[2] = bad
    with pytest.raises(ValueError, match="targets must be in"):
        linear_cross_entropy(e, c, t)


@pytest.mark.parametrize("dtype,v,target,ignored", [
    (torch.uint8, 200, 156, False),   # -100 as uint8 is 156: a class here, not an ignore
    (torch.uint8, 300, 100, False),   # 300 as uint8 is 44: 100 must not be out of range
    (torch.int8, 200, 35, False),     # 200 as int8 is -56
    (torch.int8, 200, -100, True),
    (torch.int16, 40000, 30000, False),  # 40000 as int16 is negative
])
def test_narrow_integer_targets_mean_their_values(backend, dtype, v, target, ignored):
    """Targets in uint8 / int8 / int16 give the loss and gradients of the same values in int64
    (F.cross_entropy's meaning): no wrapped ignore_index silently dropping a class, no valid
    target rejected against a wrapped vocabulary size; both functions."""
    if backend == "triton" and v > 1000:
        pytest.skip("the interpreter's chunks over 40000 rows are slow; the reference covers it")
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 8, generator=g, requires_grad=True)
    c = torch.randn(v, 8, generator=g, requires_grad=True)
    wide = torch.tensor([target, 5, 7])
    losses, grads = [], []
    for t in (wide, wide.to(dtype)):
        loss = linear_cross_entropy(e, c, t, reduction="none", backend=backend)
        grads.append(torch.autograd.grad(loss.sum(), (e, c)))
        losses.append(loss.detach())
        lp, _ = cce_dist.linear_logprobs_entropy(e.detach(), c.detach(), t, backend=backend)
        losses.append(lp)
    assert torch.equal(losses[0], losses[2]) and torch.equal(losses[1], losses[3])
    assert (losses[2][0] == 0) == ignored and (losses[3][0] == 0) == ignored
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_ignore_index_is_not_out_of_range(good):
    e, c, t = good
    t[1] = -100
    assert torch.isfinite(linear_cross_entropy(e, c, t))


def test_default_filter_eps_values():
    assert cce_dist.default_filter_eps(torch.bfloat16) == 2.0 ** -12
    assert cce_dist.default_filter_eps(torch.float16) == 2.0 ** -15
    assert cce_dist.default_filter_eps(torch.float32) == 2.0 ** -28
