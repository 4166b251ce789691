"""Does the loss still run after torch.compile compiled another big loss in the process?"""
import os, traceback, torch, torch.nn.functional as F
from cce_dist import linear_cross_entropy
from cce_dist.testing import make_inputs
e, c, t = make_inputs("lm", 8192, 2304, 256000, device="cuda")
e.requires_grad_(), c.requires_grad_()
f = torch.compile(lambda e, c, t: F.cross_entropy((e @ c.T).float(), t))
l = f(e, c, t); torch.autograd.grad(l, (e, c)); del l
for eps in (None, "auto"):
    try:
        l = linear_cross_entropy(e, c, t, filter_eps=eps); g = torch.autograd.grad(l, (e, c)); print("after compile ok", eps, l.item())
    except Exception:
        traceback.print_exc()
