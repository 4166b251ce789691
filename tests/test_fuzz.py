"""Differential fuzzing of the loss: Triton kernels (interpreted), the PyTorch reference and
float64 torch on the same generated calls.

Hypothesis draws the sizes (N from 0, D and V from 1, V below, at and off the tile sizes), the
layout of every input (transposed, sliced, row-strided, expanded, batched 3-D, the last-token
slice of reward heads), the dtype, where targets are ignored, the reduction, and the filter.
Every Triton launch runs under :func:`memcheck.checked_memory`, so an out-of-bounds load or store
fails the example even when it would not change the numbers.

CI runs a bounded, derandomized set (``CCE_DIST_FUZZ_EXAMPLES``, default 40 per test); set it
higher for a longer search. The same suite runs at larger shapes on a GPU (``gpu`` marker).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cce_dist import linear_cross_entropy
from cce_dist.kernels import cce_backward, cce_forward
from helpers import float64_oracle, rel_err
from memcheck import checked_memory

EXAMPLES = int(os.environ.get("CCE_DIST_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # CCE_DIST_FUZZ_NO_SHRINK=1 reports the first failure as found (mutation runs).
    phases=[p for p in Phase if p != Phase.shrink or not os.environ.get("CCE_DIST_FUZZ_NO_SHRINK")],
)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Relative L2 error allowed against float64 on the same (rounded) inputs: the loss is
# accumulated in fp32 whatever the input dtype; gradients are rounded to the input dtype.
LOSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.5e-2,
            torch.float16: 2e-3}
E_LAYOUTS = ("contiguous", "transposed", "sliced", "row_step", "expanded", "batched",
             "batched_seq_first", "last_token")
C_LAYOUTS = ("contiguous", "transposed", "sliced", "row_step", "expanded")
T_LAYOUTS = ("contiguous", "strided", "expanded")


@dataclass
class Leaf:
    """A differentiable leaf in some storage layout and the view of it the loss receives."""

    leaf: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor]


def _e_layout(kind: str, n: int, d: int, dtype, g) -> tuple[Leaf, tuple[int, ...]]:
    """Embeddings in ``kind``'s layout; returns the leaf and the leading shape of the view."""
    randn = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if kind == "transposed":
        return Leaf(randn(d, n), lambda x: x.T), (n,)
    if kind == "sliced":
        return Leaf(randn(n, d + 3), lambda x: x[:, 1:d + 1]), (n,)
    if kind == "row_step":
        return Leaf(randn(2 * n + 1, d), lambda x: x[1::2]), (n,)
    if kind == "expanded":
        return Leaf(randn(1, d), lambda x: x.expand(n, d)), (n,)
    if kind in ("batched", "batched_seq_first", "last_token") and n % 2 == 0 and n > 0:
        b, s = 2, n // 2
        if kind == "batched":
            return Leaf(randn(b, s, d), lambda x: x), (b, s)
        if kind == "batched_seq_first":  # Megatron's [s, b, h], seen batch-first
            return Leaf(randn(s, b, d), lambda x: x.transpose(0, 1)), (b, s)
        # hidden[:, -1:] of (n, 3, d): the last-token loss of reward / classification heads
        return Leaf(randn(n, 3, d), lambda x: x[:, -1:]), (n, 1)
    return Leaf(randn(n, d), lambda x: x), (n,)


def _c_layout(kind: str, v: int, d: int, dtype, g) -> Leaf:
    randn = lambda *s: (torch.randn(*s, generator=g) * 2 / (d ** 0.5)).to(dtype)  # noqa: E731
    if kind == "transposed":
        return Leaf(randn(d, v), lambda x: x.T)
    if kind == "sliced":
        return Leaf(randn(v, d + 2), lambda x: x[:, :d])
    if kind == "row_step":
        return Leaf(randn(2 * v, d), lambda x: x[::2])
    if kind == "expanded":
        return Leaf(randn(1, d), lambda x: x.expand(v, d))
    return Leaf(randn(v, d), lambda x: x)


