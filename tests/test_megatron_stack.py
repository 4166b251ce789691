"""CCEGPTModel inside Megatron-Core's real training stack, against Megatron's own loss.

Megatron's ``DistributedDataParallel`` (overlapped and not), the distributed optimizer, Adam
with gradient clipping, gradient accumulation over micro-batches through Megatron's own
schedules, pipeline parallelism (with the tied embedding's all-reduce between the first and
last stage), sequence parallelism, and the loss's ``main_grad`` path (dC added straight into
DDP's fp32 buffer). Both models start from the same weights and see the same data; the test
compares every micro-batch loss, every parameter's ``main_grad`` after the reduction, the
gradient norm, and every parameter after 3 optimizer steps.

On the CPU over gloo. Megatron hard-codes ``device="cuda"`` in a few tensor factories of the
distributed optimizer and the pipeline schedules, and checks ``Tensor.type()`` for
``torch.cuda.*``; ``_cpu_device_shims`` redirects those to the CPU (placement only: every
Megatron code path runs as on a GPU). The same workers run over NCCL on GPUs.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from distributed import run_ranks
from test_megatron import BATCH, PADDED, SEQ, _layer_spec, _rel, run_on_megatron_core_0_19

MICRO = 3  # micro-batches per step: gradient accumulation
STEPS = 3


def _cpu_device_shims() -> None:
    """Let the distributed optimizer and the pipeline schedules run on CPU tensors."""
    from torch.overrides import TorchFunctionMode

    from cce_dist.megatron import cpu_shims

    cpu_shims()
    factories = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full,
                 torch.arange, torch.zeros_like, torch.ones_like, torch.empty_like}

    class CudaFactoriesOnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.cuda:  # the tied embedding's all-reduce at construction
                return args[0]
            kwargs = dict(kwargs or {})
            if func in factories and "cuda" in str(kwargs.get("device", "")):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    CudaFactoriesOnCpu().__enter__()  # for the rest of this worker process
    tensor_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = tensor_type(self, *args, **kwargs)
        if args or kwargs or not name.startswith("torch.") or name.startswith("torch.cuda."):
            return name
        return "torch.cuda." + name[len("torch."):]

    torch.Tensor.type = cuda_type
    torch.cuda.synchronize = lambda *a, **k: None

    class NoStream:  # megatron-core 0.19 waits on CUDA-graph events before each reduction
        def wait_event(self, event):
            raise AssertionError("no CUDA graph runs on the CPU")

    torch.cuda.current_stream = lambda *a, **k: NoStream()


@dataclasses.dataclass(frozen=True)
class Stack:
    tp: int = 2
    pp: int = 1
    dist_opt: bool = False
    overlap: bool = False
    tied: bool = False
    sp: bool = False
    main_grad: bool = False  # CCEGPTModel(cce_main_grad=...)


def _build(stack: Stack, device, cce: bool, state=None):
    """A Megatron DDP-wrapped (CCE)GPTModel of this pipeline stage and its Megatron optimizer."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cce_dist.megatron import CCEGPTModel

    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        sequence_parallel=stack.sp, tensor_model_parallel_size=stack.tp,
        pipeline_model_parallel_size=stack.pp, pipeline_dtype=torch.float32,
        batch_p2p_sync=device != "cpu")
    kw = dict(vocab_size=PADDED, max_sequence_length=SEQ, parallel_output=True,
              share_embeddings_and_output_weights=stack.tied,
              pre_process=parallel_state.is_pipeline_first_stage(),
              post_process=parallel_state.is_pipeline_last_stage())
    spec = _layer_spec(cfg.num_layers // stack.pp, stack.sp)
    torch.manual_seed(0)
    if cce:
        model = CCEGPTModel(cfg, spec, cce_filter_eps=None, cce_main_grad=stack.main_grad, **kw)
    else:
        model = GPTModel(cfg, spec, **kw)
    model = model.to(device)
    if state is not None:
        model.load_state_dict(state)
    state = model.state_dict()  # loaded into the other model before either trains
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=stack.overlap,
        use_distributed_optimizer=stack.dist_opt, bucket_size=4000 if stack.overlap else None)
    model = DistributedDataParallel(cfg, ddp_cfg, model)
    cfg.finalize_model_grads_func = finalize_model_grads
    if stack.overlap:
        cfg.no_sync_func = model.no_sync
        cfg.grad_sync_func = model.start_grad_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=stack.dist_opt), [model])
    return model, opt, state


def _micro_batches(step, device):
    from megatron.core import parallel_state
    from test_megatron import _batch

    dp = parallel_state.get_data_parallel_rank()
    return [_batch(1000 * step + 10 * dp + m, device) for m in range(MICRO)]


