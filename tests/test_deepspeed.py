"""VocabParallelCCEHead under deepspeed.initialize on the CPU (gloo, DS_ACCELERATOR=cpu):
TP=2 and TP=2 x DP=2, ZeRO stages 0-3, against a single-process nn.Linear + F.cross_entropy."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

pytest.importorskip("deepspeed")

from distributed import free_port, run_ranks  # noqa: E402

V, D, SEQ, BATCH, STEPS, LR = 50, 16, 6, 4, 3, 0.5


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.body = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, tokens):
        return self.lm_head(torch.tanh(self.body(self.embed(tokens))))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (BATCH, SEQ), generator=g), torch.randint(0, V, (BATCH, SEQ),
                                                                          generator=g)


def _reference():
    """Loss per step and final parameters of plain single-process training (SGD)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        tokens, labels = _data(step)
        loss = F.cross_entropy(model(tokens)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ds_env(world, rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def _worker(rank, world, tp, tmpdir, device="cpu"):
    import deepspeed

    from cce_dist.deepspeed import convert_lm_head, make_mpu

    _ds_env(world, rank)
    mpu = make_mpu(tp)
    dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    ref_losses, ref_state = _reference()
    # On GPUs fp32 products run in another order than on the CPU reference's.
    tol = 1e-5 if device == "cpu" else 1e-4
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = convert_lm_head(TinyLM(), group=mpu.get_tensor_model_parallel_group())
        model = model.to(device)
        lo = model.head.vocab_start
        hi = lo + model.head.weight.shape[0]
        config = {
            "train_micro_batch_size_per_gpu": BATCH // dp, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config,
            mpu=mpu)
        for step in range(STEPS):
            tokens, labels = (x.to(device) for x in _data(step))
            rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
            loss = engine(tokens[rows], labels=labels[rows])
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean, group=mpu.get_data_parallel_group())
            assert abs(mean.item() / dp - ref_losses[step]) < tol, (stage, step)
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name in ("embed.weight", "body.weight", "body.bias"):
                got = params[f"model.{name}"].detach().cpu()
                assert torch.allclose(got, ref_state[name], atol=tol), (stage, name)
            got = params["head.weight"].detach().cpu()
            assert torch.allclose(got, ref_state["lm_head.weight"][lo:hi], atol=tol), stage
        if stage == 2:  # checkpoint round trip of the sharded head
            engine.save_checkpoint(tmpdir, tag="t")
            saved = params["head.weight"].detach().clone()
            with torch.no_grad():
                params["head.weight"].zero_()
            engine.load_checkpoint(tmpdir, tag="t")
            assert torch.equal(dict(engine.module.named_parameters())["head.weight"], saved)
        engine.destroy() if hasattr(engine, "destroy") else None


def _no_mpu_worker(rank, world):
    import deepspeed

    from cce_dist.deepspeed import convert_lm_head

    _ds_env(world, rank)
    torch.manual_seed(0)
    model = convert_lm_head(TinyLM(), group=dist.group.WORLD)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        config={"train_micro_batch_size_per_gpu": BATCH, "zero_allow_untested_optimizer": True})
    tokens, labels = _data(0)
    with pytest.raises(RuntimeError, match="make_mpu"):
        engine(tokens, labels=labels)


@pytest.fixture(autouse=True)
def _cpu_deepspeed(request, tmp_path_factory, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions")))


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
def test_head_matches_single_process_reference(world, tp, tmp_path):
    run_ranks(world, _worker, tp, str(tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2), (4, 4)])
def test_head_matches_single_process_reference_nccl(world, tp, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    run_ranks(world, _worker, tp, str(tmp_path), "cuda", backend="nccl")


def _autotp_groups_worker(rank, world):
    import deepspeed  # noqa: F401
    from deepspeed.utils import groups

    from cce_dist.deepspeed import VocabParallelCCEHead, make_mpu

    _ds_env(world, rank)
    config = {"tensor_parallel": {"autotp_size": world}}
    with pytest.raises(ValueError, match="autotp_size"):
        make_mpu(1, config=config)
    mpu = make_mpu(world, config=config)
    tp = mpu.get_tensor_model_parallel_group()
    assert tp is groups.get_tensor_model_parallel_group()
    assert mpu.get_data_parallel_group() is groups.get_data_parallel_group()
    assert mpu.get_tensor_model_parallel_world_size() == world
    assert mpu.get_data_parallel_world_size() == 1
    # The head over DeepSpeed's TP group: loss and gradients of one nn.Linear (with its bias,
    # which the kernels add) + F.cross_entropy.
    torch.manual_seed(0)
    linear = nn.Linear(D, V, bias=True)
    head = VocabParallelCCEHead.from_linear(linear, group=tp)
    hidden = torch.randn(BATCH * SEQ, D, requires_grad=True)
    labels = torch.randint(0, V, (BATCH * SEQ,))
    loss = head(hidden, labels)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = F.cross_entropy(linear(ref_hidden), labels)
    ref.backward()
    lo, rows = head.vocab_start, head.weight.shape[0]
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(hidden.grad, ref_hidden.grad, atol=1e-6)
    assert torch.allclose(head.weight.grad, linear.weight.grad[lo:lo + rows], atol=1e-6)
    assert torch.allclose(head.bias.grad, linear.bias.grad[lo:lo + rows], atol=1e-6)


class MLPBlock(nn.Module):
    """Linear layers named as AutoTP expects (up: column-parallel, down: row-parallel)."""

    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(D, 2 * D)
        self.down_proj = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down_proj(torch.tanh(self.up_proj(x)))


class BlockLM(nn.Module):
    """TinyLM with its body in an nn.ModuleList of blocks, the structure AutoTP parses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList([MLPBlock()])
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class NativeLossModel(nn.Module):
    """The unconverted model with F.cross_entropy in its forward (AutoTP needs "Model" in the
    class name to find a policy)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels):
        logits = self.model(tokens)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1))