def _targets(kind: str, lead: tuple[int, ...], v: int, ignore: str, g) -> torch.Tensor:
    n = 1
    for s in lead:
        n *= s
    if kind == "expanded":
        t = torch.randint(0, v, (1,), generator=g).expand(n)
    elif kind == "strided":
        t = torch.randint(0, v, (2 * n,), generator=g)[::2]
    else:
        t = torch.randint(0, v, (n,), generator=g)
    if ignore == "all":
        t = torch.full_like(t, -100)
    elif ignore == "random":
        t = torch.where(torch.rand(n, generator=g) < 0.4, -100, t)
    if kind == "expanded" and ignore != "none":
        t = t[:1].expand(n)  # keep the layout: all or nothing ignored
    if len(lead) == 2 and kind == "strided":
        return t.reshape(lead[1], lead[0]).T  # strided 2-D as well
    return t.reshape(lead)


def _check_call(dtype, n, d, v, e_kind, c_kind, t_kind, ignore, reduction, filter_eps, seed,
                device="cpu"):
    g = torch.Generator().manual_seed(seed)
    e_in, lead = _e_layout(e_kind, n, d, dtype, g)
    c_in = _c_layout(c_kind, v, d, dtype, g)
    t = _targets(t_kind, lead, v, ignore, g)
    want_loss, want_views, want_leaves, mags = float64_oracle(e_in, c_in, t, reduction=reduction)
    backends = ("reference",) if dtype == torch.float64 else ("triton", "reference")
    t = t.to(device)
    for backend in backends:
        e = e_in.leaf.to(device, copy=True).requires_grad_()
        c = c_in.leaf.to(device, copy=True).requires_grad_()
        views = e_in.view(e), c_in.view(c)
        for x in views:
            x.retain_grad()
        with checked_memory():
            loss = linear_cross_entropy(*views, t, reduction=reduction, filter_eps=filter_eps,
                                        backend=backend)
            loss.sum().backward()
        what = f"{backend} {dtype} N={n} D={d} V={v} e:{e_kind} c:{c_kind} t:{t_kind} " \
               f"ignore:{ignore} {reduction} filter:{filter_eps}"
        assert loss.shape == want_loss.shape, what
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
        assert torch.isfinite(loss).all(), what
        assert e.grad.dtype == dtype and c.grad.dtype == dtype, what
        assert torch.isfinite(e.grad).all() and torch.isfinite(c.grad).all(), what
        loss_err = float((loss.detach().double().cpu() - want_loss).norm()) / max(
            float(want_loss.norm()), mags[0], 1e-30)
        assert loss_err <= LOSS_TOL[dtype], (what, loss_err)
        # Evaluation: the forward that makes no dE (on the gemm engine, its fused kernel where
        # the operands allow) gives the same loss.
        with torch.no_grad(), checked_memory():
            evaluated = linear_cross_entropy(e_in.view(e.detach()), c_in.view(c.detach()), t,
                                             reduction=reduction, filter_eps=filter_eps,
                                             backend=backend)
        eval_err = float((evaluated.double().cpu() - want_loss).norm()) / max(
            float(want_loss.norm()), mags[0], 1e-30)
        assert eval_err <= LOSS_TOL[dtype], (what, "no_grad", eval_err)
        tol = GRAD_TOL[dtype] * (1 if filter_eps is None else 2)
        for name, view, leaf, want_view, want_leaf, mag in zip(
            ("dE", "dC"), views, (e, c), want_views, want_leaves, mags[1:]
        ):
            # The loss's own gradient (of the view), then what torch accumulated into the leaf.
            # Errors are relative to the gradient, or to the size of its terms where they cancel
            # (identical rows of c, an expanded view summing rows, ...).
            for got, want in ((view.grad, want_view), (leaf.grad, want_leaf)):
                scale = max(float(want.norm()), mag, 1e-30)
                err = float((got.double().cpu() - want).norm()) / scale
                assert err <= tol, (what, name, err)


SIZES = st.tuples(
    st.integers(0, 40) | st.sampled_from([0, 1, 16, 17, 32]),     # N (interpreter tiles: 16)
    st.integers(1, 40) | st.sampled_from([1, 16, 17]),           # D
    st.integers(1, 150) | st.sampled_from([1, 15, 16, 17, 64, 65]),  # V (chunks: 48 / 64)
)


@FUZZ
@given(
    dtype=st.sampled_from(DTYPES), size=SIZES, e_kind=st.sampled_from(E_LAYOUTS),
    c_kind=st.sampled_from(C_LAYOUTS), t_kind=st.sampled_from(T_LAYOUTS),
    ignore=st.sampled_from(("none", "all", "random")),
    reduction=st.sampled_from(("mean", "sum", "none")), filter_eps=st.sampled_from((None, "auto")),
    seed=st.integers(0, 2**16),
)
def test_fuzz_loss_and_gradients(dtype, size, e_kind, c_kind, t_kind, ignore, reduction,
                                 filter_eps, seed):
    _check_call(dtype, *size, e_kind, c_kind, t_kind, ignore, reduction, filter_eps, seed)


