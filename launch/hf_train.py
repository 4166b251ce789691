"""Example: a Hugging Face transformers causal LM trained with cce-dist's loss, one line.

    python launch/hf_train.py --steps 20                                 # one process
    torchrun --nproc-per-node 2 launch/hf_train.py --zero 3 --steps 20   # DeepSpeed ZeRO-3

``cce_dist.transformers.patch(model)`` makes ``model(input_ids, labels=labels).loss`` come from
cce-dist: no N x V logits. The model is a small random-init one of ``--family`` (llama, qwen2,
mistral, gemma2: built from its config, no download), or ``--model PATH`` (a local checkpoint).
Data: the embedded corpus of launch/train.py, tokenized with its BPE (``--vocab-size``).
``--loss native`` trains without the patch, for comparison. With ``--zero`` the model runs under
``deepspeed.initialize`` (every rank data-parallel; ``DS_ACCELERATOR=cpu`` on the CPU). Rank 0
prints each step's loss, then one summary line: median step time, peak memory, tokens/s.
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

FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


def build_model(args):
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model)
    kw = dict(vocab_size=args.vocab_size, hidden_size=args.hidden,
              intermediate_size=4 * args.hidden,
              num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
              head_dim=args.hidden // args.heads)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig, "gemma2": transformers.Gemma2Config}
    config = configs[args.family](**kw)
    config._attn_implementation = "sdpa" if args.family != "gemma2" else "eager"
    return transformers.AutoModelForCausalLM.from_config(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", choices=("cce", "native"), default="cce")
    p.add_argument("--family", choices=FAMILIES, default="llama")
    p.add_argument("--model", default="", help="a local transformers checkpoint instead")
    p.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                   help="train under deepspeed.initialize with this ZeRO stage")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", nargs="*", default=[])
    args = p.parse_args()

    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    if distributed:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    ids = corpus_token_ids(args.data, args.vocab_size)
    torch.manual_seed(0)
    model = build_model(args).to(device)
    if args.loss == "cce":
        import cce_dist.transformers

        cce_dist.transformers.patch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine = None
    if args.zero is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": args.zero},
                  "zero_allow_untested_optimizer": True}
        if cuda:
            config["bf16"] = {"enabled": True}
        engine, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                     config=config)
    elif distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        batch = token_windows(ids, args.batch, args.seq_len, seed=step * world + rank).to(device)
        start = time.perf_counter()
        if engine is not None:
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {value:.4f}", flush=True)
    if rank == 0:
        step_ms = 1e3 * statistics.median(times[args.warmup:] or times)
        tokens = args.batch * args.seq_len / (step_ms / 1e3)
        print(f"summary loss={args.loss} family={args.model or args.family} zero={args.zero} "
              f"world={world} step_ms={step_ms:.1f} {peak_memory_field(cuda)} "
              f"tokens_per_s_per_gpu={tokens:.0f}", flush=True)
    if distributed:
        dist.barrier()
        exit_cleanly()


if __name__ == "__main__":
    main()
