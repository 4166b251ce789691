import os

import torch

# The Triton kernels run on CPU tensors through the interpreter; it must be chosen before
# triton.jit decorates them, i.e. before cce_dist.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "reference"])
def backend(request):
    """The CPU tests' backends; Triton on CPU tensors needs the interpreter."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors runs only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture
def deepspeed_on_cpu(tmp_path_factory, monkeypatch):
    """DeepSpeed on the CPU (gloo): its accelerator, a free port, and one cache of its JIT-built
    ops for the session."""
    from distributed import free_port

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions")))
