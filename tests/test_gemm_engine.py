"""The gemm engine (cuBLAS products, Triton element-wise kernels): the same contract as the fused
tile kernels, on its own chunking, workspace and filter paths. On the CPU its products run in
torch (fp32) and its Triton kernels in the interpreter."""

from dataclasses import replace
from unittest import mock

import pytest
import torch

from cce_dist.kernels import gemm_engine, triton_backward, triton_forward
from cce_dist.kernels.filtering import GradFilter, keep_tiles
from cce_dist.kernels.tiles import default_config
from cce_dist.testing import make_inputs
from helpers import float64_reference, rel_err
from memcheck import checked_memory

CFG = default_config(torch.device("cpu"))


def test_the_default_engine_is_the_gemm_engine():
    assert CFG.gemm and default_config(torch.device("cpu"), torch.float32).gemm


@pytest.mark.parametrize("fw_chunk,cols", [(16, 32), (48, 32), (96, 16), (96, 64)])
@pytest.mark.parametrize("sum_logits", [False, True])
def test_forward_matches_float64_and_records_tile_maxima(fw_chunk, cols, sum_logits):
    """LSE, target logit, sum of logits and every (block_n x block_v) tile's largest logit,
    edge tiles, partial column groups and a last chunk that ends inside a tile included;
    targets outside the shard add nothing."""
    cfg = replace(CFG, gemm_fw_chunk_v=fw_chunk, gemm_stats_cols=cols)
    n, d, v, start = 37, 24, 90, 40
    e, c, t = make_inputs("lm", n, d, v + start, dtype=torch.float32, seed=7)
    c = c[start:]
    with checked_memory():
        lse, tgt, tile_max, zsum = gemm_engine.forward(e, c, t, start, cfg, sum_logits)
    z = e.double() @ c.double().T
    local = t - start
    inside = (local >= 0) & (local < v)
    want_tgt = torch.where(inside, z.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    assert rel_err(lse, torch.logsumexp(z, 1)) < 1e-6 and rel_err(tgt, want_tgt) < 1e-6
    assert torch.all(tgt[~inside] == 0)
    bn, bv = cfg.block_n, cfg.block_v
    want = torch.stack([torch.stack([z[i:i + bn, j:j + bv].max() for j in range(0, v, bv)])
                        for i in range(0, n, bn)])
    assert torch.allclose(tile_max.double(), want, rtol=1e-5, atol=1e-5)
    if sum_logits:
        assert rel_err(zsum, z.sum(1)) < 1e-6
    else:
        assert zsum.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engines_agree(dtype):
    """Forward statistics and exact gradients of both engines agree on the same inputs."""
    n, d, v = 45, 32, 300
    e, c, t = make_inputs("zipf", n, d, v, dtype=dtype, seed=11)
    t[::5] = -100
    fused = replace(CFG, gemm=False)
    a = gemm_engine.forward(e, c, t, 0, CFG, True)
    b = triton_forward.forward(e, c, t, 0, fused, True)
    for x, y in zip(a, b):
        assert x.shape == y.shape and rel_err(x, y.double()) < 1e-5
    scale = torch.rand(n, generator=torch.Generator().manual_seed(0)) * (t >= 0)
    ga = gemm_engine.backward(e, c, t, a[0], scale, 0, None, a[2], CFG, target_weight=0.9)
    gb = triton_backward.backward(e, c, t, a[0], scale, 0, None, a[2], fused, target_weight=0.9)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for x, y in zip(ga, gb):
        assert x.dtype == y.dtype and rel_err(x, y.double()) < tol


def test_budget_filter_skips_nothing_on_the_gemm_engine():
    """The gemm engine's products are dense, so the budget filter (which would zero tiles, not
    skip their work) is not applied: the gradients equal float64's exact ones, even under a
    budget so large that the zeroed tiles would show, and those of no filter bit for bit."""
    e, c, t = make_inputs("zipf", 80, 64, 700, dtype=torch.float32, seed=3)
    n, v = e.shape[0], c.shape[0]
    budget = 50.0  # far beyond any real one
    _, _, tile_max, _ = gemm_engine.forward(e, c, t, 0, CFG)
    lse = torch.logsumexp(e.double() @ c.double().T, dim=1).float()
    keep = keep_tiles(tile_max, lse, CFG.block_n, CFG.block_v, v, v, GradFilter("budget", budget))
    assert keep.float().mean() < 0.7, "the filter would zero many tiles"
    with torch.no_grad():
        g = torch.softmax(e.double() @ c.double().T, dim=1)
        g[torch.arange(n), t] -= 1.0
    de, dc = gemm_engine.backward(e, c, t, lse, torch.ones(n), 0, GradFilter("budget", budget),
                                  tile_max, CFG)
    assert rel_err(de, g @ c.double()) < 1e-5 and rel_err(dc, g.T @ e.double()) < 1e-5
    exact = gemm_engine.backward(e, c, t, lse, torch.ones(n), 0, None, tile_max, CFG)
    assert torch.equal(de, exact[0]) and torch.equal(dc, exact[1])


def test_refuses_the_per_entry_filter():
    e, c, t = make_inputs("lm", 8, 16, 40, dtype=torch.float32, seed=1)
    lse, _, tile_max, _ = gemm_engine.forward(e, c, t, 0, CFG)
    with pytest.raises(ValueError, match="budget"):
        gemm_engine.backward(e, c, t, lse, torch.ones(8), 0, GradFilter("entry", 1e-3), tile_max,
                             CFG)


@pytest.mark.parametrize("v,lend,tail_bytes", [(70, 1.0, 1 << 20), (400, 1.0, 1 << 20),
                                               (400, 1.0, 1), (400, 0.0, 1 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_and_de_ready_before_the_last_dc(v, lend, tail_bytes, dtype, monkeypatch):
    """With and without dC's tail rows lent to the workspace (and tail chunks of one tile),
    the gradients are exact, and on_de_ready sees the final dE while dC products remain."""
    cfg = replace(CFG, max_lent_fraction=lend, gemm_tail_bytes=tail_bytes)
    n, d = 24, 16
    size = dtype.itemsize
    lent = triton_backward.workspace_split(n, d, v, cfg.gemm_chunk_v, cfg.block_v, size, lend,
                                           chunk_itemsize=4 + size) < v
    assert lent == (v == 400 and lend == 1.0)
    e, c, t = make_inputs("spread", n, d, v, dtype=dtype, seed=6)
    lse = gemm_engine.forward(e, c, t, 0, cfg)[0]
    dc_products = []
    real = gemm_engine._mm_cast

    def counting(a, b, out):
        dc_products.append(out.shape[0])
        return real(a, b, out)

    monkeypatch.setattr(gemm_engine, "_mm_cast", counting)
    seen = []
    with checked_memory():  # every interpreted load and store inside its launch's tensors
        de, dc = gemm_engine.backward(
            e, c, t, lse, torch.ones(n), 0, None, None, cfg, de_fp32=True,
            on_de_ready=lambda x: seen.append((x.clone(), len(dc_products))))
    assert len(seen) == 1 and torch.equal(seen[0][0], de) and de.dtype == torch.float32
    assert seen[0][1] < len(dc_products)
    assert sum(dc_products) == v  # every row of dC written once
    if tail_bytes == 1 and lent:
        assert min(dc_products) == cfg.block_v
    _, ref_de, ref_dc = float64_reference(e, c, t, reduction="sum")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(de, ref_de) < tol and rel_err(dc, ref_dc) < tol


def test_forward_chunk_shrinks_to_its_memory_limit():
    """The forward's fp32 logits buffer stays within gemm_fw_bytes (one tile column at least)."""
    assert gemm_engine._chunk_rows(1000, 64 * 1000 * 4, 2048, 16, 10_000) == 64
    assert gemm_engine._chunk_rows(1000, 1, 2048, 16, 10_000) == 16
    assert gemm_engine._chunk_rows(10, 1 << 30, 2048, 16, 40) == 48
    cfg = replace(CFG, gemm_fw_bytes=20 * 16 * 4)
    e, c, t = make_inputs("lm", 20, 16, 100, dtype=torch.float32, seed=2)
    allocated = []
    real_empty = torch.empty

    def spy(*args, **kw):
        out = real_empty(*args, **kw)
        allocated.append(out.numel())
        return out

    with mock.patch.object(torch, "empty", spy):
        lse = gemm_engine.forward(e, c, t, 0, cfg)[0]
    assert max(allocated) == 20 * 16  # the logits buffer: 16 rows of the 100
    assert rel_err(lse, torch.logsumexp(e.double() @ c.double().T, 1)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lent_rows_use_buffers_in_their_own_unwritten_rows(dtype, monkeypatch):
    """When many rows were lent, their dC is written in full chunks whose buffers sit in the
    rows still to be written, then in smaller ones: every row once, and exact."""
    cfg = replace(CFG, gemm_tail_bytes=1)
    n, d, v = 64, 16, 1200
    e, c, t = make_inputs("spread", n, d, v, dtype=dtype, seed=1)
    size = dtype.itemsize
    split = triton_backward.workspace_split(n, d, v, cfg.gemm_chunk_v, cfg.block_v, size,
                                            cfg.max_lent_fraction, chunk_itemsize=4 + size)
    assert split < v
    lse = gemm_engine.forward(e, c, t, 0, cfg)[0]
    sizes = []
    real = gemm_engine._mm_cast
    monkeypatch.setattr(gemm_engine, "_mm_cast",
                        lambda a, b, out: (sizes.append(out.shape[0]), real(a, b, out)))
    with checked_memory():
        de, dc = gemm_engine.backward(e, c, t, lse, torch.ones(n), 0, None, None, cfg)
    assert sum(sizes) == v
    full_before_split = split // cfg.gemm_chunk_v
    assert sizes.count(cfg.gemm_chunk_v) > full_before_split  # full chunks among the lent rows
    _, ref_de, ref_dc = float64_reference(e, c, t, reduction="sum")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(de, ref_de) < tol and rel_err(dc, ref_dc) < tol


def test_falls_back_to_the_fused_kernels_where_torch_cannot_run_it(monkeypatch):
    """Where gemm_engine.supported() says no (CUDA 16-bit inputs on torch < 2.8), the custom ops
    run the fused tile kernels, with the same results."""
    from cce_dist import linear_cross_entropy

    e, c, t = make_inputs("lm", 40, 32, 200, dtype=torch.bfloat16, seed=3)
    e.requires_grad_(), c.requires_grad_()
    want = torch.autograd.grad(linear_cross_entropy(e, c, t, backend="triton"), (e, c))
    calls = []
    monkeypatch.setattr(gemm_engine, "supported", lambda x: calls.append(x.dtype) or False)
    monkeypatch.setattr(gemm_engine, "forward", None)  # would raise if called
    monkeypatch.setattr(gemm_engine, "backward", None)
    got = torch.autograd.grad(linear_cross_entropy(e, c, t, backend="triton"), (e, c))
    assert len(calls) == 3  # the Function (may the forward make dE?), forward and backward
    for x, y in zip(got, want):
        assert rel_err(x, y.double()) < 1e-2


def _softcapped_reference(e, c, t, start, softcap, bias, scale, logit_scale=1.0):
    """float64 logits of this shard (products times logit_scale, bias, cap) and d(sum of CE
    weighted by scale) / dE over the *whole* vocabulary given as (e, c); start: this shard's
    first row."""
    e64 = e.detach().double().requires_grad_()
    z = (e64 @ c.double().T) * logit_scale
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = t >= 0
    ce = torch.logsumexp(z, 1) - z.gather(1, t.clamp(min=0)[:, None])[:, 0]
    (ce * valid * scale.double()).sum().backward()
    return torch.logsumexp(z.detach(), 1), e64.grad


@pytest.mark.parametrize("dtype,slack,cap", [
    (torch.float32, None, None), (torch.float32, 0.0, None), (torch.float32, 0.0, 1.5),
    (torch.bfloat16, None, None), (torch.bfloat16, 0.0, 1.5), (torch.float16, None, None)])
@pytest.mark.parametrize("softcap,with_bias", [(0.0, False), (6.0, True)])
def test_forward_makes_de_with_online_rescaling(dtype, slack, cap, softcap, with_bias,
                                                 monkeypatch):
    """forward(with_de=True) + finish_de give dE against float64 while each token's largest
    logit keeps growing chunk after chunk (rows of c in increasing norm: the accumulator's rows
    are rescaled many times, or, with the slack, a few; with a tiny cap on p, most rows of
    every chunk are clamped and repaired), ignored tokens and targets outside the shard
    included; dE of two shards under the global LSE add up to the whole one."""
    if slack is not None:
        monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype, scale=1.0: slack)
    if cap is not None:
        monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: cap)
    n, d, v = 29, 16, 150
    g = torch.Generator().manual_seed(5)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * torch.linspace(0.2, 3.0, v)[:, None]
    e, c = e.to(dtype), c.to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -100
    bias = torch.randn(v, generator=g).to(dtype) if with_bias else None
    scale = torch.rand(n, generator=g) * (t >= 0)
    lse64, de64 = _softcapped_reference(e, c, t, 0, softcap, bias, scale)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    parts = []
    for lo, hi in ((0, 70), (70, v)):
        b = None if bias is None else bias[lo:hi]
        lse, tgt, _, _, acc, ref, resid = gemm_engine.forward(e, c[lo:hi], t, lo, CFG, False,
                                                              softcap, b, with_de=True)
        parts.append((lse, tgt, acc, ref, resid))
    lse = torch.logsumexp(torch.stack([p[0] for p in parts]), 0)
    assert rel_err(lse, lse64) < 1e-5
    target_logit = parts[0][1] + parts[1][1]
    with checked_memory():
        des = [gemm_engine.finish_de(acc, ref, resid, lse, target_logit, scale, t, c[lo:hi], lo,
                                     CFG, torch.float32, softcap=softcap)
               for (_, _, acc, ref, resid), (lo, hi) in zip(parts, ((0, 70), (70, v)))]
    assert rel_err(des[0] + des[1], de64) < tol
    assert torch.all(des[0][t < 0] == 0) and torch.all(des[1][t < 0] == 0)
    whole = gemm_engine.forward(e, c, t, 0, CFG, False, softcap, bias, with_de=True)
    de = gemm_engine.finish_de(whole[4], whole[5], whole[6], whole[0], whole[1], scale, t, c, 0,
                               CFG, dtype, softcap=softcap)
    assert de.dtype == dtype and rel_err(de, de64) < tol


@pytest.mark.parametrize("dtype,accumulate", [(torch.float32, False), (torch.bfloat16, True)])
def test_backward_without_de_computes_each_row_once(dtype, accumulate, monkeypatch):
    """backward(want_de=False) (dE came from the forward): the logits of every row of c are
    computed exactly once (with dE in the backward, the rows lent to its accumulator are
    computed twice), dC equals the backward's with dE, and its workspace stays in dC's rows."""
    cfg = replace(CFG, gemm_tail_bytes=1)
    n, d, v = 32, 16, 400
    e, c, t = make_inputs("spread", n, d, v, dtype=dtype, seed=1)
    lse = gemm_engine.forward(e, c, t, 0, cfg)[0]
    scale = torch.rand(n, generator=torch.Generator().manual_seed(2))
    products = []
    real = gemm_engine.ChunkDlogits.__call__

    def counting(self, v0, vc, *args):  # a chunk's logits (fused into dl, or cuBLAS's)
        products.append(vc)
        return real(self, v0, vc, *args)

    monkeypatch.setattr(gemm_engine.ChunkDlogits, "__call__", counting)
    de_full, dc_full = gemm_engine.backward(e, c, t, lse, scale, 0, None, None, cfg)
    assert sum(products) > v  # the lent rows, twice
    products.clear()
    dc_accum = torch.zeros(c.shape, dtype=torch.float32) if accumulate else None
    with checked_memory():
        de, dc = gemm_engine.backward(e, c, t, lse, scale, 0, None, None, cfg, want_de=False,
                                      dc_accum=dc_accum)
    assert sum(products) == v and de.numel() == 0
    if accumulate:
        assert dc.numel() == 0 and rel_err(dc_accum, dc_full.double()) < (
            1e-6 if dtype == torch.float32 else 1e-2)
    else:  # the same values, up to the order of the fp32 sums in the chunks' products
        assert rel_err(dc, dc_full.double()) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("reduction,options", [
    ("mean", {}), ("none", {"softcap": 5.0, "z_loss": 1e-3}), ("sum", {"label_smoothing": 0.1}),
    ("none", {"filter_eps": None})])
def test_the_loss_makes_de_in_its_forward(reduction, options, monkeypatch):
    """linear_cross_entropy on the gemm engine makes dE in the forward and the backward skips
    it, with the same loss and gradients as the backward-only path (c with padded rows
    included); a second backward (retain_graph) gives the same gradients again; not under
    no_grad, nor when e needs no gradient, nor with the per-entry filter."""
    from cce_dist import linear_cross_entropy
    from cce_dist.kernels import ops
    from cce_dist.parallel import function

    e0, c0, t = make_inputs("lm", 24, 16, 120, dtype=torch.bfloat16, seed=3)
    t[::7] = -100
    if not options:  # rows of c padded in memory (stride(0) > D)
        c0 = torch.cat([c0, torch.randn(120, 5).to(c0.dtype)], 1)[:, :16]
    finished, skipped = [], []
    real_finish, real_backward = function.cce_finish_de, function.cce_backward
    monkeypatch.setattr(function, "cce_finish_de",
                        lambda *a, **k: finished.append(1) or real_finish(*a, **k))
    monkeypatch.setattr(function, "cce_backward",
                        lambda *a, **k: skipped.append(k.get("skip_de", False))
                        or real_backward(*a, **k))

    def grads(fuse):
        e, c = e0.clone().requires_grad_(), c0.clone().requires_grad_()
        with mock.patch.object(function, "forward_makes_de",
                               ops.forward_makes_de if fuse else (lambda *a: False)):
            loss = linear_cross_entropy(e, c, t, reduction=reduction, backend="triton",
                                        **options)
        upstream = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
        first = torch.autograd.grad(loss, (e, c), upstream, retain_graph=True)
        again = torch.autograd.grad(loss, (e, c), upstream)
        for x, y in zip(first, again):  # dE: a rounding more when scaled per token
            assert rel_err(x, y.double()) < 1e-2
        return (loss.detach(), *first)

    want = grads(False)
    assert finished == [] and skipped == [False, False]
    got = grads(True)
    assert finished == [1] and skipped == [False, False, True, False]  # the second: as before
    # The forward without dE may run the fused statistics kernel (gemm_fused_fw="stats"),
    # which sums the products in another order.
    assert rel_err(got[0], want[0].double()) < 1e-6
    assert rel_err(got[1], want[1].double()) < 1e-2 and rel_err(got[2], want[2].double()) < 4e-3
    if options:
        return
    finished.clear()
    e, c = e0.clone().requires_grad_(), c0.clone()
    with torch.no_grad():
        linear_cross_entropy(e, c, t, backend="triton")
    linear_cross_entropy(e0, c0.clone().requires_grad_(), t, backend="triton").backward()
    linear_cross_entropy(e, c, t, backend="triton", filter_eps=2.0 ** -12).backward()
    assert finished == []


def test_the_forward_makes_de_where_the_backward_would_lend_rows():
    """On the GPU's config the forward makes dE only where the backward would otherwise lend
    dC's rows to its dE accumulator. With the fused dl kernel (no fp32 logits in the
    workspace): 8192 x 4096 x 128256, 8192 x 2304 x 256000 and 4096 x 1024 x 128256 lend, a
    shard of 64128 rows does not; with cuBLAS's fp32 logits in the workspace too, 4096 x 1024 x
    128256 does not either."""
    from cce_dist.kernels.tiles import GPU_CONFIG

    def lends(n, d, v, fused=True):
        return gemm_engine.backward_lends_rows(n, d, v, 2, GPU_CONFIG, fused)

    assert GPU_CONFIG.gemm_de_in_forward == "lent" and CFG.gemm_de_in_forward == "always"
    assert lends(8192, 4096, 128256) and lends(8192, 2304, 256000)
    assert lends(4096, 1024, 128256) and not lends(8192, 4096, 64128)
    assert lends(8192, 4096, 128256, False) and lends(8192, 2304, 256000, False)
    assert not lends(4096, 1024, 128256, False) and not lends(8192, 4096, 64128, False)
    assert not lends(0, 4096, 128256)
    from cce_dist.kernels import ops

    def tensors(dtype):
        return torch.empty(4, 8, dtype=dtype), torch.empty(10, 8, dtype=dtype)

    # The interpreter's config says "always"; fp16 never (its dE, kept scaled by 1 / tokens
    # before the loss scale lifts it, could underflow).
    assert ops.forward_makes_de(*tensors(torch.bfloat16), "triton")
    assert not ops.forward_makes_de(*tensors(torch.float16), "triton")
    assert not ops.forward_makes_de(*tensors(torch.bfloat16), "reference")


@pytest.mark.parametrize("fused", ["never", "always"])
@pytest.mark.parametrize("softcap,repair", [(0.0, False), (30.0, False), (0.0, True)])
def test_forward_de_of_confident_tokens_keeps_the_target_term(softcap, repair, fused,
                                                              monkeypatch):
    """bf16, targets of probability 0.99 to nearly 1: dE's row is (p_t - 1) c_t + sum of the other
    p_j c_j, tiny next to p_t, whose bf16 rounding alone (2^-9 relative) would swamp it; each
    row stays within bf16 accuracy of float64 (the rounding of p_t is carried in fp32). With
    ``repair``, p is capped so low that the rows are recomputed in fp32 chunk after chunk: the
    rounding carried must then not count twice. Both forwards: p from the fp32 logits' pass
    (``fused="never"``) and from the fused kernel's epilogue (``"always"``)."""
    if repair:
        monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype: 0.0)
        monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: 1.5)
    n, d, v = 32, 16, 200
    g = torch.Generator().manual_seed(9)
    c = torch.randn(v, d, generator=g)
    t = torch.randperm(v, generator=g)[:n]
    c[t] *= 3.0  # targets' rows stand out; e along them: p_t from 0.8 to nearly 1
    e = torch.linspace(1.0, 2.2, n)[:, None] * c[t] / c[t].norm(dim=1, keepdim=True)
    e, c = e.to(torch.bfloat16), c.to(torch.bfloat16)
    lse64, de64 = _softcapped_reference(e, c, t, 0, softcap, None, torch.ones(n))
    cfg = replace(CFG, gemm_fused_fw=fused)
    assert gemm_engine.fused_forward(e, c, cfg, True) == (fused == "always")
    lse, tgt, _, _, acc, ref, resid = gemm_engine.forward(e, c, t, 0, cfg, False, softcap,
                                                          with_de=True)
    # (Nearer 1, dE's row is ~1e-7 of p_t: below what fp32 itself resolves, on either path.)
    confident = (torch.exp(tgt.double() - lse64) - 0.995).abs() < 0.0049  # 0.99 .. 0.9999
    assert confident.sum() >= 8
    de = gemm_engine.finish_de(acc, ref, resid, lse, tgt, torch.ones(n), t, c, 0, cfg,
                               torch.float32, softcap=softcap)
    row_err = (de.double() - de64).norm(dim=1) / de64.norm(dim=1)
    assert row_err[confident].max() < 2e-2, row_err  # without the carried rounding: up to 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_de_survives_a_chunk_far_above_the_ones_before(dtype, with_bias):
    """A later chunk's logits about 100 above every earlier chunk's LSE (p under the earlier
    reference would overflow even fp32: e^100): the clamped rows are recomputed in fp32 and dE
    matches float64, targets inside the far chunk (whose rounding residual the repair replaces)
    and outside it. Also the chunk after it, back at ordinary logits."""
    n, d, v = 24, 16, 200
    chunk = CFG.gemm_fw_chunk_v
    g = torch.Generator().manual_seed(11)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * 0.3
    far = slice(2 * chunk, 3 * chunk)
    c[far] *= 60.0
    e, c = e.to(dtype), c.to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[: n // 2] = torch.randint(far.start, far.stop, (n // 2,), generator=g)
    t[5] = -100
    bias = torch.randn(v, generator=g).to(dtype) if with_bias else None
    scale = torch.rand(n, generator=g) * (t >= 0)
    lse64, de64 = _softcapped_reference(e, c, t, 0, 0.0, bias, scale)
    z64 = e.double() @ c.double().T + (0 if bias is None else bias.double())
    early = torch.logsumexp(z64[:, : far.start], 1)
    assert (z64[:, far].max(1).values - early).min() > 70  # p would overflow without the repair
    lse, tgt, _, _, acc, ref, resid = gemm_engine.forward(e, c, t, 0, CFG, False, 0.0, bias,
                                                          with_de=True)
    assert rel_err(lse, lse64) < 1e-5 and torch.isfinite(acc).all()
    de = gemm_engine.finish_de(acc, ref, resid, lse, tgt, scale, t, c, 0, CFG, torch.float32)
    assert rel_err(de, de64) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


def test_a_repaired_row_does_not_count_the_targets_rounding_twice(monkeypatch):
    """bf16, slack 0 and cap 8: a chunk whose confident target (p_t about 0.999) sits 7.0-7.7
    above the reference is written unclamped, with its rounding carried, yet its row is
    recomputed in fp32 (the repair starts 1 below the cap), which already holds that rounding:
    dE's row, ~1e-3 of p_t, stays within bf16 accuracy of float64 only if the carried rounding
    is dropped there. The logits are laid out exactly: e is the identity, c the logits."""
    monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype: 0.0)
    monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: 8.0)
    n = 16  # = D
    v, chunk = 150, CFG.gemm_fw_chunk_v
    g = torch.Generator().manual_seed(12)
    z = torch.rand(n, v, generator=g) * 0.2 - 0.1
    t = 2 * chunk + 4 + torch.arange(n)
    z[torch.arange(n), t] = torch.linspace(11.6, 12.3, n)
    e, c = torch.eye(n).to(torch.bfloat16), z.T.contiguous().to(torch.bfloat16)
    lse64, de64 = _softcapped_reference(e, c, t, 0, 0.0, None, torch.ones(n))
    p_t = torch.exp(c.double()[t, torch.arange(n)] - lse64)
    assert p_t.min() > 0.998 and p_t.max() < 0.9995
    lse, tgt, _, _, acc, ref, resid = gemm_engine.forward(e, c, t, 0, CFG, with_de=True)
    de = gemm_engine.finish_de(acc, ref, resid, lse, tgt, torch.ones(n), t, c, 0, CFG,
                               torch.float32)
    row_err = (de.double() - de64).norm(dim=1) / de64.norm(dim=1)
    assert row_err.max() < 2e-2, row_err


