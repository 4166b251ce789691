"""A Megatron-Core GPT training step with its own loss and with cce-dist's (CCEGPTModel).

Launch one process per GPU: ``torchrun --nproc_per_node=TP benchmarks/bench_megatron_step.py``.
Both models are built from the same config (local layer spec: no Transformer Engine or Apex on
the machine), bf16, untied embeddings, the vocabulary padded to a multiple of 128 x TP as
Megatron's training script pads it; one step is forward with labels, the mean loss, backward and
a torch AdamW step. Printed per model: the first loss (the two must agree), the median step time
after ``--warmup`` steps, and rank 0's peak allocated memory during the timed steps: over the
whole step, over forward + backward only, and that peak above what was allocated when the step
began (weights, gradients, optimizer states): the activations' and the loss's share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def build(kind: str, args, tp: int):
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
    padded = -(-args.vocab // (128 * tp)) * (128 * tp)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cls = CCEGPTModel if kind == "cce" else GPTModel
    model = cls(cfg, get_gpt_layer_local_spec(), vocab_size=padded,
                max_sequence_length=args.seq, parallel_output=True,
                share_embeddings_and_output_weights=False)
    return model.cuda().bfloat16(), padded  # what Megatron's Float16Module does


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
    args = p.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    from megatron.core import parallel_state

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rows = []
    for kind in ("native", "cce"):
        model, padded = build(kind, args, tp)
        row = dict(loss=kind, tp=tp, hidden=args.hidden, layers=args.layers, vocab=padded,
                   seq=args.seq, batch=args.batch, **step_stats(model, args, padded))
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    if dist.get_rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
