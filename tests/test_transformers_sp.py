"""cce_dist.transformers.patch(model, sp_group=...) under DeepSpeed's Ulysses sequence
parallelism, over gloo: a tiny random-init Llama whose attention is DeepSpeed's
UlyssesSPAttentionHF, each SP rank given its slice of the sequence and of the shifted labels.
On every rank the loss is the unpatched single-process model's on the whole sequence, and the
sum over the SP ranks of every parameter's gradient is that model's gradient. SP=2, and SP=2 x
TP=2 on 4 ranks (vocabulary rows shared unevenly by the TP ranks)."""

import copy

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from cce_dist.transformers import patch  # noqa: E402
from distributed import run_ranks  # noqa: E402
from helpers import rel_err  # noqa: E402

B, S = 2, 16  # S is cut into SP slices


pytestmark = pytest.mark.usefixtures("deepspeed_on_cpu")


def _model(vocab):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False)
    config._attn_implementation = "sdpa"  # Ulysses wraps sdpa (not eager)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # outputs far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _cases(vocab):
    """(name, input_ids, labels, num_items_in_batch): the SP ranks' slices of shift_labels hold
    different numbers of valid tokens, so that a per-rank mean differs from the global one."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    prompt = ids.clone()
    prompt[0, :3] = -100
    prompt[1, :6] = -100
    # Every target of the second half ignored: SP rank 1 of 2 has no valid token.
    half = prompt.clone()
    half[:, S // 2 + 1:] = -100
    return [("mean", ids, prompt, None), ("rank without tokens", ids, half, None),
            ("num_items_in_batch", ids, prompt, torch.tensor(37))]


def _shift(labels):
    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]


def _worker(rank, world, tp, vocab):
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    torch.set_num_threads(1)  # up to 4 ranks on CI's 2 cores
    deepspeed.init_distributed(dist_backend="gloo")
    sp_size = world // tp
    ref = _model(vocab)
    positions = torch.arange(S)[None].expand(B, -1)
    # The single-process references, before the Ulysses attention replaces sdpa.
    wants = []
    for name, ids, labels, items in _cases(vocab):
        ref.zero_grad(set_to_none=True)
        kw = {} if items is None else {"num_items_in_batch": items}
        loss = ref(input_ids=ids, labels=labels, position_ids=positions, **kw).loss
        loss.backward()
        wants.append((loss.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()}))
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, "sdpa", sequence_parallel_size=sp_size, micro_batch_size=B)
    sp_group = mpu.get_sequence_parallel_group()  # ranks [k sp, (k+1) sp)
    tp_groups = [dist.new_group(list(range(j, world, sp_size))) for j in range(sp_size)]
    sp_rank = dist.get_rank(sp_group)
    group = tp_groups[sp_rank] if tp > 1 else None
    with pytest.raises(ValueError, match="must share this rank only"):  # local, no collective
        patch(copy.deepcopy(model), group=sp_group, sp_group=sp_group)
    patch(model, group=group, sp_group=sp_group)
    mine = slice(sp_rank * S // sp_size, (sp_rank + 1) * S // sp_size)

    # Bad calls raise on every SP rank before any collective of the model's.
    _, ids, labels, _ = _cases(vocab)[0]
    with pytest.raises(ValueError, match="shift_labels="):  # every rank: labels only
        model(input_ids=ids[:, mine], labels=labels[:, mine], position_ids=positions[:, mine])
    one = {} if sp_rank else {"shift_labels": _shift(labels)[:, mine]}  # rank 1 forgets them
    with pytest.raises(ValueError, match="shift_labels=|rejected"):
        model(input_ids=ids[:, mine], labels=labels[:, mine], position_ids=positions[:, mine],
              **one)
    short = slice(mine.start, mine.stop - sp_rank)  # rank 1's slice one token short
    with pytest.raises(ValueError, match="disagree on the shape of shift_labels"):
        model(input_ids=ids[:, short], shift_labels=_shift(labels)[:, short],
              labels=labels[:, short], position_ids=positions[:, short])

    for (name, ids, labels, items), (want, want_grads) in zip(_cases(vocab), wants):
        model.zero_grad(set_to_none=True)
        kw = {} if items is None else {"num_items_in_batch": items}
        out = model(input_ids=ids[:, mine], labels=labels[:, mine],
                    shift_labels=_shift(labels)[:, mine], position_ids=positions[:, mine], **kw)
        assert out.logits is None
        assert rel_err(out.loss, want.double()) < 1e-5, (rank, name, out.loss, want)
        out.loss.backward()
        for n, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=sp_group)  # DeepSpeed's engine sums over SP ranks
            assert rel_err(grad, want_grads[n].double()) < 1e-4, (rank, name, n)


@pytest.mark.parametrize("world,tp,vocab", [
    (2, 1, 250),  # Ulysses SP=2
    (4, 2, 251),  # SP=2 x TP=2, vocabulary rows 126 + 125
])
def test_loss_and_summed_gradients_equal_the_whole_sequence(world, tp, vocab):
    run_ranks(world, _worker, tp, vocab)


def test_refuses_a_bad_sp_group():
    model = _model(64)
    with pytest.raises(TypeError, match="sp_group"):
        patch(model, sp_group="sp")
    assert getattr(model, "_cce_dist_forward", None) is None  # nothing patched
