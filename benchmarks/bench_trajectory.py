"""Training trajectories of a Megatron-Core GPT under several output-layer losses, from one init.

Does cce-dist's default gradient filter track exact mode in real Megatron training? Each run
rebuilds the same GPT from the same seed and trains it on the same batches; only the loss of the
output layer differs:

- ``native``:  Megatron's ``GPTModel`` and its own vocabulary-parallel cross-entropy;
- ``exact``:   ``CCEGPTModel(..., cce_filter_eps=None)`` (no gradient filtering);
- ``default``: ``CCEGPTModel`` with its default filter;
- ``entry``:   ``CCEGPTModel(..., cce_filter_eps=default_filter_eps(bf16))``, the per-entry
  threshold 2^-12.

The training set-up is Megatron's own (as ``pretrain_gpt`` builds it): the model in bf16 under
``Float16Module``, tensor parallelism over ``--tp`` ranks (default: all of them), Megatron's
``DistributedDataParallel`` (fp32 gradient reduction, overlapped, distributed-optimizer layout),
``get_megatron_optimizer`` (distributed Adam, fp32 main parameters, gradient clipping at
``--clip-grad``; weight decay, betas and eps at ``OptimizerConfig``'s defaults) and
``get_forward_backward_func`` accumulating ``--micro-batches`` micro-batches per step.

Launch, one process per GPU (written against megatron-core 0.16.1 and 0.19.2)::

    torchrun --nproc_per_node=2 benchmarks/bench_trajectory.py --data zipf \\
        --json out/trajectory.json --plot out/trajectory.png

Smoke test on the CPU over gloo (tiny sizes)::

    torchrun --nproc_per_node=2 benchmarks/bench_trajectory.py --device cpu --layers 1 \\
        --hidden 64 --heads 4 --vocab 4096 --seq 64 --steps 3

On the CPU (``--device cpu``, gloo, the CPU shims of tests/test_megatron.py) Megatron's training
machinery cannot run; each piece allocates CUDA tensors or streams unconditionally: the
distributed optimizer (``MixedPrecisionOptimizer.__init__``'s loss-scale constant
``torch.tensor([1.0], device='cuda')``, in 0.16 and 0.19), ``forward_backward_func``
(``forward_backward_no_pipelining``'s token counter ``torch.zeros(..., device="cuda")``) and,
in 0.19, DDP's gradient reduction (``start_grad_sync`` calls ``torch.cuda.current_stream()``).
The CPU mode therefore trains the ``Float16Module`` model without DDP, accumulates the
micro-batches in a plain loop and steps an AdamW over fp32 copies of the parameters with
Megatron's clipping; it needs ``--tp`` equal to the world size, and the output says what ran
(``mode``). It checks the script's flow and the losses, not Megatron's optimizer.

Data (``--data``): ``random`` uniform token ids, ``zipf`` ids drawn iid with P(id) ~ 1/(id + 1),
``text`` the training job's text (launch/corpus.py, tokenized by its cached byte-level BPE of
``--bpe-vocab`` tokens, whose size is then V unless ``--vocab`` is given). Every run sees the
same batches; data-parallel ranks (``--tp`` below the world size) see different ones.

Printed by rank 0: the set-up, a table of loss and gradient norm per run at steps 0, 3, 10, 20,
..., last, and per run the largest |loss - exact| and |loss - native| over all steps and the
largest relative gradient-norm difference from exact. ``--json`` writes the configuration and
every step's loss (mean over micro-batches and data-parallel ranks) and gradient norm (as the
optimizer returns it, before clipping); ``--plot`` draws the curves (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Union

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from common import exit_cleanly, token_windows  # noqa: E402

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig

RUNS = ("native", "exact", "default", "entry")
DEFAULT_VOCAB = 128256  # Llama 3's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--data", choices=("random", "text", "zipf"), default="random")
    p.add_argument("--vocab", type=int, default=None,
                   help=f"V before padding (default {DEFAULT_VOCAB}; --data text: --bpe-vocab)")
    p.add_argument("--bpe-vocab", type=int, default=32000,
                   help="--data text: the BPE's size (the training job's --vocab-size)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--tied", action="store_true", help="share embedding and output weights")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="", help="write the configuration and trajectories here")
    p.add_argument("--plot", default="", help="draw the curves into this image (matplotlib)")
    args = p.parse_args()
    if args.vocab is None:
        args.vocab = args.bpe_vocab if args.data == "text" else DEFAULT_VOCAB
    if args.data == "text" and args.vocab < args.bpe_vocab:
        p.error(f"--vocab {args.vocab} is smaller than the BPE's {args.bpe_vocab} tokens")
    return args


def make_batches(args: argparse.Namespace, dp_rank: int, dp_size: int) -> torch.Tensor:
    """This rank's token windows, [steps, micro-batches, micro-batch, seq + 1] int64 on the CPU:
    one draw from ``--seed`` for the whole job, so every run and every TP rank sees the same."""
    shape = (args.steps, args.micro_batches, dp_size * args.micro_batch, args.seq + 1)
    count = math.prod(shape[:3])
    g = torch.Generator().manual_seed(args.seed)
    if args.data == "random":
        tokens = torch.randint(0, args.vocab, shape, generator=g)
    elif args.data == "zipf":
        weights = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64)
        tokens = torch.multinomial(weights, count * (args.seq + 1), replacement=True,
                                   generator=g).view(shape)
    else:
        from tokenizer import corpus_token_ids

        ids = corpus_token_ids([], args.bpe_vocab)
        tokens = token_windows(ids, count, args.seq + 1, seed=args.seed).view(shape)
    rows = slice(dp_rank * args.micro_batch, (dp_rank + 1) * args.micro_batch)
    return tokens[:, :, rows].contiguous()


class CPUAdam:
    """The CPU stand-in for Megatron's distributed optimizer (which needs CUDA): AdamW over fp32
    copies of the bf16 parameters (no weight decay on 1-D ones, as Megatron groups them),
    clipped as Megatron clips (L2 norm over the model-parallel group, tensor-parallel duplicates
    counted once). ``step`` returns what Megatron's returns: (updated, grad norm, None)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig) -> None:
        from megatron.core import parallel_state

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.main = [p.detach().float().clone() for p in self.params]
        decay = [m for p, m in zip(self.params, self.main) if p.dim() > 1]
        no_decay = [m for p, m in zip(self.params, self.main) if p.dim() <= 1]
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        self.clip = cfg.clip_grad
        self.group = parallel_state.get_model_parallel_group()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> tuple[bool, float, None]:
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        square = torch.zeros((), dtype=torch.float32)
        for p in self.params:
            if param_is_not_tensor_parallel_duplicate(p):
                square += p.grad.float().square().sum()
        dist.all_reduce(square, group=self.group)
        norm = square.sqrt().item()
        scale = min(1.0, self.clip / (norm + 1e-6))
        for p, m in zip(self.params, self.main):
            m.grad = p.grad.float() * scale
        self.adam.step()
        for p, m in zip(self.params, self.main):
            p.copy_(m)
        return True, norm, None


