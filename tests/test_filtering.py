"""The default gradient filter is safe by construction: what it skips is bounded per token and
per vocabulary row, a near-uniform softmax loses nothing, and training from initialization
follows exact mode where the per-entry threshold does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from cce_dist import linear_cross_entropy
from cce_dist.kernels.filtering import GradFilter, budget_skips, keep_tiles
from cce_dist.testing import make_inputs
from distributed import run_ranks
from helpers import rel_err


def _tile_masses(e, c, lo, hi, block_n, block_v):
    """For the shard c[lo:hi]: float64 (N, v_tiles) probability mass (of the softmax over all
    of c) of every token in every vocabulary tile, and the per-tile maxima the forward
    records."""
    z = e.double() @ c.double().T
    p = torch.softmax(z, dim=1)[:, lo:hi]
    z = z[:, lo:hi]
    n, v = z.shape
    vt = -(-v // block_v)
    mass = F.pad(p, (0, vt * block_v - v)).view(n, vt, block_v).sum(2)
    nt = -(-n // block_n)
    zp = F.pad(z, (0, vt * block_v - v, 0, nt * block_n - n), value=-math.inf)
    return mass, zp.view(nt, block_n, vt, block_v).amax(dim=(1, 3)).float()


@pytest.mark.parametrize("regime", ["lm", "zipf", "spread"])
@pytest.mark.parametrize("budget", [2.0**-10, 2.0**-4, 0.5])
@pytest.mark.parametrize("shards", [1, 3])
def test_skipped_mass_is_within_budget(regime, budget, shards):
    """Per token, the true mass of the skipped tiles of all shards together is at most the
    budget; per vocabulary tile, the mass skipped over all tokens is at most the budget times
    what a uniform softmax would put there. Checked against float64 masses."""
    bn, bv = 16, 32
    e, c, _ = make_inputs(regime, 96, 128, 1000, dtype=torch.float32, seed=2)
    e = e * 4  # more peaked, so that large budgets do skip
    n, v = e.shape[0], c.shape[0]
    cuts = [round(i * v / shards) for i in range(shards + 1)]
    per_token = torch.zeros(n, dtype=torch.float64)
    skipped_any = False
    for a, b in zip(cuts, cuts[1:]):
        mass, tile_max = _tile_masses(e, c, a, b, bn, bv)
        lse = torch.logsumexp(e.double() @ c.double().T, dim=1).float()
        skip = budget_skips(tile_max, lse, bn, bv, b - a, v, budget)
        skipped_any |= bool(skip.any())
        rows = skip.repeat_interleave(bn, 0)[:n]  # (N, v_tiles): tile skipped for this token
        dropped = torch.where(rows, mass, 0.0)
        per_token += dropped.sum(1)
        width = (b - a - torch.arange(skip.shape[1]) * bv).clamp(max=bv)
        per_column = dropped.sum(0)
        assert torch.all(per_column <= budget * n * width / v * (1 + 1e-5)), regime
    assert torch.all(per_token <= budget * (1 + 1e-5)), (regime, float(per_token.max()))
    if budget == 0.5:
        assert skipped_any, "a generous budget must skip something on peaked data"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_near_uniform_softmax_skips_nothing(backend):
    """A near-uniform softmax whose probabilities (~1/V) are all below a per-entry threshold:
    the default keeps every tile (gradients equal to exact mode's, bit for bit), where that
    threshold drops the softmax term of every row that is no token's target."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 8, 16, 400  # 1/V = 2.5e-3 < 2^-8; most tiles hold no target
    e = (0.05 * torch.randn(n, d, generator=g)).to(torch.bfloat16).requires_grad_()
    c = (0.05 * torch.randn(v, d, generator=g)).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)

    def grads(filter_eps):
        loss = linear_cross_entropy(e, c, t, filter_eps=filter_eps, backend=backend)
        return torch.autograd.grad(loss, (e, c))

    exact, auto = grads(None), grads("auto")
    assert torch.equal(auto[0], exact[0]) and torch.equal(auto[1], exact[1])
    entry = grads(2.0**-8)
    others = torch.ones(v, dtype=torch.bool)
    others[t] = False
    assert torch.all(exact[1][others].abs().amax(1) > 0)
    # The per-entry threshold pushes most of them down not at all (all of them, element-wise):
    # the failure seen in training.
    assert (entry[1][others].abs().amax(1) == 0).float().mean() > 0.6