@pytest.mark.parametrize("dtype,logit_scale,jump", [
    (torch.float16, 4.0, 8.0), (torch.float16, 40.0, 2.0), (torch.bfloat16, 4.0, 60.0),
    (torch.float32, 0.5, 60.0), (torch.bfloat16, 1.0, 0.0)])
@pytest.mark.parametrize("first_masked", [False, True])
def test_forward_de_with_a_scale_a_masked_first_chunk_and_a_low_cap(dtype, logit_scale, jump,
                                                                   first_masked, monkeypatch):
    """dE against float64 where p's bound must hold after the logit scale (fp16 at 1 /
    temperature 4 and 40: p = e^cap * scale would overflow fp16 if the cap ignored it), with a
    later chunk far above the first (the repair), a first chunk a bias of -inf masks for every
    token (no reference yet after it), and a cap patched below the slack (a repaired row must
    still be rescaled)."""
    if jump == 0.0:
        monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype: 8.0)
        monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: 3.0)
    n, d, v = 20, 16, 160
    chunk = CFG.gemm_fw_chunk_v
    g = torch.Generator().manual_seed(13)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(v, d, generator=g) * 0.1
    c[chunk:2 * chunk] *= 1.0 + jump
    c[2 * chunk:] *= 3.0
    e, c = e.to(dtype), c.to(dtype)
    t = torch.randint(chunk, v, (n,), generator=g)
    t[3] = -100
    bias = torch.zeros(v, dtype=dtype)
    if first_masked:
        bias[:chunk] = float("-inf")
    scale = torch.rand(n, generator=g) * (t >= 0)
    lse64, de64 = _softcapped_reference(e, c, t, 0, 0.0, bias, scale, logit_scale)
    lse, tgt, _, _, acc, ref, resid = gemm_engine.forward(
        e, c, t, 0, CFG, False, 0.0, bias, logit_scale=logit_scale, with_de=True)
    assert torch.isfinite(acc).all() and torch.isfinite(ref).all()
    assert rel_err(lse, lse64) < 1e-5
    de = gemm_engine.finish_de(acc, ref, resid, lse, tgt, scale, t, c, 0, CFG, torch.float32,
                               logit_scale=logit_scale)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(de, de64) < tol


