"""CCEGPTModel (and cce_output_processor on megatron-core 0.18+) against Megatron-Core's own
GPTModel: TP=2 over gloo on the CPU, TP=2 and 4 over NCCL on GPUs; tied and untied embeddings,
sequence parallelism on and off."""

import dataclasses
import inspect

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from distributed import free_port, run_ranks  # noqa: E402

SEQ, BATCH, VOCAB, PADDED = 16, 2, 250, 256  # the vocabulary is padded to a multiple of 128


class SequenceParallelNorm(torch.nn.LayerNorm):
    """A torch LayerNorm that accepts sequence parallelism (Megatron's torch fallback refuses
    it; Apex and TE norms are not installed here). Its weights are marked as Megatron marks
    them; both models under test use it, so it takes no part in the comparison."""

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def _layer_spec(num_layers, sequence_parallel):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = get_gpt_layer_local_spec()
    if not sequence_parallel:
        return spec
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelNorm,
        pre_mlp_layernorm=SequenceParallelNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=SequenceParallelNorm)


def _config(sequence_parallel, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                             use_cpu_initialization=True, params_dtype=torch.float32,
                             hidden_dropout=0.0, attention_dropout=0.0,
                             sequence_parallel=sequence_parallel,
                             tensor_model_parallel_size=dist.get_world_size(), **extra)


