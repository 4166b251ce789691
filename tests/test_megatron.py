"""CCEGPTModel against Megatron-Core's own GPTModel: TP=2 over gloo on the CPU."""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from distributed import free_port, run_ranks  # noqa: E402

SEQ, BATCH, VOCAB, PADDED = 16, 2, 250, 256  # Megatron pads the vocabulary to 128 * tp


def _models(tied, sequence_parallel=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cce_dist.megatron import CCEGPTModel

    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, params_dtype=torch.float32,
                            hidden_dropout=0.0, attention_dropout=0.0,
                            sequence_parallel=sequence_parallel,
                            tensor_model_parallel_size=dist.get_world_size())
    kw = dict(vocab_size=PADDED, max_sequence_length=SEQ, parallel_output=True,
              share_embeddings_and_output_weights=tied)
    native = GPTModel(cfg, get_gpt_layer_local_spec(), **kw)
    cce = CCEGPTModel(cfg, get_gpt_layer_local_spec(), cce_filter_eps=None, **kw)
    cce.load_state_dict(native.state_dict())
    return native, cce


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    position = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]
    return tokens, position, mask, labels


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _parity_worker(rank, world):
    from cce_dist.megatron import cpu_shims

    cpu_shims()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    for tied, sp in ((False, False), (True, False)):  # SP needs Apex or TE norms: GPU only
        torch.manual_seed(0)
        native, cce = _models(tied, sp)
        tokens, position, mask, labels = _batch(1)
        want = native(tokens, position, mask, labels=labels)
        got = cce(tokens, position, mask, labels=labels)
        assert got.shape == want.shape == (BATCH, SEQ) and got.dtype == torch.float32
        assert _rel(got, want) < 1e-5, (tied, sp, _rel(got, want))
        want.mean().backward()
        got.mean().backward()
        grads = dict(native.named_parameters())
        for name, p in cce.named_parameters():
            ref = grads[name].grad
            assert p.grad is not None and _rel(p.grad, ref) < 1e-4, (tied, sp, name)
        # Without labels both return the same (vocabulary-parallel) logits.
        with torch.no_grad():
            assert torch.equal(cce(tokens, position, mask), native(tokens, position, mask))
        # A few optimizer steps: the same loss curve.
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (native, cce)]
        for step in range(3):
            tokens, position, mask, labels = _batch(10 + step)
            losses = []
            for model, opt in zip((native, cce), opts):
                opt.zero_grad()
                loss = model(tokens, position, mask, labels=labels).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), (tied, step, losses)
    with pytest.raises(ValueError, match="parallel_output=False"):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_config import TransformerConfig

        from cce_dist.megatron import CCEGPTModel

        cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                use_cpu_initialization=True)
        CCEGPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=PADDED,
                    max_sequence_length=SEQ, parallel_output=False)
    parallel_state.destroy_model_parallel()


def test_cce_gpt_matches_megatron_tp2():
    run_ranks(2, _parity_worker)


def test_megatron_example_trains_the_same_curve(tmp_path):
    """launch/megatron_gpt.py under torchrun, CCE head against Megatron's own loss."""
    import os
    import re
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    curves = {}
    for loss in ("cce", "native"):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), str(root / "launch" / "megatron_gpt.py"),
             "--steps", "4", "--loss", loss, "--vocab-size", "600", "--hidden", "32",
             "--seq-len", "16", "--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
            env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        curves[loss] = [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)]
    assert len(curves["cce"]) == 4
    assert all(abs(a - b) < 1e-3 for a, b in zip(curves["cce"], curves["native"])), curves