@FUZZ
@given(
    dtype=st.sampled_from(DTYPES[:3]), n=st.integers(0, 40), d=st.integers(1, 24),
    cuts=st.lists(st.integers(0, 90), min_size=1, max_size=4), v=st.integers(1, 90),
    filter_eps=st.sampled_from((None, "auto")), seed=st.integers(0, 2**16),
)
def test_fuzz_vocabulary_shards_at_kernel_level(dtype, n, d, cuts, v, filter_eps, seed):
    """The kernels on uneven vocabulary shards (``vocab_start``; empty and one-row shards
    included), merged as the vocabulary-parallel op merges them, equal the unsharded float64
    result; on both backends, under the bounds check."""
    from cce_dist.validation import default_filter_eps

    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    bounds = [0, *sorted(min(x, v) for x in cuts), v]
    eps = default_filter_eps(dtype) if filter_eps == "auto" else None
    scale = torch.rand(n, generator=g)
    logits = e.double() @ c.double().T
    want_lse = torch.logsumexp(logits, dim=1)
    dl = (torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(t, v).double()) \
        * scale.double()[:, None]
    for backend in ("triton", "reference"):
        with checked_memory():
            parts = [cce_forward(e, c[a:b], t, a, backend) for a, b in zip(bounds, bounds[1:])]
            lse = torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0)
            tgt = sum(p[1] for p in parts)
            grads = [cce_backward(e, c[a:b], t, lse, scale, p[2], a, eps, backend)
                     for (a, b), p in zip(zip(bounds, bounds[1:]), parts)]
        what = f"{backend} {dtype} N={n} D={d} bounds={bounds} filter={eps}"
        assert rel_err(lse, want_lse) <= 1e-5, what
        assert rel_err(tgt, logits.gather(1, t[:, None])[:, 0]) <= 1e-5, what
        tol = GRAD_TOL[dtype] * (1 if eps is None else 2)
        assert rel_err(sum(gr[0] for gr in grads), dl @ c.double()) <= tol, what
        assert rel_err(torch.cat([gr[1] for gr in grads]), dl.T @ e.double()) <= tol, what


@pytest.mark.gpu
@settings(FUZZ, max_examples=max(EXAMPLES, 60))
@given(
    dtype=st.sampled_from(DTYPES[:3]),
    size=st.tuples(st.integers(0, 300), st.integers(1, 300), st.integers(1, 5000)),
    e_kind=st.sampled_from(E_LAYOUTS), c_kind=st.sampled_from(C_LAYOUTS),
    t_kind=st.sampled_from(T_LAYOUTS), ignore=st.sampled_from(("none", "all", "random")),
    reduction=st.sampled_from(("mean", "sum", "none")), filter_eps=st.sampled_from((None, "auto")),
    seed=st.integers(0, 2**16), de_in_forward=st.sampled_from(("lent", "always")),
)
def test_fuzz_loss_and_gradients_gpu(dtype, size, e_kind, c_kind, t_kind, ignore, reduction,
                                     filter_eps, seed, de_in_forward):
    """The same differential check with the kernels compiled for the GPU, at larger shapes
    (several of the GPU's 64 x 128 tiles and 4096-row chunks); dE made in the forward at every
    shape too (by default it is only where the backward would lend rows, larger than these)."""
    from dataclasses import replace
    from unittest import mock

    from cce_dist.kernels import tiles

    config = replace(tiles.GPU_CONFIG, gemm_de_in_forward=de_in_forward)
    with mock.patch.object(tiles, "GPU_CONFIG", config), \
            mock.patch.object(tiles, "GPU_FP32_CONFIG",
                              replace(tiles.GPU_FP32_CONFIG, gemm_de_in_forward=de_in_forward)):
        _check_call(dtype, *size, e_kind, c_kind, t_kind, ignore, reduction, filter_eps, seed,
                    device="cuda")