def _models(tied, sequence_parallel=False, device="cpu", plain=False, **extra):
    """(native GPTModel, CCEGPTModel) with equal weights; ``plain``: two GPTModels."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from cce_dist.megatron import CCEGPTModel

    cfg = _config(sequence_parallel, **extra)
    spec = _layer_spec(cfg.num_layers, sequence_parallel)
    kw = dict(vocab_size=PADDED, max_sequence_length=SEQ, parallel_output=True,
              share_embeddings_and_output_weights=tied)
    native = GPTModel(cfg, spec, **kw).to(device)
    if plain:
        cce = GPTModel(cfg, spec, **kw).to(device)
    else:
        cce = CCEGPTModel(cfg, spec, cce_filter_eps=None, **kw).to(device)
    cce.load_state_dict(native.state_dict())
    return native, cce


def _batch(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    position = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]
    return tuple(x.to(device) for x in (tokens, position, mask, labels))


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _has_output_processor():
    from megatron.core.models.gpt.gpt_model import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def _check_parity(native, cce, device, what, processor=None):
    """Loss, every parameter gradient, logits without labels, and 3 Adam steps."""
    extra = {} if processor is None else {"output_processor": processor,
                                          "output_processor_context": {"filter_eps": None}}
    tokens, position, mask, labels = _batch(1, device)
    want = native(tokens, position, mask, labels=labels)
    got = cce(tokens, position, mask, labels=labels, **extra)
    assert got.shape == want.shape == (BATCH, SEQ) and got.dtype == torch.float32
    assert _rel(got, want) < 1e-5, (what, _rel(got, want))
    want.mean().backward()
    got.mean().backward()
    grads = dict(native.named_parameters())
    for name, p in cce.named_parameters():
        ref = grads[name].grad
        assert p.grad is not None and _rel(p.grad, ref) < 1e-4, (what, name, _rel(p.grad, ref))
    # Without labels both return the same (vocabulary-parallel) logits.
    with torch.no_grad():
        assert torch.equal(cce(tokens, position, mask, **extra), native(tokens, position, mask))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (native, cce)]
    for step in range(3):
        tokens, position, mask, labels = _batch(10 + step, device)
        losses = []
        for model, opt, kw in zip((native, cce), opts, ({}, extra)):
            opt.zero_grad()
            loss = model(tokens, position, mask, labels=labels, **kw).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0]), (what, step, losses)


def _parity_worker(rank, world, device="cpu"):
    from megatron.core import parallel_state

    from cce_dist.megatron import cce_output_processor, cpu_shims

    if device == "cpu":
        cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    for tied, sp in ((False, False), (True, False), (False, True), (True, True)):
        torch.manual_seed(0)
        native, cce = _models(tied, sp, device)
        _check_parity(native, cce, device, (tied, sp))
        if _has_output_processor():  # megatron-core 0.18+: a plain GPTModel and the processor
            torch.manual_seed(0)
            native, plain = _models(tied, sp, device, plain=True)
            _check_parity(native, plain, device, (tied, sp, "processor"),
                          processor=cce_output_processor)
    if "use_mup" in {f.name for f in dataclasses.fields(_config(False).__class__)}:
        torch.manual_seed(0)  # MuP's output multiplier (0.5 at width multiplier 2)
        native, cce = _models(False, False, device, use_mup=True, mup_base_hidden_size=16)
        assert native.config.mup_output_mult == 0.5
        _check_parity(native, cce, device, "mup")
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


def _module_worker(rank, world, sequence_parallel):
    """CCELinearCrossEntropyModule against ColumnParallelLinear + Megatron's
    vocab_parallel_cross_entropy of its logits: logits, loss per reduction, dE, dW."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    from cce_dist.megatron import CCELinearCrossEntropyModule, cpu_shims

    cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cfg = _config(sequence_parallel)
    kw = dict(config=cfg, init_method=torch.nn.init.normal_, bias=False, gather_output=False)
    torch.manual_seed(0)
    native = ColumnParallelLinear(32, PADDED, **kw)
    cce = CCELinearCrossEntropyModule(32, PADDED, cce_filter_eps=None, **kw)
    cce.load_state_dict(native.state_dict())
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(SEQ, BATCH, 32, generator=g)  # [s, b, h], the full sequence
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    local = hidden.chunk(world)[rank] if sequence_parallel else hidden
    with torch.no_grad():  # without labels: the same logits
        assert torch.equal(cce(local)[0], native(local)[0])
    for reduction in ("none", "mean", "sum"):
        inputs = [local.clone().requires_grad_() for _ in range(2)]
        logits, _ = native(inputs[0])
        per_token = vocab_parallel_cross_entropy(logits.float(),
                                                 labels.transpose(0, 1).clamp(min=0).contiguous())
        per_token = torch.where(labels.transpose(0, 1) == -100, 0.0, per_token).transpose(0, 1)
        valid = (labels != -100).sum()
        want = {"none": per_token, "mean": per_token.sum() / valid, "sum": per_token.sum()}[
            reduction]
        got = cce(inputs[1], output_cross_entropy_loss=True, labels=labels, reduction=reduction)
        assert got.shape == want.shape and _rel(got, want) < 1e-5, (reduction, _rel(got, want))
        native.weight.grad = cce.weight.grad = None
        want.sum().backward()
        got.sum().backward()
        assert _rel(inputs[1].grad, inputs[0].grad) < 1e-5, reduction
        assert _rel(cce.weight.grad, native.weight.grad) < 1e-5, reduction
    with pytest.raises(ValueError, match="labels"):
        cce(local, output_cross_entropy_loss=True)
    parallel_state.destroy_model_parallel()


def _mtp_worker(rank, world):
    """With multi-token prediction, CCEGPTModel hands the output stage to Megatron: the same
    losses and gradients as GPTModel, bit for bit, and cce-dist's loss is never called."""
    from unittest import mock

    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_mtp_block_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel

    from cce_dist import megatron as cce_megatron

    cce_megatron.cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    cfg = _config(False, mtp_num_layers=1, mtp_loss_scaling_factor=0.1)
    spec = get_gpt_layer_local_spec()
    kw = dict(vocab_size=PADDED, max_sequence_length=SEQ, parallel_output=True,
              mtp_block_spec=get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False))
    torch.manual_seed(0)
    native = GPTModel(cfg, spec, **kw)
    cce = cce_megatron.CCEGPTModel(cfg, spec, **kw)
    cce.load_state_dict(native.state_dict())
    tokens, position, mask, labels = _batch(1)
    with mock.patch.object(cce_megatron, "linear_cross_entropy",
                           side_effect=AssertionError("CCE must not serve MTP")):
        got = cce(tokens, position, mask, labels=labels)
    want = native(tokens, position, mask, labels=labels)
    assert torch.equal(got, want)
    got.mean().backward()
    want.mean().backward()
    grads = dict(native.named_parameters())
    for name, p in cce.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[name].grad), name
    parallel_state.destroy_model_parallel()