def build(run: str, args: argparse.Namespace,
          padded: int) -> tuple[torch.nn.Module, Union[MegatronOptimizer, CPUAdam]]:
    """(model, optimizer) for one run, rebuilt from ``--seed`` so that every run starts from the
    same weights: on CUDA as Megatron's ``pretrain`` builds them (``Float16Module``, DDP, the
    distributed optimizer, the hooks its training loop installs in the config); on the CPU the
    ``Float16Module`` model and ``CPUAdam``."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    import cce_dist
    from cce_dist.megatron import CCEGPTModel

    cuda = args.device == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=True, params_dtype=torch.bfloat16, tensor_model_parallel_size=args.tp,
        use_cpu_initialization=not cuda,
    )
    kwargs = dict(vocab_size=padded, max_sequence_length=args.seq, parallel_output=True,
                  share_embeddings_and_output_weights=args.tied)
    if run == "native":
        model = GPTModel(config, get_gpt_layer_local_spec(), **kwargs)
    else:
        filter_eps = {"exact": None, "default": "auto",
                      "entry": cce_dist.default_filter_eps(torch.bfloat16)}[run]
        model = CCEGPTModel(config, get_gpt_layer_local_spec(), cce_filter_eps=filter_eps,
                            **kwargs)
    model = Float16Module(config, model.to(args.device))
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, bf16=True, params_dtype=torch.bfloat16,
        clip_grad=args.clip_grad, use_distributed_optimizer=True)
    if not cuda:
        return model, CPUAdam(model, opt_config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(opt_config, [model])
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer


def forward_step(batch_iter: Iterator[torch.Tensor], model: torch.nn.Module, device: str,
                 mask: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """Megatron's ``forward_step_func``: the per-token loss [b, s] and its reduction."""
    tokens = next(batch_iter).to(device, non_blocking=True)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position = torch.arange(inputs.shape[1], device=device)[None].expand_as(inputs)
    per_token = model(inputs, position, mask, labels=labels)

    def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = output.float().mean()  # every token counts; the schedule divides by micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


def accumulate_on_cpu(step_func: Callable, batches: torch.Tensor,
                      model: torch.nn.Module) -> list[dict]:
    """The CPU's ``forward_backward_func``: each micro-batch's mean loss, divided by the number
    of micro-batches, backpropagated into the accumulating gradients."""
    reported = []
    for batch in batches:
        output, loss_func = step_func(iter([batch]), model)
        loss, logged = loss_func(output)
        (loss / len(batches)).backward()
        reported.append(logged)
    return reported