def test_reported_strided_targets():
    """The reported cases: t[::2], an expanded target, and labels[:, -1:] with hidden (B, 1, D)
    give F.cross_entropy's loss and gradients on the Triton path."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(64, 32, generator=g)
    c = 0.1 * torch.randn(1000, 32, generator=g)
    for t in (torch.randint(0, 1000, (128,), generator=g)[::2], torch.tensor([5]).expand(64)):
        got = linear_cross_entropy(e, c, t, backend="triton")
        assert rel_err(got, torch.nn.functional.cross_entropy(e.double() @ c.double().T, t)) < 1e-6
    hidden = torch.randn(4, 7, 32, generator=g)
    labels = torch.randint(0, 1000, (4, 7), generator=g)
    got = linear_cross_entropy(hidden[:, -1:], c, labels[:, -1:], backend="triton")
    want = torch.nn.functional.cross_entropy(hidden[:, -1].double() @ c.double().T, labels[:, -1])
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend_", ["triton", "reference"])
def test_empty_batch_gives_exact_zero_gradients(backend_):
    """N = 0: dC is exactly zero, never uninitialized memory, and the loss is 0 (mean / sum)."""
    for v in (1, 40, 400):
        c = torch.full((v, 8), float("nan")).normal_().requires_grad_()
        e = torch.randn(0, 8, requires_grad=True)
        loss = linear_cross_entropy(e, c, torch.zeros(0, dtype=torch.long), backend=backend_)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(c.grad, torch.zeros_like(c)) and e.grad.shape == (0, 8)


def test_second_derivatives_and_functorch_raise_clear_errors():
    e = torch.randn(6, 8, requires_grad=True)
    c = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (6,))
    (ge,) = torch.autograd.grad(linear_cross_entropy(e, c, t), (e,), create_graph=True)
    with pytest.raises(RuntimeError, match="does not support second derivatives"):
        ge.sum().backward()
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        torch.func.grad(lambda x: linear_cross_entropy(x, c, t))(e)
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        torch.func.vmap(lambda x: linear_cross_entropy(x, c, t[:1]))(e[:, None])


def _random_vp_cases(world: int, count: int, seed: int) -> list[dict]:
    """Random vocabulary-parallel calls: uneven shards (empty and one-row ones included), sequence
    parallel on and off, every reduction, ignore patterns (all of one rank's slice, all but one
    token, random), both backends, fp32 and bf16, exact and default filter, explicit or derived
    vocab_start. The same list on every rank (seeded)."""
    import random

    rng = random.Random(seed)
    cases = []
    for i in range(count):
        v = rng.randint(world, 90)
        cuts = sorted(rng.randint(0, v) for _ in range(world - 1))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, v])]
        cases.append(dict(
            seed=seed * 1000 + i, s=world * rng.randint(1, 4), b=rng.randint(1, 3),
            d=rng.randint(1, 24), sizes=sizes, sp=rng.random() < 0.5,
            reduction=rng.choice(("mean", "sum", "none")),
            backend=rng.choice(("triton", "reference")),
            ignore=rng.choice((None, "random", "first_slice", "one_valid")),
            dtype=rng.choice((torch.float32, torch.bfloat16)),
            filter_eps=rng.choice((None, "auto")), explicit_start=rng.random() < 0.3,
        ))
    return cases


def _vp_fuzz_worker(rank, world, count, seed):
    import torch.distributed as dist

    from test_vocab_parallel import _check_case

    from cce_dist.parallel import consistency

    group = dist.group.WORLD
    for case in _random_vp_cases(world, count, seed):
        # Each case is a new model whose shards may differ from the last one's on some ranks
        # only: its own first call (see test_vocab_parallel's shard-change tests).
        consistency._cache.clear()
        with checked_memory():
            _check_case(group, case)
    # An empty batch on every rank: zero loss and gradients, no rank left waiting.
    c = torch.randn(5, 8, requires_grad=True)
    loss = linear_cross_entropy(torch.randn(0, 8, requires_grad=True), c,
                                torch.zeros(0, dtype=torch.long), group=group)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(c.grad, torch.zeros_like(c))


@pytest.mark.parametrize("world", [2, 3])
def test_fuzz_vocabulary_parallel_over_gloo(world):
    """The vocabulary-parallel op against the single-device float64 oracle on random calls,
    every interpreted launch bounds-checked (see _random_vp_cases)."""
    from distributed import run_ranks

    run_ranks(world, _vp_fuzz_worker, max(8, EXAMPLES // 3), world)


@FUZZ
@given(
    engine=st.sampled_from(("gemm", "fused")), dtype=st.sampled_from(DTYPES[:2]),
    n=st.integers(1, 96), d=st.integers(1, 24), v=st.integers(1, 400),
    chunk=st.sampled_from((16, 32, 48, 64)), fw_chunk=st.sampled_from((16, 32, 48)),
    cols=st.sampled_from((16, 32, 64)), stats_n=st.sampled_from((8, 16)),
    tail_bytes=st.sampled_from((1, 4096, 1 << 20)), lend=st.sampled_from((0.0, 0.25, 1.0)),
    filter_eps=st.sampled_from((None, "auto")), seed=st.integers(0, 2**16),
    layout=st.sampled_from(("contiguous", "padded rows", "offset start")),
    fused_fw=st.sampled_from(("stats", "always")),
)
def test_fuzz_engine_plans(engine, dtype, n, d, v, chunk, fw_chunk, cols, stats_n, tail_bytes,
                           lend, filter_eps, seed, layout, fused_fw):
    """Each engine under random chunk sizes, column groups and workspace plans (dC's rows lent
    or not, nested buffers for the lent rows, tail chunks of one tile): forward statistics and
    gradients equal float64, under the bounds check. The CI shapes above rarely reach these
    plans (a mutation that overlapped the nested buffers passed them). e and c come
    contiguous, in rows padded to a 16-byte stride, or one element into their storage (which
    decide whether the backward's TMA kernel may load them: a D of 33 in padded rows once
    crashed it). The gemm engine's forward also makes dE (``finish_de`` against float64), its
    fused kernel only without dE or always (``gemm_fused_fw``)."""
    from dataclasses import replace

    from cce_dist.kernels import gemm_engine, triton_backward, triton_forward
    from cce_dist.kernels.filtering import GradFilter, decode_filter, default_budget
    from cce_dist.kernels.tiles import default_config

    cfg = replace(default_config(torch.device("cpu")), gemm_chunk_v=chunk,
                  gemm_fw_chunk_v=fw_chunk, gemm_stats_cols=cols, gemm_stats_n=stats_n,
                  gemm_tail_bytes=tail_bytes,
                  max_lent_fraction=lend, lent_chunk_v=chunk, chunk_v=chunk + 16,
                  tail_chunk_v=max(16, chunk // 2), gemm_fused_fw=fused_fw)
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype)
    if layout == "padded rows":
        row = -(-d * e.element_size() // 16) * 16 // e.element_size()
        e = torch.zeros(n, row, dtype=dtype)[:, :d].copy_(e)
        c = torch.zeros(v, row, dtype=dtype)[:, :d].copy_(c)
    elif layout == "offset start":
        e = torch.zeros(n * d + 1, dtype=dtype)[1:].view(n, d).copy_(e)
        c = torch.zeros(v * d + 1, dtype=dtype)[1:].view(v, d).copy_(c)
    t = torch.randint(0, v, (n,), generator=g)
    scale = torch.rand(n, generator=g)
    forward = gemm_engine.forward if engine == "gemm" else triton_forward.forward
    backward = gemm_engine.backward if engine == "gemm" else triton_backward.backward
    code = None
    if filter_eps == "auto":
        code = GradFilter("budget", default_budget(dtype)).encode()
    logits = e.double() @ c.double().T
    dl = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(t, v).double()) \
        * scale.double()[:, None]
    with checked_memory():
        lse, tgt, tile_max, _ = forward(e, c, t, 0, cfg)
        de, dc = backward(e, c, t, lse, scale, 0, decode_filter(code), tile_max, cfg)
    what = (f"{engine} {dtype} N={n} D={d} V={v} chunk={chunk} lend={lend} tail={tail_bytes} "
            f"{layout} fused_fw={fused_fw}")
    assert rel_err(lse, torch.logsumexp(logits, 1)) <= 1e-5, what
    assert rel_err(tgt, logits.gather(1, t[:, None])[:, 0]) <= 1e-5, what
    tol = GRAD_TOL[dtype] * (1 if code is None else 2)
    assert rel_err(de, dl @ c.double()) <= tol, what
    assert rel_err(dc, dl.T @ e.double()) <= tol, what
    if engine == "gemm":  # dE made in the forward
        with checked_memory():
            out = gemm_engine.forward(e, c, t, 0, cfg, with_de=True)
            de = gemm_engine.finish_de(*out[4:], out[0], out[1], scale, t, c, 0, cfg,
                                       torch.float32)
        assert rel_err(out[0], torch.logsumexp(logits, 1)) <= 1e-5, what
        assert rel_err(de, dl @ c.double()) <= GRAD_TOL[dtype], what
