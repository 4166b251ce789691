"""cce_dist.deepspeed.vocab_parallel_linear_cross_entropy against DeepSpeed's own function of
that name (deepspeed.sequence.linear_cross_entropy), on the CPU: same arguments, same values and
gradients, single process, TP=2 with uneven explicit shards, Ulysses SP=2, and SP=2 x TP=2."""


import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from distributed import run_ranks  # noqa: E402
from helpers import rel_err  # noqa: E402

H, V = 16, 90


pytestmark = pytest.mark.usefixtures("deepspeed_on_cpu")


def _data(seed, tokens):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.1
    target = torch.randint(0, V, (2, tokens), generator=g)
    target[0, :2] = -100
    return hidden, weight, bias, target


def _both(hidden, weight, bias, target, rows, **kw):
    """(ours, DeepSpeed's): loss and the gradients of hidden, this shard's weight and bias."""
    from deepspeed.sequence.linear_cross_entropy import (
        vocab_parallel_linear_cross_entropy as theirs,
    )

    from cce_dist.deepspeed import vocab_parallel_linear_cross_entropy as ours

    out = []
    for fn in (ours, theirs):
        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        b = bias[rows].clone().requires_grad_()
        loss = fn(h, w, target, bias=b, **kw)
        grads = torch.autograd.grad(loss.sum(), (h, w, b))
        out.append((loss.detach(), *grads))
    return out


def _compare(mine, theirs, what):
    for name, x, y in zip(("loss", "dhidden", "dweight", "dbias"), mine, theirs):
        assert x.shape == y.shape, (what, name)
        assert rel_err(x, y.double()) < 1e-5, (what, name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_process(reduction):
    import deepspeed  # noqa: F401

    hidden, weight, bias, target = _data(0, 7)
    _compare(*_both(hidden, weight, bias, target, slice(None), reduction=reduction), reduction)


def _worker(rank, world, tp, bounds):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    sp = world // tp
    tp_groups = [dist.new_group(list(range(i * tp, (i + 1) * tp))) for i in range(sp)]
    sp_groups = [dist.new_group(list(range(j, world, tp))) for j in range(tp)]
    tp_rank, sp_rank = rank % tp, rank // tp
    tp_group, sp_group = tp_groups[sp_rank], sp_groups[tp_rank]
    hidden, weight, bias, target = _data(1, 6 * sp)
    # Ulysses: each SP rank holds its slice of the sequence; the TP ranks of one SP rank hold
    # the same tokens and their own vocabulary rows.
    tokens = slice(sp_rank * 6, (sp_rank + 1) * 6)
    lo, hi = bounds[tp_rank], bounds[tp_rank + 1]
    kw = dict(tp_group=tp_group if tp > 1 else None, sp_group=sp_group if sp > 1 else None)
    if bounds != [i * V // tp for i in range(tp + 1)]:  # even shards: both infer the bounds
        kw.update(vocab_start_index=lo, vocab_end_index=hi)
    for reduction in ("mean", "sum", "none"):
        mine, theirs = _both(hidden[:, tokens], weight, bias, target[:, tokens], slice(lo, hi),
                             reduction=reduction, **kw)
        _compare(mine, theirs, (rank, reduction))
    if tp > 1:  # one rank's bad bounds: every rank of its TP group raises, none waits
        from cce_dist.deepspeed import vocab_parallel_linear_cross_entropy as ours

        bad = dict(kw, vocab_start_index=lo, vocab_end_index=hi + (1 if tp_rank == 0 else 0))
        with pytest.raises(ValueError, match="vocab_end_index|rejected"):
            ours(hidden[:, tokens].clone(), weight[lo:hi].clone(), target[:, tokens], **bad)


@pytest.mark.parametrize("world,tp,bounds", [
    (2, 2, [0, 37, 90]),  # TP=2, uneven explicit shards
    (2, 1, [0, 90]),  # Ulysses SP=2
    (4, 2, [0, 45, 90]),  # SP=2 x TP=2
])
def test_distributed(world, tp, bounds):
    run_ranks(world, _worker, tp, bounds)


def test_mixed_dtypes_follow_deepspeed():
    """bf16 hidden with an fp32 weight (as under autocast): DeepSpeed promotes both; so do we."""
    import deepspeed  # noqa: F401

    hidden, weight, bias, target = _data(2, 5)
    from cce_dist.deepspeed import vocab_parallel_linear_cross_entropy as ours
    from deepspeed.sequence.linear_cross_entropy import (
        vocab_parallel_linear_cross_entropy as theirs_fn,
    )

    h = hidden.bfloat16()
    a = ours(h, weight, target, bias=bias)
    b = theirs_fn(h, weight, target, bias=bias)
    assert a.dtype == torch.float32 and rel_err(a, b.double()) < 1e-5
