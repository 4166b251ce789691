"""A Megatron-Core GPT training step with its own loss and with cce-dist's (CCEGPTModel).

Launch one process per GPU: ``torchrun --nproc_per_node=TP benchmarks/bench_megatron_step.py``.
Both models are built from the same config (local layer spec: no Transformer Engine or Apex on
the machine), bf16, untied embeddings, the vocabulary padded to a multiple of 128 x TP as
Megatron's training script pads it; one step is forward with labels, the mean loss, backward and
a torch AdamW step. Printed per model: the first loss (the two must agree), the median step time
after ``--warmup`` steps, and rank 0's peak allocated memory during the timed steps: over the
whole step, over forward + backward only, and that peak above what was allocated when the step
began (weights, gradients, optimizer states): the activations' and the loss's share.

``--ddp``: Megatron's real stack instead: ``Float16Module``, ``DistributedDataParallel`` (fp32
gradient buffers, overlapped reduction), the distributed optimizer (``--dist-opt``), Adam, and
``--micro`` micro-batches per step through Megatron's schedule. A third model is then timed:
cce-dist with ``cce_main_grad=True``, whose output-layer gradient goes straight into DDP's fp32
``main_grad`` (Megatron's gradient-accumulation fusion protocol).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import torch
import torch.distributed as dist


def build(kind: str, args, tp: int):
    """(model, padded vocabulary): ``kind`` is native, cce, or cce-main-grad."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cce_dist.megatron import CCEGPTModel

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, params_dtype=torch.bfloat16, bf16=True,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
    )
    if args.ddp:
        cfg.params_dtype = torch.float32  # Float16Module casts; the optimizer keeps fp32 masters
    padded = -(-args.vocab // (128 * tp)) * (128 * tp)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    kw = dict(vocab_size=padded, max_sequence_length=args.seq, parallel_output=True,
              share_embeddings_and_output_weights=args.tied)
    if kind == "native":
        model = GPTModel(cfg, get_gpt_layer_local_spec(), **kw)
    else:
        model = CCEGPTModel(cfg, get_gpt_layer_local_spec(), cce_main_grad=kind == "cce-main-grad",
                            cce_filter_eps=args.filter_eps, **kw)
    if not args.ddp:
        return model.cuda().bfloat16(), padded  # what Megatron's Float16Module does
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    model = Float16Module(cfg, model.cuda())
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        use_distributed_optimizer=args.dist_opt), model)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func, cfg.grad_sync_func = ddp.no_sync, ddp.start_grad_sync
    return ddp, padded


def ddp_step_stats(model, args) -> dict:
    """Megatron's step: schedule over ``--micro`` micro-batches, then the Megatron optimizer."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-5, bf16=True, clip_grad=1.0,
        use_distributed_optimizer=args.dist_opt), [model])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.micro, args.batch, args.seq + 1), generator=g)
    tokens = tokens.cuda()
    position = torch.arange(args.seq, device="cuda")[None].expand(args.batch, -1)
    losses = []

    def forward_step(data_iterator, model):
        chunk = next(data_iterator)
        out = model(chunk[:, :-1], position, None, labels=chunk[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}
        return out, loss_func

    times, first, step_peak = [], None, 0.0
    for step in range(args.warmup + args.iters):
        timed = step >= args.warmup
        if timed:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(tokens), model=[model],
            num_microbatches=args.micro, seq_length=args.seq, micro_batch_size=args.batch,
            forward_only=False)
        opt.step()
        end.record()
        torch.cuda.synchronize()
        losses.append(float(out[0]["loss"]))
        if first is None:
            first = losses[-1]
        if timed:
            times.append(start.elapsed_time(end))
            step_peak = max(step_peak, torch.cuda.max_memory_allocated())
    return dict(first_loss=first, last_loss=losses[-1], step_ms=statistics.median(times),
                peak_mb=step_peak / 2.0 ** 20, micro=args.micro, dist_opt=args.dist_opt)


def step_stats(model, args, padded) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).cuda()
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position = torch.arange(args.seq, device="cuda")[None].expand(args.batch, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, first = [], None
    step_peak = fwbw_peak = fwbw_extra = 0.0
    for step in range(args.warmup + args.iters):
        timed = step >= args.warmup
        if timed:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        loss = model(inputs, position, None, labels=labels).mean()
        loss.backward()
        if timed:  # allocator statistics are host-side: reading them does not sync
            peak = torch.cuda.max_memory_allocated()
            fwbw_peak, fwbw_extra = max(fwbw_peak, peak), max(fwbw_extra, peak - base)
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if first is None:
            first = loss.item()
        if timed:
            times.append(start.elapsed_time(end))
            step_peak = max(step_peak, torch.cuda.max_memory_allocated())
    mb = 2.0 ** 20
    return dict(first_loss=first, step_ms=statistics.median(times), peak_mb=step_peak / mb,
                fwbw_peak_mb=fwbw_peak / mb, fwbw_extra_mb=fwbw_extra / mb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default="")
    p.add_argument("--tied", action="store_true")
    p.add_argument("--filter-eps", default="auto", type=lambda x: None if x == "none" else (
        x if x == "auto" else float(x)))
    p.add_argument("--ddp", action="store_true", help="Megatron's DDP, optimizer and schedule")
    p.add_argument("--dist-opt", action="store_true", help="with --ddp: distributed optimizer")
    p.add_argument("--micro", type=int, default=4, help="with --ddp: micro-batches per step")
    p.add_argument("--kinds", default="", help="comma-separated subset of the models (one per "
                   "process gives each a clean allocator)")
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    from megatron.core import parallel_state

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rows = []
    kinds = ("native", "cce", "cce-main-grad") if args.ddp else ("native", "cce")
    if args.kinds:
        kinds = tuple(k for k in args.kinds.split(",") if k)
    for kind in kinds:
        model, padded = build(kind, args, tp)
        stats = ddp_step_stats(model, args) if args.ddp else step_stats(model, args, padded)
        row = dict(loss=kind, tp=tp, hidden=args.hidden, layers=args.layers, vocab=padded,
                   seq=args.seq, batch=args.batch, tied=args.tied, **stats)
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
        del model
        gc.collect()  # the DDP wrapper and its config refer to each other
        torch.cuda.empty_cache()
    if dist.get_rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
