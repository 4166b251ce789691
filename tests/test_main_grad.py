"""``main_grad=True``: dC added straight into a Megatron-style fp32 ``main_grad``, following
Megatron's protocol (``cce_dist/parallel/main_grad.py``). The protocol itself is exercised with
Megatron's real DDP in ``test_megatron_stack.py``; here, the accumulation's precision over
micro-batches against float64, and what autograd receives in each case."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs

MICRO = 8


def _ddp_param(c: torch.Tensor) -> torch.nn.Parameter:
    """A parameter carrying what Megatron's DDP gives it: an fp32 main_grad and the flag."""
    p = torch.nn.Parameter(c.detach().clone())
    p.main_grad = torch.zeros(c.shape, dtype=torch.float32)
    p.grad_added_to_main_grad = False
    return p


def _dc64(e, c, t):
    """dC of the mean loss in float64."""
    c64 = c.detach().double().requires_grad_()
    F.cross_entropy(e.detach().double() @ c64.T, t).backward()
    return c64.grad


@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_main_grad_accumulates_micro_batches_in_fp32(backend, filter_eps):
    """8 bf16 micro-batches: main_grad holds their dC summed in fp32; the default engine adds
    each product without a bf16 rounding, so it sits closer to float64 than Megatron's own
    unfused path (each micro-batch's bf16 dC added into main_grad). What remains is the
    rounding of the softmax gradient to bf16 before the product, which both paths share."""
    batches = [make_inputs("lm", 96, 32, 200, dtype=torch.bfloat16, seed=s)
               for s in range(MICRO)]
    param = _ddp_param(batches[0][1])
    unfused = torch.zeros(param.shape, dtype=torch.float32)
    exact = torch.zeros(param.shape, dtype=torch.float64)
    for e, _, t in batches:
        linear_cross_entropy(e, param, t, filter_eps=filter_eps, backend=backend,
                             main_grad=True).backward()
        assert param.grad_added_to_main_grad
        # What DDP's hook does with the placeholder: nothing but dropping it.
        assert param.grad.untyped_storage().data_ptr() == param.main_grad.untyped_storage().data_ptr()
        param.grad, param.grad_added_to_main_grad = None, False
        c = param.detach().clone().requires_grad_()
        linear_cross_entropy(e, c, t, filter_eps=filter_eps, backend=backend).backward()
        unfused += c.grad.float()
        exact += _dc64(e, param, t)
    fused_err, unfused_err = rel_err(param.main_grad, exact), rel_err(unfused, exact)
    assert fused_err < 4e-3, fused_err
    if backend == "triton":
        assert fused_err < 0.8 * unfused_err, (fused_err, unfused_err)
    else:  # the reference rounds dC to c's dtype, then adds it: Megatron's unfused path
        assert fused_err <= unfused_err * (1 + 1e-6), (fused_err, unfused_err)


def test_placeholder_allocates_nothing_and_tied_weights_keep_their_other_gradient(backend):
    e, c, t = make_inputs("dense", 40, 16, 64, dtype=torch.float32, seed=3)
    param = _ddp_param(c)
    linear_cross_entropy(e, param, t, backend=backend, filter_eps=None,
                         main_grad=True).backward()
    dc = _dc64(e, c, t)
    assert rel_err(param.main_grad, dc) < 1e-5
    # Untied: a view of main_grad's storage stands in for dC (no (V, D) allocation).
    assert param.grad.shape == c.shape and param.grad.dtype == c.dtype
    assert param.grad.untyped_storage().data_ptr() == param.main_grad.untyped_storage().data_ptr()

    # Tied on one stage (Megatron marks it zero_out_wgrad): the loss returns no gradient, so
    # autograd's gradient is the embedding lookup's alone, which DDP's hook adds.
    tied = _ddp_param(c)
    tied.zero_out_wgrad = True
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(0))
    hidden = F.embedding(ids, tied) * 0.5 + e
    (linear_cross_entropy(hidden, tied, t, backend=backend, filter_eps=None, main_grad=True)
     + F.embedding(ids, tied).square().sum()).backward()
    assert tied.grad_added_to_main_grad
    full = tied.detach().clone().requires_grad_()
    hf = F.embedding(ids, full) * 0.5 + e
    (F.cross_entropy(hf @ full.T, t) + F.embedding(ids, full).square().sum()).backward()
    # main_grad (classifier use) + autograd's gradient (both lookups) = the full gradient.
    assert rel_err(tied.main_grad + tied.grad, full.grad) < 1e-5
    assert rel_err(tied.main_grad, _dc64(hf.detach(), c, t)) < 1e-5