def test_multi_token_prediction_falls_back_to_megatron_tp2():
    run_ranks(2, _mtp_worker)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_linear_cross_entropy_module_matches_megatron_tp2(sequence_parallel):
    run_ranks(2, _module_worker, sequence_parallel)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_cce_gpt_matches_megatron_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_ranks(world, _parity_worker, "cuda", backend="nccl")


def _example(tmp_path, loss, *flags):
    """launch/megatron_gpt.py on 2 gloo ranks: (per-step losses, summary line)."""
    import os
    import re
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), str(root / "launch" / "megatron_gpt.py"),
         "--steps", "4", "--loss", loss, "--vocab-size", "600", "--hidden", "32",
         "--seq-len", "16", "--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json"),
         *flags],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("summary ") == 1  # rank 0's, once
    summary = run.stdout[run.stdout.index("summary "):].splitlines()[0]
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)], summary


def test_megatron_example_with_ddp_and_grad_accum_fusion(tmp_path):
    """Data parallel x 2 with Megatron's DDP and optimizer, 2 micro-batches per step: the CCE
    head with its gradient straight into main_grad trains Megatron's own curve."""
    flags = ("--tp", "1", "--ddp", "--micro-batches", "2")
    want, _ = _example(tmp_path, "native", *flags)
    got, summary = _example(tmp_path, "cce", *flags, "--grad-accum-fusion")
    assert len(got) == len(want) == 4
    assert all(abs(a - b) < 1e-3 for a, b in zip(got, want)), (got, want)
    assert "tp=1 " in summary and " dp=2 micro_batches=2 ddp=1 dist_opt=0 " \
        "grad_accum_fusion=1" in summary, summary


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
        summary = re.search(rf"summary loss={loss} tp=2 tied=0 step_ms=[\d.]+ "
                            r"peak_(rss_)?mb=(\d+) tokens_per_s=\d+ tokens_per_s_per_gpu=\d+",
                            run.stdout)
        assert summary, run.stdout[-2000:]  # rank 0's summary line, once
        assert run.stdout.count("summary ") == 1
    assert len(curves["cce"]) == 4
    assert all(abs(a - b) < 1e-3 for a, b in zip(curves["cce"], curves["native"])), curves


def run_on_megatron_core_0_19(code: str, timeout: int) -> None:
    """Run ``code`` (Python, from tests/) in a subprocess under megatron-core 0.19.2, which
    scripts/setup.sh unpacks beside the venv (pip installs it only on Python >= 3.12); skip
    when 0.19 is the installed version (the in-process tests cover it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import megatron.core

    root = Path(__file__).resolve().parents[1]
    newer = root / ".cache" / "megatron-core-0.19.2"
    if megatron.core.__version__.startswith("0.19"):
        pytest.skip("megatron-core 0.19 is the installed version: the in-process test covers it")
    assert (newer / "megatron").is_dir(), "run scripts/setup.sh: it unpacks megatron-core 0.19.2"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(newer), str(root / "tests")]))
    run = subprocess.run(
        [sys.executable, "-c", "import megatron.core as m; print(m.__version__); " + code],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=root / "tests")
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.startswith("0.19.2"), run.stdout[:200]


def test_cce_gpt_matches_megatron_0_19_on_cpu():
    """The same TP=2 parity (SP, output_processor and MuP included) against megatron-core 0.19."""
    run_on_megatron_core_0_19("import test_megatron as t; t.run_ranks(2, t._parity_worker)", 600)