def test_default_filter_tile_semantics_on_the_triton_path():
    """The Triton backward drops exactly the tiles that keep_tiles() rejects (pooled onto the
    backward's taller tiles) and that hold no target: grads equal float64 grads with those tiles
    zeroed."""
    from cce_dist.kernels import triton_backward, triton_forward
    from cce_dist.kernels.tiles import backward_config, default_config

    cfg = default_config(torch.device("cpu"))
    e, c, t = make_inputs("zipf", 80, 64, 700, dtype=torch.float32, seed=3)
    n, v = e.shape[0], c.shape[0]
    budget = 50.0  # far beyond any real one: the dropped tiles hold mass a test can see
    lse, _, tile_max = triton_forward.forward(e, c, t, 0, cfg)[:3]
    lse_full = torch.logsumexp(e.double() @ c.double().T, dim=1).float()
    keep = keep_tiles(tile_max, lse_full, cfg.block_n, cfg.block_v, v, v,
                      GradFilter("budget", budget)).bool()
    bn = backward_config(cfg, False).block_n
    r = bn // cfg.block_n
    keep = F.pad(keep, (0, 0, 0, -keep.shape[0] % r)).view(-1, r, keep.shape[1]).any(1)
    hit = torch.zeros_like(keep)
    hit[torch.arange(n) // bn, t // cfg.block_v] = True
    keep |= hit
    assert 0 < keep.float().mean() < 1, "the data must exercise both kinds of tile"
    mask = keep.repeat_interleave(bn, 0).repeat_interleave(cfg.block_v, 1)[:n, :v]
    with torch.no_grad():
        g = torch.softmax(e.double() @ c.double().T, dim=1)
        g[torch.arange(n), t] -= 1.0
        full = g.clone()
        g = torch.where(mask, g, 0.0)
    assert rel_err(g @ c.double(), full @ c.double()) > 1e-2
    de, dc = triton_backward.backward(e, c, t, lse_full, torch.ones(n), 0,
                                      GradFilter("budget", budget), tile_max, cfg)
    assert rel_err(de, g @ c.double()) < 1e-5 and rel_err(dc, g.T @ e.double()) < 1e-5


@pytest.mark.parametrize("regime", ["dense", "lm", "spread", "zipf"])
def test_default_filter_error_at_most_twice_eager(regime, backend):
    """On every regime, the default's dE and dC errors against float64 are at most twice those
    of eager PyTorch (bf16 logits, fp32 softmax) on the same bf16 inputs."""
    e, c, t = make_inputs(regime, 128, 64, 700, dtype=torch.bfloat16, seed=4)
    e.requires_grad_(), c.requires_grad_()
    e64, c64 = e.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    F.cross_entropy(e64 @ c64.T, t).backward()
    eager = torch.autograd.grad(F.cross_entropy((e @ c.T).float(), t), (e, c))
    auto = torch.autograd.grad(linear_cross_entropy(e, c, t, backend=backend), (e, c))
    for got, want, ref in zip(auto, eager, (e64.grad, c64.grad)):
        assert rel_err(got, ref) <= 2 * rel_err(want, ref), regime


V_TRAIN, D_TRAIN, N_TRAIN, STEPS_TRAIN = 8192, 32, 128, 60


def _train_worker(rank, world, results):
    """A bf16 vocabulary-parallel head over gloo (tp=2), trained with Adam from initialization
    on random tokens (a near-uniform softmax): the loss per step for each filter."""
    torch.manual_seed(0)
    full = (torch.randn(V_TRAIN, D_TRAIN) * 0.02).to(torch.bfloat16)
    lo, hi = rank * V_TRAIN // world, (rank + 1) * V_TRAIN // world
    for name, filter_eps in (("exact", None), ("auto", "auto"), ("entry", 2.0**-12)):
        g = torch.Generator().manual_seed(1)
        hidden = torch.nn.Parameter(torch.randn(N_TRAIN, D_TRAIN, generator=g)
                                    .to(torch.bfloat16))
        head = torch.nn.Parameter(full[lo:hi].clone())
        opt = torch.optim.Adam([hidden, head], lr=2e-2)
        losses = []
        for step in range(STEPS_TRAIN):
            t = torch.randint(0, V_TRAIN, (N_TRAIN,), generator=g)
            loss = linear_cross_entropy(hidden, head, t, filter_eps=filter_eps,
                                        group=torch.distributed.group.WORLD,
                                        backend="reference")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if rank == 0:
            results[name] = losses


def test_training_from_initialization_follows_exact_mode():
    """The default's loss trajectory equals exact mode's; the per-entry threshold (2^-12, the
    old default for bf16) drops every non-target tile at 1/V = 1.2e-4 and visibly departs."""
    import multiprocessing

    with multiprocessing.Manager() as manager:
        results = manager.dict()
        run_ranks(2, _train_worker, results)
        runs = dict(results)
    exact, auto, entry = runs["exact"], runs["auto"], runs["entry"]
    assert max(abs(a - b) for a, b in zip(auto, exact)) < 1e-4, (auto, exact)
    assert max(abs(a - b) for a, b in zip(entry, exact)) > 0.1, (entry, exact)
