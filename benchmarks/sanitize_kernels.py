"""Every kernel path once, at small shapes, for ``compute-sanitizer --tool memcheck``.

Forward and backward on one GPU: exact, budget and per-entry filters; a vocabulary large enough
that the workspace lives in dC's tail rows and one too small for it; ragged N, D and V; an empty
batch; strided targets; bf16, fp16 and fp32. Prints one line per case; the sanitizer reports any
out-of-bounds access or misaligned address.
"""

import torch

from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs

# (64, 128, 12000): large enough that the backward's workspace lives in dC's tail rows.
CASES = [(0, 64, 3000), (64, 128, 12000), (1, 1, 1), (37, 24, 97), (300, 200, 5000)]

for n, d, v in CASES:
    for dtype in (torch.bfloat16, torch.float32):
        for filter_eps in (None, "auto", 2.0**-12):
            e, c, t = make_inputs("lm", n, d, v, dtype=dtype, device="cuda", seed=n)
            e.requires_grad_(), c.requires_grad_()
            t2 = torch.stack([t, t]).T.reshape(-1)[::2] if n else t  # a strided view
            loss = linear_cross_entropy(e, c, t2, filter_eps=filter_eps)
            loss.backward()
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(c.grad).all() and torch.isfinite(e.grad).all())
            print(f"N={n} D={d} V={v} {dtype} filter={filter_eps}: finite={ok}", flush=True)
