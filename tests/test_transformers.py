"""cce_dist.transformers.patch on tiny random-init transformers causal LMs built locally (no
downloads): the patched loss and every parameter's gradient equal the unpatched model's."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cce_dist.transformers import patch, unpatch  # noqa: E402
from helpers import rel_err  # noqa: E402

V = 300
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64)


def _config(family: str, tie: bool):
    kw = dict(SMALL, tie_word_embeddings=tie)
    if family == "llama":
        return transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    if family == "mistral":
        return transformers.MistralConfig(**kw), transformers.MistralForCausalLM
    if family == "qwen2":
        return transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    if family == "qwen3":
        return transformers.Qwen3Config(**kw), transformers.Qwen3ForCausalLM
    if family == "gemma2":
        return (transformers.Gemma2Config(**kw, final_logit_softcapping=5.0),
                transformers.Gemma2ForCausalLM)
    if family == "gemma3":
        return (transformers.Gemma3TextConfig(**kw, final_logit_softcapping=5.0),
                transformers.Gemma3ForCausalLM)
    raise ValueError(family)


def _models(family, tie):
    config, cls = _config(family, tie)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).float()
    with torch.no_grad():  # outputs far from uniform, so that the softcap matters
        model.get_output_embeddings().weight.mul_(8.0)
    return model, patch(copy.deepcopy(model))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def _compare(ref, got, **kwargs):
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels, **kwargs)
    out = got(input_ids=ids, labels=labels, **kwargs)
    assert out.logits is None and "logits" not in out  # no N x V logits with labels
    assert out[0] is out.loss  # loss first, as transformers returns it
    assert rel_err(out.loss, want.loss.double()) < 1e-5
    want.loss.backward()
    out.loss.backward()
    mine = dict(got.named_parameters())
    for name, p in ref.named_parameters():
        assert mine[name].grad is not None, name
        assert rel_err(mine[name].grad, p.grad.double()) < 1e-4, name


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_loss_and_gradients_equal_the_unpatched_model(family):
    ref, got = _models(family, tie=family.startswith("gemma"))
    _compare(ref, got)


@pytest.mark.parametrize("tie", [False, True])
def test_num_items_in_batch_and_tied_embeddings(tie):
    """The Trainer's gradient-accumulation mean (sum / num_items_in_batch), with the input and
    output embeddings tied or not."""
    ref, got = _models("llama", tie)
    assert (ref.get_output_embeddings().weight is ref.get_input_embeddings().weight) == tie
    _compare(ref, got, num_items_in_batch=torch.tensor(37))


def test_shift_labels_keyword():
    ref, got = _models("qwen2", tie=False)
    ids, labels = _batch(1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = ref(input_ids=ids, labels=labels).loss
    out = got(input_ids=ids, labels=labels, shift_labels=shifted).loss
    assert rel_err(out, want.double()) < 1e-5


def test_without_labels_the_logits_are_unchanged_and_unpatch_restores():
    ref, got = _models("gemma2", tie=True)
    ids, _ = _batch()
    want = ref(input_ids=ids).logits
    assert torch.allclose(got(input_ids=ids).logits, want, atol=1e-5)
    ids, labels = _batch()
    assert got(input_ids=ids, labels=labels).logits is None
    unpatch(got)
    out = got(input_ids=ids, labels=labels)
    assert out.logits is not None
    assert rel_err(out.loss, ref(input_ids=ids, labels=labels).loss.double()) < 1e-5


def _group_worker(rank, world, family, tie, vocab):
    """patch(model, group=...) on every rank, same batch: the loss and every parameter's
    gradient equal the unpatched single-process model's, on every rank."""
    import torch.distributed as dist

    config, cls = _config(family, tie)
    config.vocab_size = vocab
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(config).float()
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(8.0)
    got = patch(copy.deepcopy(ref), group=dist.group.WORLD)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    want = ref(input_ids=ids, labels=labels).loss
    out = got(input_ids=ids, labels=labels).loss
    assert rel_err(out, want.double()) < 1e-5, (rank, out, want)
    want.backward()
    out.backward()
    mine = dict(got.named_parameters())
    for name, p in ref.named_parameters():
        assert rel_err(mine[name].grad, p.grad.double()) < 1e-4, (rank, name)
    # Without labels the whole head still gives the whole logits.
    assert torch.allclose(got(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("world,family,tie", [(2, "llama", False), (3, "gemma2", True)])
def test_group_shares_the_loss_by_vocabulary_rows(world, family, tie):
    from distributed import run_ranks

    run_ranks(world, _group_worker, family, tie, 301)  # uneven shards


def test_refuses_what_it_cannot_do():
    ref, _ = _models("llama", tie=False)
    with pytest.raises(TypeError, match="causal LM"):
        patch(torch.nn.Linear(3, 3))
    # A weight released after its module returned (as ZeRO-3 does) gets a clear error.
    model = patch(copy.deepcopy(ref))
    head = model.get_output_embeddings()
    ids, labels = _batch()
    hook = head.register_forward_hook(lambda *_: setattr(head.weight, "data", torch.empty(0)))
    with pytest.raises(RuntimeError, match="released it"):
        model(input_ids=ids, labels=labels)
    hook.remove()


def _zero3_worker(rank, world, tie):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ref, _ = _models("llama", tie)
    results = {}
    for kind in ("native", "cce"):
        model = copy.deepcopy(ref)
        if kind == "cce":
            patch(model)
        config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), config=config)
        losses = []
        for step in range(3):
            ids, labels = _batch(10 * step + rank)
            out = engine(input_ids=ids, labels=labels)
            assert (out.logits is None) == (kind == "cce")  # the patched loss ran
            loss = out.loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            state = {name: p.detach().clone() for name, p in params.items()}
        results[kind] = (losses, state)
    (want, want_state), (got, got_state) = results["native"], results["cce"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(want, got)), (want, got)
    for name, p in want_state.items():
        assert rel_err(got_state[name], p.double()) < 1e-4, name


