"""Vocabulary-parallel loss over real gloo process groups against the single-device float64
oracle: world sizes 2, 3 and 4, uneven shards, subgroups, sequence parallelism, reductions,
ignore_index, both backends; and mismatches between ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cce_dist import linear_cross_entropy, vocab_range
from distributed import run_ranks


def _data(seed, s, b, d, v):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(s, b, d, generator=g)  # sequence-first, as Megatron lays it out
    c = torch.randn(v, d, generator=g) * 0.5
    t = torch.randint(0, v, (s, b), generator=g)
    return e, c, t


def _reference(e, c, t, reduction):
    e64 = e.double().requires_grad_()
    c64 = c.double().requires_grad_()
    loss = F.cross_entropy((e64 @ c64.T).reshape(-1, c.shape[0]), t.reshape(-1),
                           reduction=reduction)
    loss = loss.reshape(t.shape) if reduction == "none" else loss
    loss.sum().backward()
    return loss.detach(), e64.grad, c64.grad


def _rel(x, ref):
    x, ref = x.detach().double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def _check_case(group, case):
    gw, gr = dist.get_world_size(group), dist.get_rank(group)
    s, b, d = case["s"], case["b"], case["d"]
    sizes = case["sizes"]
    v = sum(sizes)
    e_full, c_full, t = _data(case["seed"], s, b, d, v)
    if case.get("ignore") == "some":
        t[::3] = -100
    elif case.get("ignore") == "first_slice":  # every token of group rank 0's slice ignored
        t[: s // gw] = -100
    elif case.get("ignore") == "random":
        t[torch.rand(t.shape, generator=torch.Generator().manual_seed(case["seed"])) < 0.5] = -100
    elif case.get("ignore") == "one_valid":
        keep = t[s - 1, b - 1].clone()
        t[:] = -100
        t[s - 1, b - 1] = keep
    start = sum(sizes[:gr])
    dev, dtype = case.get("device", "cpu"), case.get("dtype", torch.float32)
    c = c_full[start:start + sizes[gr]].to(dev, dtype).requires_grad_()
    sp = case["sp"]
    rows = slice(gr * s // gw, (gr + 1) * s // gw) if sp else slice(None)
    e = e_full[rows].to(dev, dtype).requires_grad_()
    if dtype != torch.float32:  # the oracle sees the same rounded inputs
        e_full, c_full = e_full.to(dtype).float(), c_full.to(dtype).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    loss = linear_cross_entropy(
        e, c, t.to(dev), reduction=case["reduction"], filter_eps=case.get("filter_eps"),
        group=group,
        sequence_parallel=sp, vocab_start=start if case.get("explicit_start") else None,
        backend=case["backend"],
    )
    ref_loss, ref_de, ref_dc = _reference(e_full, c_full, t, case["reduction"])
    assert torch.isfinite(loss).all(), case
    assert _rel(loss.cpu(), ref_loss) < min(tol, 1e-4), (case, loss, ref_loss)
    # Every rank returns the very same loss.
    flat = loss.detach().reshape(-1)
    everyone = [torch.empty_like(flat) for _ in range(gw)]
    dist.all_gather(everyone, flat, group=group)
    assert all(torch.equal(x, flat) for x in everyone), case
    loss.sum().backward()
    assert _rel(e.grad.cpu(), ref_de[rows]) < tol, case
    if sizes[gr]:
        assert _rel(c.grad.cpu(), ref_dc[start:start + sizes[gr]]) < tol, case


def _cases(world, seed=0):
    splits = {
        2: [vocab_range(51, r, 2)[1] - vocab_range(51, r, 2)[0] for r in range(2)],
        3: [20, 1, 29],  # uneven, one shard of a single row
        4: [13, 0, 20, 18],  # one rank owns no row at all
    }
    sizes = splits[world]
    out = []
    for backend in ("triton", "reference"):
        for reduction in ("mean", "sum", "none"):
            for sp in (False, True):
                out.append(dict(seed=seed, s=2 * world, b=3, d=24, sizes=sizes, sp=sp,
                                reduction=reduction, backend=backend, ignore="some",
                                explicit_start=(reduction == "sum")))
    for ignore in ("first_slice", "one_valid"):
        out.append(dict(seed=seed + 1, s=2 * world, b=2, d=16, sizes=sizes, sp=True,
                        reduction="mean", backend="triton", ignore=ignore))
    return out


def _parity_worker(rank, world, subgroups, device="cpu"):
    group = None
    if subgroups:
        for ranks in subgroups:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if rank in ranks:
                group, index = g, subgroups.index(ranks)
        cases = _cases(len(subgroups[0]), seed=10 * index)  # each group its own data
    else:
        group = dist.group.WORLD
        cases = _cases(world)
    for case in cases:
        if device == "cuda":
            case.update(device="cuda", backend="triton", dtype=torch.bfloat16)
        _check_case(group, case)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_single_device(world):
    run_ranks(world, _parity_worker, None)


def _serial_reduction_worker(rank, world):
    """The dE reduction after the whole backward (the path torch.compile takes)."""
    from cce_dist.parallel import function

    function.OVERLAP_DE_REDUCTION = False
    _parity_worker(rank, world, None)


def test_matches_single_device_without_overlap():
    run_ranks(2, _serial_reduction_worker)


def test_tensor_parallel_subgroups_in_a_larger_world():
    run_ranks(4, _parity_worker, [[0, 1], [2, 3]])


def _mismatch_worker(rank, world):
    group = dist.group.WORLD
    d, s, b = 8, 4, 2
    sizes = [vocab_range(30, r, world) for r in range(world)]
    e_full, c_full, t = _data(0, s, b, d, 30)
    lo, hi = sizes[rank]

    def call(e=e_full, c=None, targets=t, **kw):
        c = c_full[lo:hi] if c is None else c
        return linear_cross_entropy(e, c, targets, group=group, backend="reference", **kw)

    def expect(match, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            call(**kw)

    # D differs on the last rank (consistent locally): every rank names D.
    wide = torch.randn(30, d + 1)
    if rank == world - 1:
        expect("disagree on D", e=torch.randn(s, b, d + 1), c=wide[lo:hi])
    else:
        expect("disagree on D")
    expect("disagree on rows of e", e=e_full[: s - (rank == 0)], targets=t[: s - (rank == 0)])
    expect("disagree on reduction", reduction="sum" if rank == 0 else "mean")
    expect("disagree on dtype", e=e_full.double() if rank == 0 else e_full,
           c=c_full[lo:hi].double() if rank == 0 else None)
    # Explicit shards that overlap, or leave a gap.
    expect("overlaps", vocab_start=max(lo - 1, 0))
    expect("gap", c=c_full[lo:hi - 1] if rank == 0 else None, vocab_start=lo)
    expect("on every rank or on none", vocab_start=lo if rank == 0 else None)
    # A local error on one rank: it names the argument there, the others name that rank.
    if rank == 1:
        expect("targets must be an integer", TypeError, targets=t.float())
    else:
        expect(r"rank\(s\) \[1\] rejected")
    # After all that, a correct call still works on every rank.
    assert torch.isfinite(call())


@pytest.mark.parametrize("world", [2, 3])
def test_mismatches_raise_on_every_rank(world):
    run_ranks(world, _mismatch_worker)


def _target_mismatch_worker(rank, world):
    """One rank holds a different target for token 3 (and another marks token 5 ignored): on
    every rank those tokens' loss, logprob and input gradient are NaN, the others are right."""
    from cce_dist import linear_logprobs_entropy

    g = torch.Generator().manual_seed(0)
    n, d, v = 12, 8, 37
    e, c = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    want = F.cross_entropy(e @ c.T, t, reduction="none")
    mine = t.clone()
    if rank == world - 1:
        mine[3] = (t[3] + 1) % v
        mine[5] = -100
    start, end = vocab_range(v, rank, world)
    ee = e.clone().requires_grad_()
    loss = linear_cross_entropy(ee, c[start:end], mine, reduction="none", filter_eps=None,
                                group=dist.group.WORLD, vocab_start=start)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[3, 5]] = True
    assert loss[bad].isnan().all() and not loss[~bad].isnan().any()
    assert torch.allclose(loss[~bad], want[~bad], atol=1e-5)
    loss.nan_to_num().sum().backward()
    assert ee.grad[bad].isnan().all() and not ee.grad[~bad].isnan().any()
    logprobs, _ = linear_logprobs_entropy(e, c[start:end], mine, group=dist.group.WORLD,
                                          vocab_start=start, filter_eps=None)
    assert logprobs[bad].isnan().all() and not logprobs[~bad].isnan().any()


