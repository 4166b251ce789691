"""A small GPT whose output layer is sharded by vocabulary rows over the ranks.

The body (embeddings, transformer blocks) is replicated: every rank sees the same batch, and the
loss's gradient with respect to the hidden states is the same on every rank, so the replicas stay
identical without any data-parallel reduction. Two losses over the same sharded head:

* ``cce``: ``cce_dist.linear_cross_entropy(..., group=...)``, never holding the logits;
* ``materialized``: the standard way, Megatron's ``parallel_output=False`` path: local logits,
  all-gathered over the vocabulary into the full N x V logits, ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cce_dist import linear_cross_entropy, vocab_range
from options import LOSSES  # noqa: F401  (the --loss choices, defined without torch)


class CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient summed over the group backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherVocab(torch.autograd.Function):
    """(N, V_r) local logits -> (N, V) on every rank; backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        rank = dist.get_rank(group)
        parts = [x.new_empty((x.shape[0], s)) for s in sizes]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.lo = sum(sizes[:rank])
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g):
        rank = dist.get_rank(ctx.group)
        return g[:, ctx.lo:ctx.lo + ctx.sizes[rank]].contiguous(), None, None


class GPTBody(nn.Module):
    """Token and position embeddings, pre-norm causal transformer blocks, a final LayerNorm:
    (batch, seq) ids -> (batch, seq, d_model) hidden states."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int,
                 seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:s]
        return self.norm(self.blocks(x, mask=self.mask[:s, :s], is_causal=True))


class ShardedHeadGPT(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int, seq_len: int,
                 group) -> None:
        super().__init__()
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.sizes = [vocab_range(vocab_size, r, world) for r in range(world)]
        self.sizes = [hi - lo for lo, hi in self.sizes]
        lo, hi = vocab_range(vocab_size, rank, world)
        self.body = GPTBody(vocab_size, d_model, n_layer, n_head, seq_len)
        # This rank's rows of the output layer, initialised from the full matrix so that the
        # model does not depend on the number of ranks.
        full = torch.empty(vocab_size, d_model)
        nn.init.normal_(full, std=d_model ** -0.5)
        self.head = nn.Parameter(full[lo:hi].clone())

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(tokens)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
        return self.head_loss(self.hidden(tokens), targets, kind)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
        """Mean cross-entropy of the output layer on hidden states h (batch, seq, d_model)."""
        if kind == "cce":
            return linear_cross_entropy(h, self.head, targets, group=self.group)
        h = CopyToGroup.apply(h.reshape(-1, h.shape[-1]), self.group)
        logits = _GatherVocab.apply(h @ self.head.T, self.group, self.sizes)
        return F.cross_entropy(logits.float(), targets.reshape(-1))