@pytest.mark.parametrize("tie", [False, True])
def test_training_under_deepspeed_zero3(tie, monkeypatch, tmp_path_factory):
    """DeepSpeed ZeRO-3 (gloo, 2 data-parallel ranks, every parameter partitioned): three SGD
    steps of the patched model give the unpatched model's losses and parameters."""
    import os

    pytest.importorskip("deepspeed")
    from distributed import free_port, run_ranks

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions")))
    run_ranks(2, _zero3_worker, tie)


def test_example_runs(tmp_path):
    """launch/hf_train.py: one process with and without the patch (same first loss), and under
    torchrun with DeepSpeed ZeRO-3 on 2 ranks."""
    import os
    import re
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    pytest.importorskip("deepspeed")
    from distributed import free_port

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CCE_DIST_CACHE=str(tmp_path), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    env.pop("TRITON_INTERPRET", None)
    script = str(root / "launch" / "hf_train.py")
    common = ["--steps", "3", "--vocab-size", "600", "--hidden", "32", "--seq-len", "16",
              "--data", str(Path(sysconfig.get_paths()["stdlib"]) / "json")]
    runs = {
        "cce": [sys.executable, script] + common,
        "native": [sys.executable, script, "--loss", "native"] + common,
        "zero3": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                  "--master-port", str(free_port()), script, "--zero", "3"] + common,
    }
    first = {}
    for name, cmd in runs.items():
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                             cwd=tmp_path)
        assert run.returncode == 0, (name, run.stderr[-3000:])
        losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", run.stdout)]
        assert len(losses) == 3 and all(0 < x < 20 for x in losses), run.stdout[-2000:]
        assert re.search(r"summary loss=\w+ family=llama zero=\w+ world=\d step_ms=[\d.]+ "
                         r"peak_rss_mb=\d+ tokens_per_s_per_gpu=\d+", run.stdout), run.stdout
        first[name] = losses[0]
    assert abs(first["cce"] - first["native"]) < 2e-4 and abs(first["zero3"] - first["cce"]) < 2e-4


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_logit_scales(family):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale:
    the patched loss and gradients follow (head scaled up so that the scale matters)."""
    kw = dict(SMALL, tie_word_embeddings=False)
    kw.pop("head_dim")
    if family == "granite":
        config, cls = transformers.GraniteConfig(**kw, logits_scaling=8.0), \
            transformers.GraniteForCausalLM
    else:
        config, cls = transformers.CohereConfig(**kw, logit_scale=0.0625), \
            transformers.CohereForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = cls(config).float()
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(50.0)
    _compare(ref, patch(copy.deepcopy(ref)))


def test_mixture_of_experts_router_loss():
    """Mixtral adds router_aux_loss_coef * aux_loss to the loss when labels are given."""
    kw = dict(SMALL, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
              output_router_logits=True, router_aux_loss_coef=0.5)
    config = transformers.MixtralConfig(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(config).float()
    _compare(ref, patch(copy.deepcopy(ref)))


def test_positional_labels_and_tuples():
    ref, got = _models("llama", tie=False)
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    names = list(__import__("inspect").signature(got._cce_dist_forward).parameters)
    args = [None] * (names.index("labels") + 1)
    args[names.index("input_ids")], args[-1] = ids, labels
    assert rel_err(got(*args).loss, want.double()) < 1e-5
    out = got(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and rel_err(out[0], want.double()) < 1e-5


def test_refuses_an_unknown_logits_epilogue():
    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden)
            logits = logits + 1.0  # something patch() cannot know
            return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)

    config, _ = _config("llama", tie=False)
    with pytest.raises(NotImplementedError, match="logits"):
        patch(Scaled(config))