@pytest.mark.parametrize("options", [
    {},
    {"bias": True},
    {"entropy": True, "logit_scale": 1.7},
    {"uniform_weight": 0.01, "target_weight": 0.9, "softcap": 6.0},
])
@pytest.mark.parametrize("want_de,accumulate,dtype", [
    (True, False, torch.bfloat16), (False, False, torch.float16), (False, True, torch.bfloat16)])
def test_fused_dlogits_kernel_matches_the_two_launch_path(options, want_de, accumulate, dtype):
    """The backward's fused kernel (logits and dl in one persistent TMA kernel) and the
    two-launch path (fp32 logits from a product, then the dl kernel) give the same gradients
    on every option (bias, softcap, entropy, logit scale, the
    smoothing weights), with dE and without, and a dC accumulated into fp32; and the fused path
    is the one that ran (no fp32 logits product)."""
    n, d, v = 40, 32, 300
    e, c, t = make_inputs("zipf", n, d, v, dtype=dtype, seed=12)
    t[::7] = -100
    gen = torch.Generator().manual_seed(4)
    bias = torch.randn(v, generator=gen) if options.get("bias") else None
    scale_logits = options.get("logit_scale", 1.0)
    softcap = options.get("softcap", 0.0)
    lse, _, tile_max, mean = gemm_engine.forward(e, c, t, 0, CFG, softcap=softcap, bias=bias,
                                                 mean_logit=True, logit_scale=scale_logits)
    scale = torch.rand(n, generator=gen) * (t >= 0)
    entropy = (torch.randn(n, generator=gen), mean) if options.get("entropy") else None
    results = {}
    for fused in (True, False):
        cfg = replace(CFG, gemm_fused_dl=fused)
        assert gemm_engine.fused_dlogits(e, c, cfg) == fused
        dbias = torch.zeros(v) if bias is not None else None
        dc_accum = torch.zeros(v, d) if accumulate else None
        with checked_memory(), mock.patch.object(
                gemm_engine, "_mm_fp32", wraps=gemm_engine._mm_fp32) as products:
            de, dc = gemm_engine.backward(
                e, c, t, lse, scale, 0, None, tile_max, cfg, softcap=softcap, bias=bias,
                dbias=dbias, entropy=entropy, logit_scale=scale_logits,
                uniform_weight=options.get("uniform_weight", 0.0),
                target_weight=options.get("target_weight", 1.0), dc_accum=dc_accum,
                want_de=want_de)
        logits_products = [call for call in products.call_args_list
                           if call.args[0] is e]  # e @ c[chunk].T
        assert bool(logits_products) != fused
        assert (de.numel() > 0) == want_de
        results[fused] = {"de": de, "dc": dc_accum if accumulate else dc, "dbias": dbias}
    for name, x in results[True].items():
        if x is not None and x.numel():
            assert rel_err(x, results[False][name].double()) < 2e-3, (name, options)
    if not options:  # and against float64
        scale64 = scale.double()
        g = torch.softmax(e.double() @ c.double().T, 1) - torch.nn.functional.one_hot(
            t.clamp(min=0), v).double()
        g = g * scale64[:, None]
        if want_de:
            assert rel_err(results[True]["de"], g @ c.double()) < 1e-2
        assert rel_err(results[True]["dc"], g.T @ e.double()) < 1e-2