def _autotp_training_worker(rank, world, device="cpu"):
    import deepspeed

    from cce_dist.deepspeed import convert_lm_head, make_mpu
    from memcheck import checked_memory

    _ds_env(world, rank)
    config = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "tensor_parallel": {"autotp_size": world}}
    mpu = make_mpu(world, config=config)
    runs = {}
    for kind in ("native", "cce"):
        torch.manual_seed(0)
        model = BlockLM()
        if kind == "cce":
            model = convert_lm_head(model, group=mpu.get_tensor_model_parallel_group())
        else:
            model = NativeLossModel(model)
        model = model.to(device)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config,
            mpu=mpu)
        assert type(engine.module.model.layers[0].up_proj) is not nn.Linear, "AutoTP idle"
        losses = []
        # Every interpreted kernel launch of the loss is bounds-checked in this process.
        with checked_memory() as launches:
            for step in range(STEPS):
                tokens, labels = (x.to(device) for x in _data(step))
                loss = engine(tokens, labels=labels)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
        if kind == "cce" and os.environ.get("TRITON_INTERPRET") == "1":
            assert launches["launches"] > 0
        runs[kind] = losses, {k: p.detach().cpu().clone()
                              for k, p in engine.module.named_parameters()}
    # The same training as DeepSpeed's own AutoTP run with the replicated nn.Linear head.
    (want, native), (got, cce) = runs["native"], runs["cce"]
    # On GPUs the two heads' fp32 products run in different orders (cuBLAS against our kernels).
    tol = 1e-5 if device == "cpu" else 1e-4
    assert all(abs(a - b) < tol for a, b in zip(got, want)), (got, want)
    for name in ("model.embed.weight", "model.layers.0.down_proj.bias",
                 "model.layers.0.down_proj.weight", "model.layers.0.up_proj.weight"):
        assert torch.allclose(cce[name], native[name], atol=tol), name
    lo = engine.module.head.vocab_start
    rows = cce["head.weight"].shape[0]
    assert torch.allclose(cce["head.weight"], native["model.lm_head.weight"][lo:lo + rows],
                          atol=tol)


def test_training_through_deepspeed_autotp_engine():
    """AutoTP shards the body's Linear layers, the head shards the vocabulary over the same TP
    group (Triton kernels, interpreted and bounds-checked): losses and parameters after SGD
    steps equal DeepSpeed's own AutoTP run with the original nn.Linear head."""
    pytest.importorskip("transformers")  # AutoTP's layer parser imports it
    run_ranks(2, _autotp_training_worker)


@pytest.mark.gpu
def test_training_through_deepspeed_autotp_engine_nccl():
    """The same on 2 GPUs over NCCL (the gemm engine's cuBLAS products and Triton kernels)."""
    pytest.importorskip("transformers")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_ranks(2, _autotp_training_worker, "cuda", backend="nccl")


def test_make_mpu_reuses_deepspeed_autotp_groups():
    """With tensor_parallel.autotp_size, make_mpu wraps DeepSpeed's own TP / DP groups (the ones
    AutoTP uses), refuses a different size, and the head computes the right loss over them."""
    run_ranks(2, _autotp_groups_worker)


def test_missing_mpu_is_caught_at_the_first_step():
    run_ranks(2, _no_mpu_worker)


def test_tied_head_is_refused_or_untied():
    from cce_dist.deepspeed import convert_lm_head

    model = TinyLM()
    model.lm_head.weight = model.embed.weight  # tied
    with pytest.raises(ValueError, match="tied to embed.weight"):
        convert_lm_head(model)
    wrapped = convert_lm_head(model, untie=True)
    assert wrapped.head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert torch.equal(wrapped.head.weight, model.embed.weight)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_deepspeed_example_runs(launcher, tmp_path):
    """launch/deepspeed_train.py under torchrun and under DeepSpeed's own launcher."""
    import re
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    script = str(root / "launch" / "deepspeed_train.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), script]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
               "--master_port", str(free_port()), script]
    run = subprocess.run(
        cmd + ["--steps", "3", "--zero", "2", "--vocab-size", "600", "--d-model", "32",
               "--seq-len", "16", "--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), run.stdout[-2000:]
    summary = re.search(r"summary loss=cce zero=2 tp=2 dp=1 step_ms=[\d.]+ "
                        r"peak_(rss_)?mb=(\d+) tokens_per_s_per_gpu=\d+", run.stdout)
    assert summary, run.stdout[-2000:]
    # GPU: the allocator's peak (peak_mb); CPU: rank 0's peak RSS (peak_rss_mb; it was nan).
    on_gpu = torch.cuda.is_available() and env.get("DS_ACCELERATOR") != "cpu"
    assert (summary[1] is None) == on_gpu, summary[0]
    assert on_gpu or int(summary[2]) > 50, summary[0]  # Python and torch alone hold more
