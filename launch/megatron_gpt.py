"""Example: train a Megatron-Core GPT whose output-layer loss is cce-dist's, with torchrun.

    torchrun --nproc-per-node 2 launch/megatron_gpt.py --steps 20 [--loss native] [--tied]
    torchrun --nproc-per-node 4 launch/megatron_gpt.py --tp 2 --ddp --dist-opt \
        --grad-accum-fusion --micro-batches 4        # TP=2 x DP=2, Megatron's real stack
    torchrun --nproc-per-node 2 launch/megatron_gpt.py --tp 1 --pp 2 --ddp   # on GPUs

The one-line switch is the model class: ``CCEGPTModel`` instead of ``GPTModel``, same
arguments. Ranks: ``--tp`` x ``--pp`` x data parallel (the rest). A step runs ``--micro-batches``
micro-batches through Megatron's own schedule (pipelined with ``--pp`` > 1). ``--ddp`` wraps the
model in Megatron's ``DistributedDataParallel`` (fp32 gradient buffers, overlapped reduction) and
steps Megatron's Adam with gradient clipping; ``--dist-opt`` shards it (distributed optimizer);
``--grad-accum-fusion`` adds the output layer's gradient straight into DDP's fp32 ``main_grad``
(cce-dist's loss does so without APEX; Megatron's own loss needs APEX's fused kernels for it).
``--cp`` (context parallelism) needs Transformer Engine's attention and is refused without it.
On the CPU, ``--ddp`` steps torch's AdamW, unclipped, on DDP's ``main_grad`` (Megatron's
optimizers hold CUDA tensors).

Data: the embedded corpus of launch/train.py (the Python standard library's sources and a
cached BPE tokenizer). On a machine without GPUs it runs over gloo on the CPU with two small
shims (Megatron-Core assumes a CUDA device); the distributed optimizer and the pipeline schedule
need CUDA there. At the end rank 0 prints a summary line: the median step time after
``--warmup`` steps, the peak GPU memory (``peak_mb``; on the CPU rank 0's peak RSS,
``peak_rss_mb``), tokens/s (the job's and per GPU) and the parallel layout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_cleanly, peak_memory_field, token_windows  # noqa: E402
from tokenizer import corpus_token_ids  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", choices=("cce", "native"), default="cce")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=1, help="per step (accumulated)")
    p.add_argument("--tied", action="store_true", help="share embedding and output weights")
    p.add_argument("--tp", type=int, default=0, help="tensor parallel (default: all ranks / pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel stages")
    p.add_argument("--cp", type=int, default=1, help="context parallel (Transformer Engine)")
    p.add_argument("--ddp", action="store_true", help="Megatron's DDP and optimizer")
    p.add_argument("--dist-opt", action="store_true", help="distributed optimizer (with --ddp)")
    p.add_argument("--grad-accum-fusion", action="store_true",
                   help="output-layer gradient straight into main_grad (with --ddp)")
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    args = p.parse_args(argv)
    if args.dist_opt or args.grad_accum_fusion:
        args.ddp = True
    return args


def check_layout(args, world: int, cuda: bool) -> None:
    """Refuse, before any model is built, what this machine or layout cannot run."""
    if args.cp > 1:
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            raise SystemExit("--cp: Megatron-Core's context parallelism runs only in Transformer "
                             "Engine's attention (TEDotProductAttention), which is not installed")
        raise SystemExit("--cp: this example builds the local (non-TE) layer spec; use "
                         "Megatron-LM's pretrain_gpt.py with CCEGPTModel for CP")
    if not cuda and (args.dist_opt or args.pp > 1):
        raise SystemExit("--dist-opt and --pp need CUDA: Megatron-Core places their buffers "
                         "on the GPU")
    if args.loss == "native" and args.grad_accum_fusion:
        from megatron.core.tensor_parallel import layers

        if not layers._grad_accum_fusion_available:
            raise SystemExit("--grad-accum-fusion with --loss native needs APEX's "
                             "fused_weight_gradient_mlp_cuda (cce-dist's loss does not)")
    if world % (args.tp * args.pp):
        raise SystemExit(f"{world} ranks are not a multiple of tp x pp = {args.tp * args.pp}")
    if args.pp > 1 and not args.ddp:
        raise SystemExit("--pp needs --ddp: Megatron's finalize_model_grads, which all-reduces "
                         "the tied embedding's copies between stages, works on DDP's buffers")
    if world > args.tp * args.pp and not args.ddp:
        raise SystemExit("data parallelism (ranks beyond tp x pp) needs --ddp: without it "
                         "nothing would average the replicas' gradients")


def build(args, cuda: bool, padded: int):
    """The (DDP-wrapped) model of this pipeline stage, its optimizer, and the config."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cce_dist.megatron import CCEGPTModel

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32,
        gradient_accumulation_fusion=args.grad_accum_fusion and args.loss == "native",
    )
    kw = dict(vocab_size=padded, max_sequence_length=args.seq_len,
              share_embeddings_and_output_weights=args.tied,
              pre_process=parallel_state.is_pipeline_first_stage(),
              post_process=parallel_state.is_pipeline_last_stage())
    if args.loss == "cce":  # the one-line switch
        model = CCEGPTModel(config, get_gpt_layer_local_spec(),
                            cce_main_grad=args.grad_accum_fusion, **kw)
    else:
        model = GPTModel(config, get_gpt_layer_local_spec(), **kw)
    model.to(torch.device("cuda") if cuda else torch.device("cpu"))
    if not args.ddp:
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), config
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True,
        use_distributed_optimizer=args.dist_opt), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func, config.grad_sync_func = model.no_sync, model.start_grad_sync
    if not cuda:  # Megatron's optimizers keep CUDA scalars: step torch's on the main_grads
        return model, MainGradAdamW(model.module.parameters(), lr=1e-3), config
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=args.dist_opt),
        [model])
    return model, opt, config