@pytest.mark.parametrize("world", [2, 3])
def test_targets_that_differ_between_ranks_give_nan(world):
    run_ranks(world, _target_mismatch_worker)


def test_vocab_range_even_split():
    assert [vocab_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [vocab_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="rank"):
        vocab_range(10, 3, 3)


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_nccl_matches_single_device(world):
    if _gpus() < world:
        pytest.skip(f"needs {world} GPUs")
    run_ranks(world, _parity_worker, None, "cuda", backend="nccl")


def _filter_worker(rank, world):
    """With shard boundaries on the tile grid, the sharded filtered gradients equal the
    single-device filtered ones: every rank filters its tiles with the global LSE."""
    group = dist.group.WORLD
    noise, c_full, t = _data(3, 6, 4, 16, 64)
    t = t % 16  # targets in the first tile, and each token near its target's row:
    e_full = 4 * c_full[t] + 0.1 * noise  # some tiles negligible (4 of 8 here), some not
    lo, hi = 32 * rank, 32 * (rank + 1)  # multiples of the interpreter's 16-row tiles
    eps = 0.05
    e = e_full.clone().requires_grad_()
    c = c_full[lo:hi].clone().requires_grad_()
    loss = linear_cross_entropy(e, c, t, group=group, filter_eps=eps, backend="triton")
    loss.backward()
    e1, c1 = e_full.clone().requires_grad_(), c_full.clone().requires_grad_()
    single = linear_cross_entropy(e1, c1, t, filter_eps=eps, backend="triton")
    single.backward()
    assert torch.allclose(loss, single, rtol=1e-5), (loss, single)
    errs = (_rel(e.grad, e1.grad), _rel(c.grad, c1.grad[lo:hi]))
    assert errs[0] < 1e-4 and errs[1] < 1e-5, errs  # de: fp32 sums in another order
    # ... and filtering did drop something here (else this test would prove nothing).
    c2 = c_full.clone().requires_grad_()
    linear_cross_entropy(e_full, c2, t, filter_eps=None, backend="triton").backward()
    assert not torch.allclose(c1.grad, c2.grad, rtol=0, atol=1e-7)


def test_filtering_uses_the_global_lse():
    run_ranks(2, _filter_worker)


def _shard_change_worker(rank, world):
    """Calls of one shape whose shards change between calls (two heads of different splits on
    one group). Found by the fuzz: the layout cache was keyed by each rank's own shard, so a rank
    whose shard changed gathered the layout alone while the others went on to the forward's
    all-gather (gloo: "Received data size doesn't match expected size")."""
    import os

    from cce_dist.parallel import consistency

    group = dist.group.WORLD
    v, d = 12, 8
    g = torch.Generator().manual_seed(0)
    e, c_full = torch.randn(6, d, generator=g), torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (6,), generator=g)
    want = F.cross_entropy(e.double() @ c_full.double().T, t)

    def loss_with(sizes):
        start = sum(sizes[:rank])
        return linear_cross_entropy(e, c_full[start:start + sizes[rank]], t, group=group)

    first, changed = ([0, 12], [12, 0]) if world == 2 else ([0, 5, 7], [2, 6, 4])
    consistency._cache.clear()
    assert _rel(loss_with(first), want) < 1e-5
    # Every rank's shard changes: every rank raises, before any collective.
    with pytest.raises(ValueError, match="shard .* changed"):
        loss_with(changed)
    # With CCE_DIST_DEBUG=1 the layout is checked on every call, so shards may change freely,
    # on some ranks only too.
    os.environ["CCE_DIST_DEBUG"] = "1"
    try:
        for sizes in ([4, 8], [4, 8], [5, 7], [12, 0], [4, 8]) if world == 2 else \
                ([0, 5, 7], [0, 6, 6], [1, 5, 6], [0, 5, 7]):
            assert _rel(loss_with(sizes), want) < 1e-5, sizes
    finally:
        del os.environ["CCE_DIST_DEBUG"]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_that_change_between_calls_of_one_shape(world):
    run_ranks(world, _shard_change_worker)
