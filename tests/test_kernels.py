"""Kernel-level behaviour: vocabulary shards addressed by global ids, and gradient filtering."""

import pytest
import torch

from cce_dist import linear_cross_entropy
from cce_dist.kernels import cce_backward, cce_forward
from cce_dist.testing import make_inputs
from helpers import float64_reference, rel_err


def _full(e, c, t):
    return cce_forward(e, c, t, 0, "reference")


def test_shards_combine_to_the_full_vocabulary(backend):
    """Per-shard LSE / target logits with vocab_start, merged, equal the unsharded ones."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 41, 24, 97
    e, c = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[0], t[1] = 0, v - 1
    bounds = [0, 30, 31, 64, 97]  # uneven, one shard of a single row
    parts = [cce_forward(e, c[a:b], t, a, backend) for a, b in zip(bounds, bounds[1:])]
    lse = torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0)
    tgt = sum(p[1] for p in parts)
    ref_lse, ref_tgt = _full(e.double(), c.double(), t)[:2]
    assert rel_err(lse, ref_lse) < 1e-6 and rel_err(tgt, ref_tgt) < 1e-6
    # A target outside the shard contributes nothing.
    for (a, b), p in zip(zip(bounds, bounds[1:]), parts):
        outside = (t < a) | (t >= b)
        assert torch.all(p[1][outside] == 0)

    scale = torch.rand(n, generator=g)
    ref_de, ref_dc, _ = cce_backward(
        e.double(), c.double(), t, ref_lse, scale.double(), torch.empty(0, 0), 0, None,
        "reference",
    )
    des, dcs = [], []
    for (a, b), p in zip(zip(bounds, bounds[1:]), parts):
        de, dc, _ = cce_backward(e, c[a:b], t, lse, scale, p[2], a, None, backend)
        des.append(de)
        dcs.append(dc)
    assert rel_err(sum(des), ref_de) < 1e-5
    assert rel_err(torch.cat(dcs), ref_dc) < 1e-5


def _peaked(n=64, d=32, v=2000, seed=0):
    """Each token's softmax is concentrated on a few rows, so most tiles are negligible."""
    e, c, t = make_inputs("lm", n, d, v, dtype=torch.float32, seed=seed)
    return (e * 3).requires_grad_(), c.requires_grad_(), t


def test_filtering_drops_tiles_and_stays_close():
    e, c, t = _peaked()
    exact = torch.autograd.grad(linear_cross_entropy(e, c, t, filter_eps=None), (e, c))
    filtered = torch.autograd.grad(linear_cross_entropy(e, c, t, filter_eps=1e-3), (e, c))
    _, ref_de, ref_dc = float64_reference(e, c, t)
    # Filtering really changed something, and stayed close to the truth.
    assert not torch.equal(exact[1], filtered[1])
    assert rel_err(filtered[0], ref_de) < 2e-2 and rel_err(filtered[1], ref_dc) < 2e-2


@pytest.mark.parametrize("eps", [1e-3, 0.2])
def test_filtering_has_exact_tile_semantics(eps):
    """Filtered grads equal float64 grads in which every (block_n x block_v) tile whose
    |softmax - onehot| stays under eps is dropped whole, and every other tile is kept whole."""
    from cce_dist.kernels.tiles import default_config

    e, c, t = _peaked(n=40, v=300)
    cfg = default_config(e.device)
    n, v = e.shape[0], c.shape[0]
    with torch.no_grad():
        g = torch.softmax(e.double() @ c.double().T, dim=1)
        g[torch.arange(n), t] -= 1.0
        keep = torch.zeros_like(g, dtype=torch.bool)
        for i in range(0, n, cfg.block_n):
            for j in range(0, v, cfg.block_v):
                tile = g[i:i + cfg.block_n, j:j + cfg.block_v]
                keep[i:i + cfg.block_n, j:j + cfg.block_v] = tile.abs().max() >= eps
        assert 0 < keep.float().mean() < 1, "the data must exercise both kinds of tile"
        g = torch.where(keep, g, 0.0) / n
        want_de, want_dc = g @ c.double(), g.T @ e.double()
    loss = linear_cross_entropy(e, c, t, filter_eps=eps)
    de, dc = torch.autograd.grad(loss, (e, c))
    assert rel_err(de, want_de) < 1e-5 and rel_err(dc, want_dc) < 1e-5