def cpu_schedule(model, forward_step, micro, args, config) -> list:
    """On the CPU (Megatron's schedules keep CUDA tensors): what ``forward_backward_no_pipelining``
    does, micro-batches accumulated without gradient sync until the last, then the
    gradients finalized (DDP's reduction) as Megatron's ``finalize_model_grads`` does."""
    out = []
    for m, chunk in enumerate(micro):
        sync = m == len(micro) - 1 or not args.ddp
        with contextlib.nullcontext() if sync else model.no_sync():
            per_token, loss_func = forward_step(iter([chunk]), model)
            loss, logged = loss_func(per_token)
            (loss / len(micro)).backward()
        out.append(logged)
    if args.ddp:
        config.finalize_model_grads_func([model])
    return out


class MainGradAdamW(torch.optim.AdamW):
    """On the CPU: AdamW on DDP's reduced fp32 ``main_grad``s, as Megatron's ``FP32Optimizer``
    steps them on a GPU; without its gradient clipping, whose norm spans the tensor-parallel
    ranks (a per-rank clip would scale the ranks' replicated weights apart)."""

    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            p.grad = p.main_grad
        super().step()
        for p in params:
            p.grad = None


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    args.tp = args.tp or world // args.pp
    if not cuda:
        from cce_dist.megatron import cpu_shims

        cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    check_layout(args, world, cuda)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=args.pp)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    ids = corpus_token_ids(args.data, args.vocab_size)
    padded = -(-args.vocab_size // (128 * args.tp)) * 128 * args.tp  # Megatron pads to 128 * tp
    model, opt, config = build(args, cuda, padded)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    position = torch.arange(args.seq_len, device=device)[None].expand(args.batch, -1)
    mask = torch.triu(torch.ones(args.seq_len, args.seq_len, device=device), 1).bool()[None, None]
    last_stage = parallel_state.is_pipeline_last_stage()

    def forward_step(data_iterator, model):
        chunk = next(data_iterator)
        per_token = model(chunk[:, :-1], position, mask, labels=chunk[:, 1:])  # [b, s]

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}
        return per_token, loss_func

    times = []
    for step in range(args.steps):
        # Each data-parallel rank reads its own windows; TP and PP ranks of a replica alike.
        micro = [token_windows(ids, args.batch, args.seq_len + 1,
                               seed=(step * dp + dp_rank) * args.micro_batches + m).to(device)
                 for m in range(args.micro_batches)]
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if args.ddp:
            model.zero_grad_buffer()
        opt.zero_grad()
        if cuda:
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                num_microbatches=args.micro_batches, seq_length=args.seq_len,
                micro_batch_size=args.batch, forward_only=False)
        else:
            out = cpu_schedule(model, forward_step, micro, args, config)
        opt.step()
        # The step's mean loss over micro-batches and data-parallel ranks, on every rank (the
        # last stage has it): also waits for the step, so the timing below is the step's.
        mine = sum(float(o["loss"]) for o in out) / args.micro_batches if last_stage else 0.0
        shown = torch.tensor([mine / (dp * args.tp)], device=device)
        dist.all_reduce(shown)
        times.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps} {args.loss} loss {shown.item():.4f}", flush=True)
    step_ms = 1e3 * statistics.median(times[args.warmup:] or times)
    peak = peak_memory_field(cuda)
    tokens = args.batch * args.seq_len * args.micro_batches * dp
    tokens_per_s = tokens / step_ms * 1e3
    if dist.get_rank() == 0:
        print(f"summary loss={args.loss} tp={args.tp} tied={int(args.tied)} step_ms={step_ms:.1f} "
              f"{peak} tokens_per_s={tokens_per_s:.0f} "
              f"tokens_per_s_per_gpu={tokens_per_s / world:.0f} pp={args.pp} dp={dp} "
              f"micro_batches={args.micro_batches} ddp={int(args.ddp)} "
              f"dist_opt={int(args.dist_opt)} grad_accum_fusion={int(args.grad_accum_fusion)}",
              flush=True)
    parallel_state.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()
    exit_cleanly()


if __name__ == "__main__":
    main()