def _train_step(model, opt, batches):
    """One optimizer step over MICRO micro-batches with Megatron's schedule; returns the
    micro-batch losses (last stage; empty elsewhere), every main_grad, and the grad norm."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        tokens, position, mask, labels = next(data_iterator)
        return model(tokens, position, mask, labels=labels), loss_func

    model.zero_grad_buffer()
    opt.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
    grads = {name: p.main_grad.clone() for name, p in model.module.named_parameters()}
    # DDP's hook dropped every autograd gradient (the loss's placeholder too) and knows which
    # main_grads the loss filled itself.
    assert all(p.grad is None for p in model.module.parameters())
    model.flags = {name: p.grad_added_to_main_grad
                   for name, p in model.module.named_parameters()}
    ok, grad_norm, _ = opt.step()
    assert ok
    return [float(o["loss"]) for o in out], grads, grad_norm


def _stack_worker(rank, world, stacks, device="cpu"):
    from megatron.core import parallel_state

    if device == "cpu":
        _cpu_device_shims()
    for stack in stacks:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=stack.tp, pipeline_model_parallel_size=stack.pp)
        if device == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
        native, native_opt, state = _build(stack, device, cce=False)
        cce, cce_opt, _ = _build(stack, device, cce=True, state=state)
        for step in range(STEPS):
            batches = _micro_batches(step, device)
            want_losses, want_grads, want_norm = _train_step(native, native_opt, batches)
            got_losses, got_grads, got_norm = _train_step(cce, cce_opt, batches)
            what = (stack, step)
            assert len(got_losses) == len(want_losses)
            assert len(want_losses) == (MICRO if parallel_state.is_pipeline_last_stage() else 0)
            for a, b in zip(got_losses, want_losses):
                assert abs(a - b) < 1e-5 * abs(b), (what, got_losses, want_losses)
            assert abs(got_norm - want_norm) < 1e-4 * want_norm, (what, got_norm, want_norm)
            # From the second step on, the weights differ by Adam's ~1e-4 (see below).
            tol = 1e-4 if step == 0 else 1e-3
            for name, ref in want_grads.items():
                assert _rel(got_grads[name], ref) < tol, (what, name, _rel(got_grads[name], ref))
        # Adam divides by the root of the second moment, so the tiniest gradients' 1e-7 relative
        # differences (summation order) move their parameters by up to ~1e-4 of their norm.
        params = dict(native.module.named_parameters())
        for name, p in cce.module.named_parameters():
            assert _rel(p, params[name]) < 1e-3, (stack, name, _rel(p, params[name]))
        # The loss added dC into main_grad itself exactly when asked to, and only there.
        added = [name for name, flag in cce.flags.items() if flag]
        last = parallel_state.is_pipeline_last_stage()
        weight = "embedding.word_embeddings.weight" if stack.tied and stack.pp == 1 else (
            "output_layer.weight")
        assert added == ([weight] if stack.main_grad and last else []), (stack, added)
        assert not any(native.flags.values())
        parallel_state.destroy_model_parallel()
        dist.barrier()


# TP=2 x DP=2: DDP with and without overlap, the distributed optimizer, tied and untied,
# sequence parallelism, main_grad. TP=2 x PP=2: both stage layouts of the tied embedding.
TP2_DP2 = (
    Stack(),
    Stack(overlap=True, tied=True, sp=True, main_grad=True),
    Stack(dist_opt=True, overlap=True, main_grad=True),
    Stack(dist_opt=True, tied=True),
)
TP2_PP2 = (
    Stack(pp=2, tied=True, dist_opt=True, overlap=True, main_grad=True),
    Stack(pp=2, sp=True, main_grad=True),
)


@pytest.mark.parametrize("stacks", [TP2_DP2, TP2_PP2], ids=["tp2xdp2", "tp2xpp2"])
def test_megatron_stack_matches_native(stacks):
    run_ranks(4, _stack_worker, stacks)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_megatron_stack_matches_native_nccl(world):
    """On GPUs (the default engine's cuBLAS products, fp32 accumulation into main_grad)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    stacks = (Stack(tp=world, dist_opt=True, overlap=True, main_grad=True),
              Stack(tp=world, tied=True, sp=world > 1, main_grad=True),
              Stack(tp=world, dist_opt=True, tied=True))
    run_ranks(world, _stack_worker, stacks, "cuda", backend="nccl")


def test_megatron_stack_matches_native_on_megatron_core_0_19():
    """Both stack sets again, under megatron-core 0.19.2."""
    run_on_megatron_core_0_19("import test_megatron_stack as t; "
                              "t.run_ranks(4, t._stack_worker, t.TP2_DP2 + t.TP2_PP2)", 900)
