"""The Triton kernels compiled for a real GPU: large-shape numerics, torch.compile, CUDA graphs."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs
from helpers import rel_err

pytestmark = pytest.mark.gpu


def _fp32_reference(e, c, t):
    e32 = e.detach().float().requires_grad_()
    c32 = c.detach().float().requires_grad_()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss = F.cross_entropy(e32 @ c32.T, t)
        de, dc = torch.autograd.grad(loss, (e32, c32))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return loss.detach(), de, dc


@pytest.mark.parametrize("regime", ["dense", "lm", "spread", "zipf"])
@pytest.mark.parametrize("shape", [(2048, 1024, 32000), (1000, 768, 50257)])
def test_bf16_accuracy_vs_eager(regime, shape):
    n, d, v = shape
    e, c, t = make_inputs(regime, n, d, v, device="cuda", seed=7)
    e.requires_grad_(), c.requires_grad_()
    ref = _fp32_reference(e, c, t)
    eager = F.cross_entropy((e @ c.T).float(), t)
    eager_err = [rel_err(eager, ref[0])] + [
        rel_err(g, r) for g, r in zip(torch.autograd.grad(eager, (e, c)), ref[1:])
    ]
    loss = linear_cross_entropy(e, c, t, filter_eps=None)
    ours = [rel_err(loss, ref[0])] + [
        rel_err(g, r) for g, r in zip(torch.autograd.grad(loss, (e, c)), ref[1:])
    ]
    assert ours[0] <= max(eager_err[0], 1e-6)
    assert ours[1] <= 1.05 * eager_err[1] and ours[2] <= 1.05 * eager_err[2], (ours, eager_err)
    # The default (budget) filter: at most twice eager's error on every regime.
    if True:
        auto = linear_cross_entropy(e, c, t)
        errs = [rel_err(g, r) for g, r in zip(torch.autograd.grad(auto, (e, c)), ref[1:])]
        assert errs[0] <= 2 * eager_err[1] and errs[1] <= 2 * eager_err[2], (errs, eager_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    e, c, t = make_inputs("lm", 777, 320, 9999, dtype=dtype, device="cuda", seed=1)
    e.requires_grad_(), c.requires_grad_()
    ref = _fp32_reference(e, c, t)
    loss = linear_cross_entropy(e, c, t, filter_eps=None)
    de, dc = torch.autograd.grad(loss, (e, c))
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(loss, ref[0]) < tol
    assert rel_err(de, ref[1]) < tol and rel_err(dc, ref[2]) < tol


def _fw_bw(e, c, t):
    loss = linear_cross_entropy(e, c, t, ignore_index=-100)
    de, dc = torch.autograd.grad(loss, (e, c))
    return loss, de, dc


@pytest.mark.parametrize("de_in_forward", ["lent", "always"])
def test_torch_compile_matches_eager(de_in_forward):
    """The forward compiles as one graph (no break, so no host sync); AOTAutograd compiles the
    backward; also with dE made in the forward (by default only at larger shapes)."""
    from dataclasses import replace
    from unittest import mock

    from cce_dist.kernels import tiles

    e, c, t = make_inputs("lm", 512, 256, 5000, device="cuda", seed=2)
    t[::7] = -100
    e.requires_grad_(), c.requires_grad_()
    config = replace(tiles.GPU_CONFIG, gemm_de_in_forward=de_in_forward)
    with mock.patch.object(tiles, "GPU_CONFIG", config):
        want = _fw_bw(e, c, t)
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b, y: linear_cross_entropy(a, b, y), fullgraph=True)
        loss = compiled(e, c, t)
        got = (loss, *torch.autograd.grad(loss, (e, c)))
    # Inductor fuses the small epilogue (mask, sum, divide): the loss equal up to fp32 rounding,
    # the bf16 gradients up to a last-bit flip of a few elements (the 1/count scale rounds
    # differently), far below the kernels' own error.
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert rel_err(got[1], want[1]) < 1e-4 and rel_err(got[2], want[2]) < 1e-4


@pytest.mark.parametrize("far", [0.0, 80.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_de_across_many_chunks(dtype, far):
    """The forward that makes dE, compiled, over 12 chunks of 512 rows: its reference lags one
    chunk, is raised as the LSE grows (rows of c in increasing norm), and, with ``far``, one
    chunk's logits sit about 100 above every earlier chunk's, so its p is clamped and its rows
    recomputed in fp32 (the repair's fp32 dot). Loss and dE against float64; dC too."""
    from dataclasses import replace
    from unittest import mock

    from cce_dist.kernels import tiles

    n, d, v = 1024, 256, 6000
    g = torch.Generator(device="cuda").manual_seed(4)
    e = torch.randn(n, d, device="cuda", generator=g) / d ** 0.5
    c = torch.randn(v, d, device="cuda", generator=g) * torch.linspace(
        0.5, 4.0, v, device="cuda")[:, None]
    if far:
        c[2048:2560] *= far / 4.0
    e, c = e.to(dtype), c.to(dtype)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    t[: n // 4] = torch.randint(2048, 2560, (n // 4,), device="cuda", generator=g)
    t[::9] = -100
    e.requires_grad_(), c.requires_grad_()
    config = replace(tiles.GPU_CONFIG, gemm_de_in_forward="always", gemm_fw_chunk_v=512)
    with mock.patch.object(tiles, "GPU_CONFIG", config), \
            mock.patch.object(tiles, "GPU_FP32_CONFIG", replace(
                tiles.GPU_FP32_CONFIG, gemm_de_in_forward="always", gemm_fw_chunk_v=512)):
        loss = linear_cross_entropy(e, c, t)
        de, dc = torch.autograd.grad(loss, (e, c))
    e64, c64 = e.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    z = e64 @ c64.T
    if far:
        early = torch.logsumexp(z[:, :2048], 1)
        assert (z[:, 2048:2560].max(1).values - early).median() > 64  # most rows repaired
    want = F.cross_entropy(z, t)
    want_de, want_dc = torch.autograd.grad(want, (e64, c64))
    assert abs(loss.double() - want) < 1e-5 * want.abs()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(de, want_de) < tol and rel_err(dc, want_dc) < tol
    assert torch.isfinite(de).all()


@pytest.mark.parametrize("v,d,dtype", [(32000, 1024, torch.bfloat16), (50257, 768, torch.bfloat16),
                                       (20011, 512, torch.float16)])
def test_fused_dlogits_kernel_on_the_gpu(v, d, dtype):
    """The backward's persistent TMA kernel (logits and dl in one launch) against the
    two-launch path (cuBLAS fp32 logits, then the dl kernel), compiled, over several chunks
    whose last one is not a multiple of 8 rows; with the budget filter (a no-op here), a bias
    and a softcap, with dE and without, and dC into an fp32 accumulator; float64 too."""
    from dataclasses import replace

    from cce_dist.kernels import gemm_engine, tiles
    from cce_dist.kernels.filtering import GradFilter, default_budget

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    n = 3000
    e, c, t = make_inputs("lm", n, d, v, device="cuda", seed=5, dtype=dtype)
    t[::11] = -100
    bias = torch.randn(v, device="cuda") * 0.5
    cfg = replace(tiles.GPU_CONFIG, gemm_bytes=16 << 20, gemm_dc_bytes=16 << 20)
    lse, _, tile_max, _ = gemm_engine.forward(e, c, t, 0, cfg, softcap=30.0, bias=bias)
    scale = (t >= 0).float()  # a sum: fp16's dl scaled by 1 / n would fall to subnormals
    budget = GradFilter("budget", default_budget(dtype))
    got = {}
    for fused in (True, False):
        run = replace(cfg, gemm_fused_dl=fused)
        assert gemm_engine.fused_dlogits(e, c, run) == fused
        dbias = torch.zeros(v, device="cuda")
        de, dc = gemm_engine.backward(e, c, t, lse, scale, 0, budget, tile_max, run,
                                      softcap=30.0, bias=bias, dbias=dbias)
        accum = torch.zeros(v, d, device="cuda")
        gemm_engine.backward(e, c, t, lse, scale, 0, budget, tile_max, run, softcap=30.0,
                             bias=bias, dc_accum=accum, want_de=False)
        got[fused] = (de, dc, dbias, accum)
    for x, y in zip(got[True], got[False]):
        assert rel_err(x, y.double()) < 2e-3
    e64, c64 = e.double().requires_grad_(), c.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    z = 30.0 * torch.tanh((e64 @ c64.T + b64) / 30.0)
    want = F.cross_entropy(z, t, reduction="sum")
    want_de, want_dc, want_db = torch.autograd.grad(want, (e64, c64, b64))
    de, dc, dbias, accum = got[True]
    assert rel_err(de, want_de) < 1e-2 and rel_err(dc, want_dc) < 1e-2
    assert rel_err(dbias, want_db) < 1e-2 and rel_err(accum, want_dc) < 1e-2


@pytest.mark.parametrize("v,d,dtype,low_cap", [(32000, 1024, torch.bfloat16, False),
                                               (50257, 768, torch.bfloat16, True),
                                               (20011, 512, torch.float16, False)])
def test_fused_forward_kernel_on_the_gpu(v, d, dtype, low_cap, monkeypatch):
    """The forward's persistent TMA kernel (logits, statistics and p in one launch) against the
    two-launch path (cuBLAS fp32 logits, then the statistics kernel), compiled, over several
    chunks (the last one narrower, and for two of the shapes not a multiple of 8 rows): LSE,
    target logit, tile maxima, the softmax-weighted mean or the sum of logits, and dE made in
    the forward, with a bias and a softcap or a logit scale; with a low cap on p, rows
    repaired from recomputed logits; dE and the LSE against float64 too."""
    from dataclasses import replace

    from cce_dist.kernels import gemm_engine, tiles

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    if low_cap:
        monkeypatch.setattr(gemm_engine, "probs_slack", lambda dtype: 0.0)
        monkeypatch.setattr(gemm_engine, "probs_cap", lambda dtype, scale=1.0: 4.0)
    n = 3000
    e, c, t = make_inputs("lm", n, d, v, device="cuda", seed=6, dtype=dtype)
    t[::11] = -100
    bias = torch.randn(v, device="cuda") * 0.5
    cfg = replace(tiles.GPU_CONFIG, gemm_de_fw_bytes=16 << 20)
    scale = (t >= 0).float()
    got = {}
    for fused in (True, False):
        run = replace(cfg, gemm_fused_fw="always" if fused else "never")
        assert gemm_engine.fused_forward(e, c, run, True) == fused
        res = gemm_engine.forward(e, c, t, 0, run, softcap=30.0, bias=bias, mean_logit=True,
                                  with_de=True)
        de = gemm_engine.finish_de(*res[4:], res[0], res[1], scale, t, c, 0, run, torch.float32,
                                   softcap=30.0)
        plain = gemm_engine.forward(e, c, t, 0, run, sum_logits=True, logit_scale=1.3)
        got[fused] = (*res[:4], de, *plain)
    # The two paths sum the products in different orders: statistics agree to fp32's
    # rounding, the sums of logits to their cancellation, dE to p's 16-bit rounding.
    names = ("lse", "target", "tile_max", "mean", "dE", "lse", "target", "tile_max", "sum")
    tols = (1e-5, 1e-5, 1e-5, 1e-4, 2e-3, 1e-5, 1e-5, 1e-5, 1e-4)
    errs = {f"{i}:{name}": rel_err(x, y.double())
            for i, (name, x, y) in enumerate(zip(names, got[True], got[False]))}
    assert all(err < tol for err, tol in zip(errs.values(), tols)), errs
    e64, c64 = e.double().requires_grad_(), c.double()
    z = 30.0 * torch.tanh((e64 @ c64.T + bias.double()) / 30.0)
    want = F.cross_entropy(z, t, reduction="sum")
    (want_de,) = torch.autograd.grad(want, (e64,))
    assert rel_err(got[True][0], torch.logsumexp(z.detach(), 1)) < 1e-5
    assert rel_err(got[True][4], want_de) < 1e-2


def _leaves(e, c):
    return e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()


def test_cuda_graph_capture_and_replay():
    """PyTorch's whole-network capture recipe: leaves first used on a side stream (never on the
    default stream, which capture cannot wait on), 3 warm-up iterations, then capture."""
    e0, c0, t = make_inputs("lm", 512, 256, 5000, device="cuda", seed=3)
    want = _fw_bw(*_leaves(e0, c0), t)
    e, c = _leaves(e0, c0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up, as CUDA graphs want: kernels and handles ready
        for _ in range(3):
            _fw_bw(e, c, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _fw_bw(e, c, t)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, want):
        assert torch.equal(a, b)
    # New data in the same buffers: the replay follows it.
    e2, c2, t2 = make_inputs("dense", 512, 256, 5000, device="cuda", seed=4)
    with torch.no_grad():
        e.copy_(e2), c.copy_(c2), t.copy_(t2)
    graph.replay()
    torch.cuda.synchronize()
    want2 = _fw_bw(*_leaves(e2, c2), t2)
    for a, b in zip(out, want2):
        assert torch.equal(a, b)


def test_out_of_range_target_gives_nan_without_sync():
    e, c, t = make_inputs("dense", 64, 32, 100, device="cuda")
    t[5] = 100
    per_token = linear_cross_entropy(e, c, t, reduction="none")
    assert torch.isnan(per_token[5]) and torch.isfinite(per_token[:5]).all()
    assert torch.isnan(linear_cross_entropy(e, c, t))


def test_opt_in_target_check_fires():
    code = (
        "import torch; from cce_dist import linear_cross_entropy as f; "
        "e=torch.randn(8,4,device='cuda'); c=torch.randn(10,4,device='cuda'); "
        "t=torch.full((8,),10,device='cuda'); f(e,c,t); torch.cuda.synchronize()"
    )
    env = dict(os.environ, CCE_DIST_CHECK_TARGETS="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0, run.stderr[-2000:]
    env["CCE_DIST_CHECK_TARGETS"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
@pytest.mark.parametrize("regime", ["lm", "dense"])
def test_options_vs_eager(regime, label_smoothing, z_loss):
    """Label smoothing and z-loss on the GPU kernels: loss and gradients against an fp32
    materialized computation, no worse than eager bf16 (default and exact filter)."""
    e, c, t = make_inputs(regime, 2048, 1024, 32000, device="cuda", seed=9)
    t[::9] = -100
    e.requires_grad_(), c.requires_grad_()

    def materialized(a, b, logits_dtype):
        logits = (a @ b.T).to(logits_dtype) if logits_dtype else a.float() @ b.float().T
        valid = t != -100
        loss = F.cross_entropy(logits.float(), t, label_smoothing=label_smoothing,
                               reduction="none")
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(logits.float(), 1) ** 2, 0.0)
        return loss.sum() / valid.sum()

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        e32, c32 = e.detach().float().requires_grad_(), c.detach().float().requires_grad_()
        ref = materialized(e32, c32, None)
        ref_grads = torch.autograd.grad(ref, (e32, c32))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    eager = materialized(e, c, torch.bfloat16)
    eager_err = [rel_err(g, r) for g, r in zip(torch.autograd.grad(eager, (e, c)), ref_grads)]
    for filter_eps in (None, "auto"):
        loss = linear_cross_entropy(e, c, t, filter_eps=filter_eps,
                                    label_smoothing=label_smoothing, z_loss=z_loss)
        assert rel_err(loss, ref) < 1e-5
        errs = [rel_err(g, r) for g, r in zip(torch.autograd.grad(loss, (e, c)), ref_grads)]
        assert errs[0] <= 1.05 * eager_err[0] and errs[1] <= 1.05 * eager_err[1], (errs, eager_err)


@pytest.mark.parametrize("regime", ["lm", "dense"])
@pytest.mark.parametrize("softcap,label_smoothing,z_loss", [(None, 0.0, 0.0), (30.0, 0.0, 0.0),
                                                            (15.0, 0.1, 1e-4)])
def test_bias_and_softcap_vs_eager(regime, softcap, label_smoothing, z_loss):
    """A bias and a Gemma-style softcap on the GPU kernels (default and exact filter): loss and
    the gradients of e, c and the bias against an fp32 materialized computation, no worse than
    eager bf16."""
    e, c, t = make_inputs(regime, 2048, 1024, 32000, device="cuda", seed=9)
    bias = (torch.randn(32000, device="cuda") * 0.5).to(torch.bfloat16)
    t[::9] = -100
    e.requires_grad_(), c.requires_grad_(), bias.requires_grad_()
    inputs = (e, c, bias)

    def materialized(a, b, bb, logits_dtype):
        if logits_dtype:
            z = (a @ b.T + bb).to(logits_dtype).float()
        else:
            z = a.float() @ b.float().T + bb.float()
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        valid = t != -100
        loss = F.cross_entropy(z, t, label_smoothing=label_smoothing, reduction="none")
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
        return loss.sum() / valid.sum()

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = [x.detach().float().requires_grad_() for x in inputs]
        ref = materialized(*fp32, None)
        ref_grads = torch.autograd.grad(ref, fp32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    eager = materialized(e, c, bias, torch.bfloat16)
    eager_err = [rel_err(g, r) for g, r in zip(torch.autograd.grad(eager, inputs), ref_grads)]
    for filter_eps in (None, "auto"):
        loss = linear_cross_entropy(e, c, t, filter_eps=filter_eps, bias=bias, softcap=softcap,
                                    label_smoothing=label_smoothing, z_loss=z_loss)
        assert rel_err(loss, ref) < 1e-5
        errs = [rel_err(g, r) for g, r in zip(torch.autograd.grad(loss, inputs), ref_grads)]
        assert all(x <= 1.05 * y for x, y in zip(errs, eager_err)), (errs, eager_err)


@pytest.mark.parametrize("regime", ["lm", "dense"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_vs_eager(regime, temperature):
    """linear_logprobs_entropy on the GPU kernels (default and exact filter): outputs and the
    gradients of random upstream weights against an fp32 materialized computation, no worse
    than eager bf16 logits."""
    from cce_dist import linear_logprobs_entropy

    e, c, t = make_inputs(regime, 2048, 1024, 32000, device="cuda", seed=3)
    t[::9] = -100
    e.requires_grad_(), c.requires_grad_()
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = torch.randn(2048, device="cuda", generator=g), torch.randn(2048, device="cuda",
                                                                       generator=g)

    def materialized(x, y, logits_dtype):
        z = (x @ y.T).to(logits_dtype).float() if logits_dtype else x.float() @ y.float().T
        logp = torch.log_softmax(z / temperature, -1)
        valid = t != -100
        lp = torch.where(valid, logp.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
        return lp, torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)

    def weighted(out):
        return (out[0] * a).sum() + (out[1] * b).sum()

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fp32 = [x.detach().float().requires_grad_() for x in (e, c)]
        ref = materialized(*fp32, None)
        ref_grads = torch.autograd.grad(weighted(ref), fp32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    eager = materialized(e, c, torch.bfloat16)
    eager_out_err = [rel_err(x, y) for x, y in zip(eager, ref)]
    eager_err = [rel_err(x, y) for x, y in zip(torch.autograd.grad(weighted(eager), (e, c)),
                                                ref_grads)]
    for filter_eps in (None, "auto"):
        out = linear_logprobs_entropy(e, c, t, temperature=temperature, filter_eps=filter_eps)
        out_err = [rel_err(x, y) for x, y in zip(out, ref)]
        assert all(x <= 1.05 * y for x, y in zip(out_err, eager_out_err)), (out_err, eager_out_err)
        errs = [rel_err(x, y) for x, y in zip(torch.autograd.grad(weighted(out), (e, c)),
                                               ref_grads)]
        assert all(x <= 1.05 * y for x, y in zip(errs, eager_err)), (errs, eager_err)