def test_main_grad_without_megatrons_attributes_changes_nothing(backend):
    e, c, t = make_inputs("lm", 50, 16, 70, dtype=torch.float32, seed=5)
    plain = c.detach().clone().requires_grad_()
    linear_cross_entropy(e, plain, t, backend=backend, main_grad=True).backward()
    ref = c.detach().clone().requires_grad_()
    linear_cross_entropy(e, ref, t, backend=backend).backward()
    assert torch.equal(plain.grad, ref.grad) and not hasattr(plain, "grad_added_to_main_grad")
    with pytest.raises(TypeError, match="main_grad must be a bool"):
        linear_cross_entropy(e, plain, t, backend=backend, main_grad="yes")


@pytest.mark.gpu
def test_main_grad_accumulation_on_gpu_against_float64():
    """The same at a real shape on the GPU: 8 bf16 micro-batches of 4096 x 1024 tokens over
    32768 rows, the default engine's cuBLAS fp32 accumulation against float64."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(32768, 1024, device="cuda", dtype=torch.bfloat16)
                               * 0.05)
    param.main_grad = torch.zeros(param.shape, dtype=torch.float32, device="cuda")
    param.grad_added_to_main_grad = False
    unfused = torch.zeros_like(param.main_grad)
    exact = torch.zeros(param.shape, dtype=torch.float64, device="cuda")
    for m in range(MICRO):
        e, _, t = make_inputs("lm", 4096, 1024, 32768, dtype=torch.bfloat16, device="cuda",
                              seed=m)
        linear_cross_entropy(e, param, t, main_grad=True).backward()
        param.grad, param.grad_added_to_main_grad = None, False
        c = param.detach().clone().requires_grad_()
        linear_cross_entropy(e, c, t).backward()
        unfused += c.grad.float()
        exact += _dc64(e, param, t)
    fused_err, unfused_err = rel_err(param.main_grad, exact), rel_err(unfused, exact)
    print(f"main_grad over {MICRO} micro-batches: fused {fused_err:.2e}, unfused {unfused_err:.2e}")
    assert fused_err < 0.8 * unfused_err, (fused_err, unfused_err)


def test_a_leftover_gradient_is_not_added_into_main_grad():
    """Backward twice with nothing clearing ``c.grad`` in between (no DDP hook): autograd adds
    the second placeholder into the first in place, which must not touch main_grad."""
    e, c, t = make_inputs("dense", 40, 16, 64, dtype=torch.bfloat16, seed=4)
    param = _ddp_param(c)
    for _ in range(2):
        linear_cross_entropy(e, param, t, filter_eps=None, main_grad=True).backward()
    assert rel_err(param.main_grad, 2 * _dc64(e, c, t)) < 1e-2


def _vocab_parallel_worker(rank, world, overlap):
    """Vocabulary-parallel, bf16 shards with fp32 main_grads, label smoothing: each rank's
    main_grad holds its rows of the float64 dC, with the dE reduction overlapped or not."""
    import torch.distributed as dist

    from cce_dist.parallel import function, vocab_range

    function.OVERLAP_DE_REDUCTION = overlap
    e, c, t = make_inputs("lm", 48, 16, 101, dtype=torch.bfloat16, seed=7)
    start, end = vocab_range(101, rank, world)
    shard = _ddp_param(c[start:end])
    e = e.clone().requires_grad_()
    loss = linear_cross_entropy(e, shard, t, filter_eps=None, main_grad=True,
                                label_smoothing=0.1, group=dist.group.WORLD, vocab_start=start)
    loss.backward()
    c64 = c.detach().double().requires_grad_()
    e64 = e.detach().double().requires_grad_()
    F.cross_entropy(e64 @ c64.T, t, label_smoothing=0.1).backward()
    assert shard.grad_added_to_main_grad
    assert rel_err(shard.main_grad, c64.grad[start:end]) < 4e-3
    assert rel_err(e.grad, e64.grad) < 1e-2


@pytest.mark.parametrize("overlap", [True, False])
def test_main_grad_vocabulary_parallel(overlap):
    from distributed import run_ranks

    run_ranks(3, _vocab_parallel_worker, overlap)  # uneven shards: 34, 34, 33 rows
