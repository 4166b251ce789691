"""Example: a causal LM trained with deepspeed.initialize and cce-dist's vocabulary-parallel head.

    torchrun --nproc-per-node 2 launch/deepspeed_train.py --tp 2 --zero 2 --steps 20
    deepspeed --num_gpus 2 launch/deepspeed_train.py --tp 2 --zero 3      # the DeepSpeed launcher

The model's ``lm_head`` (an ``nn.Linear``) is swapped for this rank's shard of a
``VocabParallelCCEHead`` by ``convert_lm_head``, and ``make_mpu`` gives DeepSpeed the
tensor-/data-parallel layout (mandatory: see ``cce_dist.deepspeed``). Data: the embedded corpus
of launch/train.py. On a machine without GPUs: ``DS_ACCELERATOR=cpu`` over gloo.

``--loss native`` trains the unconverted model (its ``lm_head`` and ``F.cross_entropy`` on fp32
logits, the usual Hugging Face way; the head is then replicated, ``--tp`` must be 1). At the end
rank 0 prints the median step time after ``--warmup`` steps, the peak GPU memory (``peak_mb``;
on the CPU rank 0's peak RSS, ``peak_rss_mb``) and tokens/s per GPU: the figures of
BENCHMARKS.md's DeepSpeed table.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_cleanly, peak_memory_field, token_windows  # noqa: E402
from model import GPTBody  # noqa: E402
from tokenizer import corpus_token_ids  # noqa: E402


class SmallLM(nn.Module):
    """The GPT body of launch/model.py and an ``nn.Linear`` head, Hugging Face style."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.body = GPTBody(vocab, d, layers, heads, seq)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(tokens))


class NativeLossModel(nn.Module):
    """The original model with the usual loss: full logits, upcast, F.cross_entropy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (divides world)")
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--loss", choices=("cce", "native"), default="cce")
    p.add_argument("--synthetic", action="store_true",
                   help="uniform random tokens instead of the corpus (timing runs)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (DeepSpeed's)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args()

    import deepspeed

    from cce_dist.deepspeed import convert_lm_head, make_mpu

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if args.loss == "native" and args.tp != 1:
        raise SystemExit("--loss native keeps the replicated lm_head: use --tp 1")
    mpu = make_mpu(args.tp)
    if args.synthetic:
        ids = torch.randint(0, args.vocab_size, (1 << 20,),
                            generator=torch.Generator().manual_seed(0))
    else:
        ids = corpus_token_ids(args.data, args.vocab_size)

    torch.manual_seed(0)
    model = SmallLM(args.vocab_size, args.d_model, args.layers, args.heads, args.seq_len)
    if args.loss == "cce":
        model = convert_lm_head(model, group=mpu.get_tensor_model_parallel_group())
    else:
        model = NativeLossModel(model)
    config = {
        "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": args.bf16},
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config,
        mpu=mpu)
    device = engine.device
    dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    times = []
    for step in range(args.steps):
        # Each data-parallel rank its own windows.
        chunk = token_windows(ids, args.batch, args.seq_len, seed=step * dp + dp_rank).to(device)
        if step == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = engine(chunk, labels=chunk)  # the head shifts the labels (causal LM)
        engine.backward(loss)
        engine.step()
        shown = loss.item()  # also waits for the step: the timing below is the step's
        times.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps} zero {args.zero} tp {args.tp} dp {dp} "
                  f"loss {shown:.4f}", flush=True)
    timed = times[args.warmup:] or times
    step_ms = 1e3 * statistics.median(timed)
    peak = peak_memory_field(cuda)
    tokens_per_gpu = args.batch * args.seq_len * dp / dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"summary loss={args.loss} zero={args.zero} tp={args.tp} dp={dp} "
              f"step_ms={step_ms:.1f} {peak} "
              f"tokens_per_s_per_gpu={tokens_per_gpu / step_ms * 1e3:.0f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    exit_cleanly()


if __name__ == "__main__":
    main()
