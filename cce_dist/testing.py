"""Synthetic inputs of the three data regimes of the benchmarks and tests.

* ``dense``: E, C iid N(0, 1) / D^0.25, logits of std ~1 and a nearly uniform softmax.
* ``lm``: rows of C iid N(0, 1/D); each E_n a weighted sum of 8 candidate rows drawn from a
  Zipf(1) law over vocabulary ids, plus small noise; the target is the heaviest candidate 80% of
  the time, another candidate otherwise. Peaked softmax (mean max-probability ~0.2 at D = 2304
  or 4096, with about 17% of the mass in the long tail of tiny probabilities).
* ``spread``: like ``lm`` with candidates uniform over the vocabulary, so nearly every tile holds
  a non-negligible probability: the worst case for filtering.
* ``zipf``: a heavier power-law softmax from another generator: 64 candidates per token drawn
  from a Zipf(1.2) law over a random permutation of the ids, with logits log(V) - log(rank), so
  candidate probabilities fall as 1 / rank; the target is drawn from that same 1 / rank law. Rows
  of C have random norms (0.5-1.5), so the tail's logits vary by row; about a quarter of the mass
  sits in the tail.
"""

from __future__ import annotations

import math

import torch

REGIMES = ("dense", "lm", "spread", "zipf")
CANDIDATES = 8


def make_inputs(
    regime: str,
    n: int,
    d: int,
    v: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(e, c, targets)``: (n, d) and (v, d) in ``dtype``, (n,) int64, on ``device``.

    Generated on ``device`` itself (fast on a GPU); a seed gives the same data on one device type.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    device = torch.device(device)
    if n == 0:  # an empty batch: nothing to draw for the tokens
        c = make_inputs(regime, 1, d, v, dtype=dtype, device=device, seed=seed)[1]
        return (torch.empty((0, d), dtype=dtype, device=device), c,
                torch.empty((0,), dtype=torch.long, device=device))
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = {"generator": gen, "device": device}
    if regime == "zipf":
        return _zipf_inputs(n, d, v, dtype, kw)
    if regime == "dense":
        scale = d ** -0.25
        e = torch.randn(n, d, **kw) * scale
        c = torch.randn(v, d, **kw) * scale
        targets = torch.randint(0, v, (n,), **kw)
    else:
        c = torch.randn(v, d, **kw) / math.sqrt(d)
        if regime == "lm":
            zipf = 1.0 / torch.arange(1, v + 1, dtype=torch.float64, device=device)
            cand = torch.multinomial(zipf, n * CANDIDATES, replacement=True, generator=gen)
        else:
            cand = torch.randint(0, v, (n * CANDIDATES,), **kw)
        cand = cand.view(n, CANDIDATES)
        # A repeated candidate would add its weight twice; redraw repeats uniformly.
        ordered, _ = cand.sort(dim=1)
        repeat = torch.zeros_like(cand, dtype=torch.bool)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        cand = torch.where(repeat, torch.randint(0, v, cand.shape, **kw), ordered)
        cand = cand[:, torch.randperm(CANDIDATES, **kw)]
        # Candidate logits of about log(V) + O(1): they dominate the V-8 others (logits ~0).
        spread = torch.randn(n, CANDIDATES, **kw).sort(dim=1, descending=True).values
        weights = math.log(v) - 0.5 + 0.25 * spread
        e = torch.einsum("nk,nkd->nd", weights, c[cand])
        e += 0.1 * torch.randn(n, d, **kw) / math.sqrt(d)
        other = torch.randint(1, CANDIDATES, (n,), **kw)
        pick = torch.where(torch.rand(n, **kw) < 0.8, 0, other)
        targets = cand.gather(1, pick[:, None])[:, 0]
    return e.to(dtype), c.to(dtype), targets


def _zipf_inputs(n, d, v, dtype, kw):
    k = max(1, min(32, v // 2))
    gen, device = kw["generator"], kw["device"]
    c = torch.randn(v, d, **kw) / math.sqrt(d)
    c *= 0.5 + torch.rand(v, 1, **kw)  # rows of varied norm: the tail's logits vary by row
    law = torch.arange(1, v + 1, dtype=torch.float64, device=device) ** -1.2
    cand = torch.multinomial(law, n * k, replacement=True, generator=gen).view(n, k)
    # Distinct candidates per token: a repeat moves to the next id after the previous one.
    cand, _ = cand.sort(dim=1)
    for j in range(1, k):
        cand[:, j] = torch.maximum(cand[:, j], cand[:, j - 1] + 1)
    cand = torch.randperm(v, **kw)[cand % v]  # Zipf over a random order of the ids
    rank = torch.arange(1, k + 1, dtype=torch.float32, device=device)
    # Weights falling with log(rank): candidate logits ~ |c|^2 (log V - log rank).
    weights = (math.log(v) - torch.log(rank)) / (c[cand].norm(dim=2) ** 2 + 1e-6)
    e = torch.einsum("nk,nkd->nd", weights, c[cand]) + 0.1 * torch.randn(n, d, **kw) / math.sqrt(d)
    pick = torch.multinomial((1.0 / rank).expand(n, k), 1, generator=gen)[:, 0]
    targets = cand.gather(1, pick[:, None])[:, 0]
    return e.to(dtype), c.to(dtype), targets