@pytest.mark.parametrize("layout", ["misaligned start", "odd D in padded rows"])
def test_inputs_tma_cannot_load_take_the_two_launch_path(layout):
    """A start off 16 bytes (a view one element into its storage), or a D whose fp32 rows would
    leave the lent workspace's dl off 16 bytes (rows padded to an aligned stride): the fused
    kernel is not eligible, and the backward (rows lent, dE computed in it) is still exact."""
    n, v = 3, 300
    d = 33 if layout == "odd D in padded rows" else 32
    e0, c0, t = make_inputs("spread", n, d, v, dtype=torch.bfloat16, seed=2)
    if layout == "misaligned start":
        e = torch.empty(n * d + 1, dtype=e0.dtype)[1:].view(n, d).copy_(e0)
        c = c0
    else:
        e = torch.zeros(n, 40, dtype=e0.dtype)[:, :d].copy_(e0)
        c = torch.zeros(v, 40, dtype=c0.dtype)[:, :d].copy_(c0)
    assert not gemm_engine.fused_dlogits(e, c, CFG)
    lse = gemm_engine.forward(e, c, t, 0, CFG)[0]
    with checked_memory():
        de, dc = gemm_engine.backward(e, c, t, lse, torch.ones(n), 0, None, None, CFG)
    _, ref_de, ref_dc = float64_reference(e0, c0, t, reduction="sum")
    assert rel_err(de, ref_de) < 1e-2 and rel_err(dc, ref_dc) < 1e-2