def train(run: str, args: argparse.Namespace, padded: int, batches: torch.Tensor) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, optimizer = build(run, args, padded)
    mask = torch.triu(torch.ones(args.seq, args.seq, dtype=torch.bool, device=args.device),
                      diagonal=1)[None, None]  # Megatron's default causal mask needs CUDA
    step_func = partial(forward_step, device=args.device, mask=mask)
    dp_group = parallel_state.get_data_parallel_group()
    losses, norms = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad()
        if args.device == "cuda":
            model.zero_grad_buffer()
            reported = get_forward_backward_func()(
                forward_step_func=step_func, data_iterator=iter(batches[step]), model=[model],
                num_microbatches=args.micro_batches, seq_length=args.seq,
                micro_batch_size=args.micro_batch, decoder_seq_length=args.seq,
                forward_only=False)
        else:
            reported = accumulate_on_cpu(step_func, batches[step], model)
        _, grad_norm, _ = optimizer.step()
        loss = torch.stack([r["lm loss"] for r in reported]).mean()
        dist.all_reduce(loss, group=dp_group)
        losses.append(loss.item() / dist.get_world_size(dp_group))
        norms.append(float("nan") if grad_norm is None else float(grad_norm))  # None: skipped
        if dist.get_rank() == 0 and (step + 1) % 10 == 0:
            print(f"  {run} step {step + 1}/{args.steps} loss {losses[-1]:.4f} "
                  f"grad_norm {norms[-1]:.4f}", flush=True)
    seconds = time.perf_counter() - start
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"loss": losses, "grad_norm": norms, "seconds": seconds}


def shown_steps(steps: int) -> list[int]:
    return sorted({s for s in (0, 3, *range(10, steps, 10)) if s < steps} | {steps - 1})


def max_gap(results: dict, run: str, ref: str, key: str = "loss",
            relative: bool = False) -> float:
    """Largest |run - ref| of ``key`` over all steps (relative to ref's); nan without ref."""
    if ref not in results:
        return float("nan")
    pairs = zip(results[run][key], results[ref][key])
    return max(abs(x - y) / (abs(y) if relative else 1.0) for x, y in pairs)


def report(results: dict, steps: int) -> None:
    runs = list(results)
    print("step  " + "".join(f"{r + ' loss':>14}{'gnorm':>9}" for r in runs))
    for s in shown_steps(steps):
        print(f"{s:4d}  " + "".join(f"{results[r]['loss'][s]:14.5f}"
                                    f"{results[r]['grad_norm'][s]:9.4f}" for r in runs))
    print(f"{'run':8}{'max|loss-exact|':>17}{'max|loss-native|':>18}"
          f"{'max|gnorm-exact|/exact':>24}{'seconds':>9}")
    for r in runs:
        print(f"{r:8}{max_gap(results, r, 'exact'):17.2e}{max_gap(results, r, 'native'):18.2e}"
              f"{max_gap(results, r, 'exact', 'grad_norm', relative=True):24.2e}"
              f"{results[r]['seconds']:9.1f}")


def plot(results: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, {path} not drawn")
        return
    panels = 3 if "exact" in results else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for run, res in results.items():
        steps = range(len(res["loss"]))
        axes[0].plot(steps, res["loss"], label=run)
        axes[1].plot(steps, res["grad_norm"], label=run)
        if panels == 3:
            axes[2].plot(steps, [a - b for a, b in zip(res["loss"], results["exact"]["loss"])],
                         label=run)
    for ax, name in zip(axes, ("loss", "grad norm (before clipping)", "loss - exact")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        from cce_dist.megatron import cpu_shims

        cpu_shims()
    import megatron.core
    from megatron.core import parallel_state

    world = dist.get_world_size()
    args.tp = args.tp or world
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the world size {world}")
    if not cuda and args.tp != world:
        raise SystemExit("--device cpu trains without DDP: --tp must be the world size")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), world // args.tp
    padded = -(-args.vocab // (128 * args.tp)) * 128 * args.tp  # as Megatron pads it
    batches = make_batches(args, dp_rank, dp_size)
    mode = ("Float16Module(bf16) + DDP(grad_reduce_in_fp32, overlap_grad_reduce, "
            "distributed optimizer) + get_megatron_optimizer(adam) + forward_backward_func"
            if cuda else
            "CPU STAND-IN: Float16Module(bf16) + micro-batch loop + fp32 AdamW with Megatron's "
            "clipping (no DDP, distributed optimizer or forward_backward_func: they need CUDA)")
    config = dict(vars(args), world=world, dp=dp_size, padded_vocab=padded, mode=mode,
                  megatron_core=megatron.core.__version__, torch=torch.__version__,
                  tokens_per_step=dp_size * args.micro_batches * args.micro_batch * args.seq)
    title = (f"data={args.data} V={args.vocab} (padded {padded}) tp={args.tp} dp={dp_size} "
             f"layers={args.layers} hidden={args.hidden} heads={args.heads} seq={args.seq} "
             f"micro_batch={args.micro_batch}x{args.micro_batches} lr={args.lr} "
             f"clip={args.clip_grad} megatron-core {megatron.core.__version__}")
    if dist.get_rank() == 0:
        print(f"mode: {mode}\n{title}", flush=True)
    results = {run: train(run, args, padded, batches) for run in args.runs}
    if dist.get_rank() == 0:
        report(results, args.steps)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"config": config, "runs": results}, f, indent=1)
            print(f"json written to {args.json}")
        if args.plot:
            Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
            plot(results, args.plot, title)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    exit_cleanly()


if __name__ == "__main__":
    main()