@pytest.mark.parametrize("fw_block_n,fw_block_v", [(16, 16), (32, 16), (16, 64), (32, 32)])
def test_forward_records_each_tiles_largest_logit(fw_block_n, fw_block_v):
    """Whatever block the forward walks, tile_max[i, j] is the largest logit of the
    (block_n x block_v) tile (i, j), edge tiles included; LSE and target logits are unchanged."""
    from dataclasses import replace

    from cce_dist.kernels import triton_forward
    from cce_dist.kernels.tiles import default_config

    cfg = replace(default_config(torch.device("cpu")), fw_block_n=fw_block_n,
                  fw_block_v=fw_block_v)
    n, d, v, start = 37, 24, 90, 40
    e, c, t = make_inputs("lm", n, d, v + start, dtype=torch.float32, seed=7)
    c = c[start:]
    lse, tgt, tile_max = triton_forward.forward(e, c, t, start, cfg)[:3]
    logits = e.double() @ c.double().T
    bn, bv = cfg.block_n, cfg.block_v
    want = torch.stack([
        torch.stack([logits[i:i + bn, j:j + bv].max() for j in range(0, v, bv)])
        for i in range(0, n, bn)
    ])
    assert tile_max.shape == want.shape
    assert torch.allclose(tile_max.double(), want, rtol=1e-5, atol=1e-5)
    ref_lse, ref_tgt = cce_forward(e.double(), c.double(), t, start, "reference")[:2]
    assert rel_err(lse, ref_lse) < 1e-6 and rel_err(tgt, ref_tgt) < 1e-6


@pytest.mark.parametrize("regime", ["lm", "spread"])
def test_default_filter_within_twice_exact_error_on_peaked_data(regime):
    e, c, t = make_inputs(regime, 128, 64, 500, dtype=torch.bfloat16, seed=4)
    e.requires_grad_(), c.requires_grad_()
    _, ref_de, ref_dc = float64_reference(e, c, t)
    exact = torch.autograd.grad(linear_cross_entropy(e, c, t, filter_eps=None), (e, c))
    auto = torch.autograd.grad(linear_cross_entropy(e, c, t), (e, c))
    for got, want, ref in zip(auto, exact, (ref_de, ref_dc)):
        assert rel_err(got, ref) <= 2 * rel_err(want, ref)


@pytest.mark.parametrize("v", [70, 400])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_and_without_workspace_in_dc(v, dtype):
    """Large V lends dC's tail rows to the dE accumulator and dl; small V cannot. Both exact."""
    from cce_dist.kernels.tiles import default_config
    from cce_dist.kernels.triton_backward import workspace_split

    n, d = 24, 16
    cfg = default_config(torch.device("cpu"))
    split = workspace_split(n, d, v, cfg.lent_chunk_v, cfg.block_v, dtype.itemsize)
    assert (split < v) == (v == 400)
    e, c, t = make_inputs("spread", n, d, v, dtype=dtype, seed=5)
    e.requires_grad_(), c.requires_grad_()
    _, ref_de, ref_dc = float64_reference(e, c, t)
    de, dc = torch.autograd.grad(
        linear_cross_entropy(e, c, t, filter_eps=None, backend="triton"), (e, c)
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(de, ref_de) < tol and rel_err(dc, ref_dc) < tol


@pytest.mark.parametrize("v,lend", [(70, 1.0), (400, 1.0), (400, 0.0)])
def test_de_is_final_before_the_last_dc_work(v, lend, monkeypatch):
    """on_de_ready sees the final dE while dC work is still to be launched (the window in which
    the vocabulary-parallel backward reduces dE), with and without rows lent to the workspace."""
    from dataclasses import replace

    from cce_dist.kernels import triton_backward, triton_forward
    from cce_dist.kernels.tiles import default_config

    cfg = replace(default_config(torch.device("cpu")), max_lent_fraction=lend)
    n, d = 24, 16
    lent = triton_backward.workspace_split(n, d, v, cfg.lent_chunk_v, cfg.block_v, 4, lend) < v
    assert lent == (v == 400 and lend == 1.0)
    e, c, t = make_inputs("spread", n, d, v, dtype=torch.float32, seed=6)
    lse, _, tile_max = triton_forward.forward(e, c, t, 0, cfg)[:3]
    launches = []

    class CountingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append("dc")
            return self.kernel[grid]

    monkeypatch.setattr(triton_backward, "_dc_kernel", CountingKernel(triton_backward._dc_kernel))
    seen = []

    def on_de_ready(de):
        seen.append((de.clone(), len(launches)))

    scale = torch.ones(n)
    de, dc = triton_backward.backward(e, c, t, lse, scale, 0, None, tile_max, cfg,
                                      de_fp32=True, on_de_ready=on_de_ready)
    assert len(seen) == 1
    early_de, dc_launches_before = seen[0]
    assert torch.equal(early_de, de) and de.dtype == torch.float32
    assert dc_launches_before < len(launches)  # dC work remained to overlap with
    _, ref_de, ref_dc = float64_reference(e, c, t, reduction="sum")
    assert rel_err(de, ref_de) < 1e-5 and rel_err(dc, ref_dc) < 1e-5