@pytest.mark.parametrize("options", [
    {},
    {"sum_logits": True, "bias": True},
    {"mean_logit": True, "logit_scale": 1.7},
    {"softcap": 6.0, "bias": True, "low_cap": True},
    {"sum_logits": True, "bias": True, "masked": True},
    {"confident": True},
    {"tall": True, "sum_logits": True},
])
@pytest.mark.parametrize("with_de,dtype", [
    (True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float16)])
def test_fused_forward_matches_the_two_launch_path(options, with_de, dtype, monkeypatch):
    """The forward's fused kernel (logits, statistics and p in one persistent TMA kernel) and
    the two-launch path (fp32 logits from a product, then the statistics kernel) agree on the
    LSE, target logit, tile maxima (also against float64), sum or mean of logits and the
    finished dE, on every option, a shard's slice of the vocabulary, several chunks with a
    partial last one, and, with a low cap on p, rows repaired from recomputed logits, a bias
    of -inf over the first 96 rows (column groups of two chunks with no finite logit), or
    confident tokens (what rounding takes from the target's p), or (``tall``) kernel tiles of
    2 x 4 filter tiles, the last row of them past N; and the fused path is the one that ran (no
    fp32 logits product)."""
    if options.get("low_cap"):
        monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype: 0.0)
        monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: 1.5)
    n, d, v, start = 45, 32, 200, 30
    e, c, t = make_inputs("zipf", n, d, v + start, dtype=dtype, seed=21)
    c = c[start:] * torch.linspace(0.5, 2.0, v)[:, None].to(dtype)  # maxima grow by chunk
    t[::6] = -100
    gen = torch.Generator().manual_seed(8)
    bias = torch.randn(v, generator=gen).to(dtype) if options.get("bias") else None
    if options.get("masked"):
        bias[:96] = float("-inf")
        t[(t >= start) & (t < start + 96)] = start + 100
    if options.get("confident"):  # p of the target near 1: its 16-bit rounding matters
        inside = (t >= start) & (t < start + v)
        e[inside] = (e[inside].float() + 3 * c[t[inside] - start].float()).to(dtype)
    kw = dict(sum_logits=options.get("sum_logits", False), softcap=options.get("softcap", 0.0),
              bias=bias, mean_logit=options.get("mean_logit", False),
              logit_scale=options.get("logit_scale", 1.0), with_de=with_de)
    scale = torch.rand(n, generator=gen) * (t >= 0)
    out = {}
    for fused in (True, False):
        # Chunks of whole fused column tiles on both paths (the same references for p), the
        # last one narrower than a tile.
        cfg = replace(CFG, gemm_fused_fw="always" if fused else "never", gemm_fw_chunk_v=64)
        if options.get("tall"):  # the two-launch path's statistics on as wide column groups
            cfg = replace(cfg, dl_block_m=2 * CFG.block_n, fw_fused_block_c=4 * CFG.block_v,
                          gemm_stats_cols=4 * CFG.block_v)
        assert gemm_engine.fused_forward(e, c, cfg, with_de) == fused
        with checked_memory(), mock.patch.object(
                gemm_engine, "_mm_fp32", wraps=gemm_engine._mm_fp32) as products:
            res = gemm_engine.forward(e, c, t, start, cfg, **kw)
        assert any(call.args[0] is e for call in products.call_args_list) != fused
        lse, tgt, tile_max, zsum = res[:4]
        out[fused] = {"lse": lse, "tgt": tgt, "tile_max": tile_max, "zsum": zsum}
        if with_de:
            out[fused]["de"] = gemm_engine.finish_de(
                *res[4:], lse, tgt, scale, t, c, start, cfg, torch.float32,
                softcap=kw["softcap"], logit_scale=kw["logit_scale"])
    for name, x in out[True].items():
        if x.numel():
            y = out[False][name]
            assert not x.isnan().any() and not y.isnan().any(), name
            assert torch.equal(torch.isinf(x), torch.isinf(y)), name
            assert torch.equal(x[x.isinf()], y[y.isinf()]), name  # the same signs
            assert rel_err(x[x.isfinite()], y[y.isfinite()].double()) < 1e-5, name
    z = (e.double() @ c.double().T) * kw["logit_scale"]
    if bias is not None:
        z = z + bias.double()
    if kw["softcap"]:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    bn, bv = CFG.block_n, CFG.block_v
    want = torch.stack([torch.stack([z[i:i + bn, j:j + bv].max() for j in range(0, v, bv)])
                        for i in range(0, n, bn)])
    assert torch.allclose(out[True]["tile_max"].double(), want, rtol=1e-5, atol=1e-5)
    assert rel_err(out[True]["lse"], torch.logsumexp(z, 1)) < 1e-6
    if with_de:  # against float64: dE of this shard under its own LSE
        local = (t - start).clamp(0, v - 1)
        inside = (t >= start) & (t < start + v)
        g = torch.softmax(z, 1) - inside[:, None] * torch.nn.functional.one_hot(local, v)
        if kw["softcap"]:
            g = g * (1 - (z / kw["softcap"]) ** 2)
        g = g * kw["logit_scale"] * scale.double()[:, None]
        assert rel_err(out[True]["de"], g @ c.double()) < 1e-2


def test_fused_forward_modes():
    """gemm_fused_fw: "always", "stats" (only the forward without dE) or "never"; 16-bit
    operands TMA can load only."""
    e, c, _ = make_inputs("lm", 8, 16, 64, dtype=torch.bfloat16, seed=1)
    for mode, want in (("always", (True, True)), ("stats", (True, False)),
                       ("never", (False, False))):
        cfg = replace(CFG, gemm_fused_fw=mode)
        assert (gemm_engine.fused_forward(e, c, cfg, False),
                gemm_engine.fused_forward(e, c, cfg, True)) == want, mode
    assert not gemm_engine.fused_forward(e.float(), c.float(), CFG, False)
    assert not gemm_engine.fused_forward(e, c[:, 1:], CFG, False)  # a start off 16 bytes


def test_fused_forward_config_is_checked():
    with pytest.raises(ValueError, match="gemm_fused_fw"):
        replace(CFG, gemm_fused_fw="Always")
