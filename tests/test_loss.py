"""linear_cross_entropy against float64 F.cross_entropy, on both backends (Triton interpreted)."""

import pytest
import torch

from cce_dist import LinearCrossEntropy, linear_cross_entropy
from helpers import float64_reference, rel_err

# (leading shape, D, V): N=1, D not a power of two, V not a multiple of any block or chunk.
SHAPES = [((1,), 24, 37), ((53,), 40, 101), ((3, 7), 33, 130), ((2, 2, 5), 17, 49)]


def _inputs(lead, d, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, d, generator=g).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, lead, generator=g)
    return e, c, t


@pytest.mark.parametrize("lead,d,v", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_exact_matches_float64(backend, lead, d, v, reduction):
    e, c, t = _inputs(lead, d, v)
    flat = t.reshape(-1)
    flat[0] = 0  # targets at both ends of the vocabulary
    flat[-1] = v - 1
    if flat.numel() > 2:
        flat[1] = -100
    loss = linear_cross_entropy(e, c, t, reduction=reduction, filter_eps=None, backend=backend)
    ref_loss, ref_de, ref_dc = float64_reference(e, c, t, reduction=reduction)
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < 1e-5
    (loss if reduction != "none" else loss.sum()).backward()
    assert e.grad.dtype == e.dtype and c.grad.dtype == c.dtype
    assert rel_err(e.grad, ref_de) < 1e-5
    assert rel_err(c.grad, ref_dc) < 1e-5


def test_none_reduction_zero_at_ignored(backend):
    e, c, t = _inputs((20,), 16, 40)
    t[::3] = -100
    loss = linear_cross_entropy(e, c, t, reduction="none", backend=backend)
    assert torch.all(loss[::3] == 0)
    assert torch.all(loss[1::3] > 0)


def test_custom_ignore_index(backend):
    e, c, t = _inputs((30,), 16, 40)
    t[:10] = 7
    loss = linear_cross_entropy(e, c, t, ignore_index=7, filter_eps=None, backend=backend)
    ref, de, dc = float64_reference(e, c, t, ignore_index=7)
    assert rel_err(loss, ref) < 1e-5
    loss.backward()
    assert rel_err(e.grad, de) < 1e-5 and rel_err(c.grad, dc) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_finite_zero(backend, reduction):
    e, c, t = _inputs((9,), 16, 40)
    t[:] = -100
    loss = linear_cross_entropy(e, c, t, reduction=reduction, backend=backend)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(e.grad == 0) and torch.all(c.grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    e, c, t = _inputs((45,), 48, 70, dtype=dtype)
    loss = linear_cross_entropy(e, c, t, filter_eps=None, backend=backend)
    ref, de, dc = float64_reference(e, c, t)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < 1e-4  # fp32 accumulation of exactly-representable products
    loss.backward()
    assert e.grad.dtype == dtype and c.grad.dtype == dtype
    assert rel_err(e.grad, de) < 1e-2 and rel_err(c.grad, dc) < 1e-2


def test_module_form_matches_function(backend):
    e, c, t = _inputs((3, 11), 16, 50)
    mod = LinearCrossEntropy(reduction="sum", filter_eps=None, backend=backend)
    assert torch.equal(
        mod(e, c, t),
        linear_cross_entropy(e, c, t, reduction="sum", filter_eps=None, backend=backend),
    )


def test_gradcheck_float64_reference():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 8, -100, 3, 3, 5])
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: linear_cross_entropy(a, b, t, reduction=reduction, filter_eps=None),
            (e, c),
        )


def test_bf16_exact_no_worse_than_torch_eager(backend):
    """Exact mode vs float64, against F.cross_entropy((e @ c.T).float()) on the same bf16."""
    from cce_dist.testing import make_inputs

    for regime in ("dense", "lm", "spread"):
        e, c, t = make_inputs(regime, 96, 64, 300, dtype=torch.bfloat16, seed=1)
        e.requires_grad_(), c.requires_grad_()
        ref, de, dc = float64_reference(e, c, t)
        eager = torch.nn.functional.cross_entropy((e @ c.T).float(), t)
        ge, gc = torch.autograd.grad(eager, (e, c))
        loss = linear_cross_entropy(e, c, t, filter_eps=None, backend=backend)
        oe, oc = torch.autograd.grad(loss, (e, c))
        assert rel_err(loss, ref) <= max(1.01 * rel_err(eager, ref), 1e-6), regime
        assert rel_err(oe, de) <= 1.05 * rel_err(ge, de), regime
        assert rel_err(oc, dc) <= 1.05 * rel_err(gc, dc), regime
