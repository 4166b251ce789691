"""Example: train a Megatron-Core GPT whose output-layer loss is cce-dist's, with torchrun.

    torchrun --nproc-per-node 2 launch/megatron_gpt.py --steps 20 [--loss native] [--tied]

Tensor parallelism over all ranks. The one-line switch is the model class: ``CCEGPTModel``
instead of ``GPTModel``, same arguments. Data: the embedded corpus of launch/train.py (the
Python standard library's sources and a cached BPE tokenizer). On a machine without GPUs it runs
over gloo on the CPU with two small shims (Megatron-Core assumes a CUDA device). At the end rank 0
prints a summary line: the median step time after ``--warmup`` steps, the peak GPU memory
(``peak_mb``; on the CPU rank 0's peak RSS, ``peak_rss_mb``) and tokens/s (the job's and per GPU).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", choices=("cce", "native"), default="cce")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tied", action="store_true", help="share embedding and output weights")
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        from cce_dist.megatron import cpu_shims

        cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cce_dist.megatron import CCEGPTModel

    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    ids = corpus_token_ids(args.data, args.vocab_size)
    padded = -(-args.vocab_size // (128 * tp)) * 128 * tp  # Megatron pads to 128 * tp

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp,
    )
    model_class = CCEGPTModel if args.loss == "cce" else GPTModel  # the one-line switch
    model = model_class(config, get_gpt_layer_local_spec(), vocab_size=padded,
                        max_sequence_length=args.seq_len,
                        share_embeddings_and_output_weights=args.tied)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    position = torch.arange(args.seq_len, device=device)[None].expand(args.batch, -1)
    mask = torch.triu(torch.ones(args.seq_len, args.seq_len, device=device), 1).bool()[None, None]
    times = []
    for step in range(args.steps):
        chunk = token_windows(ids, args.batch, args.seq_len + 1, seed=step).to(device)
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        per_token = model(chunk[:, :-1], position, mask, labels=chunk[:, 1:])  # [b, s]
        loss = per_token.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        shown = loss.item()  # also waits for the step: the timing below is the step's
        times.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps} {args.loss} loss {shown:.4f}", flush=True)
    step_ms = 1e3 * statistics.median(times[args.warmup:] or times)
    peak = peak_memory_field(cuda)
    tokens_per_s = args.batch * args.seq_len / step_ms * 1e3  # every TP rank sees the batch
    if dist.get_rank() == 0:
        print(f"summary loss={args.loss} tp={tp} tied={int(args.tied)} step_ms={step_ms:.1f} "
              f"{peak} tokens_per_s={tokens_per_s:.0f} "
              f"tokens_per_s_per_gpu={tokens_per_s / tp:.0f}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()
    exit_cleanly()


if __name__ == "__main__":
    main()
