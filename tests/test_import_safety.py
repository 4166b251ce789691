"""The custom ops are registered once, whatever imports the repository's folders.

With the repository root on sys.path (any script or ``python -c`` run there), ``kernels/`` is
also importable as a top-level package named "kernels", and transformers imports whatever
"kernels" it finds to probe for the Hugging Face package of that name. A second copy of
``kernels/ops.py`` registered the ``cce_dist::`` ops again and left the live ones with freed
schemas: ``ValueError: vector::reserve``, ``std::bad_alloc`` or an INTERNAL ASSERT inside the op's
dispatch, the intermittent crashes seen under DeepSpeed AutoTP and next to other libraries.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import importlib, torch
from cce_dist import linear_cross_entropy

def step(backend):
    e = torch.randn(40, 16, requires_grad=True)
    c = torch.randn(100, 16, requires_grad=True)
    linear_cross_entropy(e, c, torch.randint(0, 100, (40,)), backend=backend).backward()
    return float(e.grad.norm())

backends = ["reference"] + (["triton"] if {interp} else [])
for b in backends:
    step(b)
top = importlib.import_module("kernels")  # what transformers' package probe does
assert not hasattr(top, "cce_forward"), "the top-level copy must stay empty"
try:
    importlib.import_module("kernels.ops")
except ImportError as err:
    assert "cce_dist.kernels.ops" in str(err)
else:
    raise AssertionError("a second copy of the ops module was imported")
for b in backends:
    step(b)
print("ok")
"""


def test_a_top_level_kernels_import_leaves_the_ops_working():
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(interp=interp)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=""))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_transformers_model_next_to_the_loss_from_the_repository_root():
    """The reported case: build a transformers model (its import probes "kernels"), then use
    the loss; run from the repository root, where the probe finds our folder."""
    code = (
        "import torch\n"
        "from cce_dist import linear_cross_entropy\n"
        "import transformers\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, "
        "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "model = transformers.LlamaForCausalLM(cfg)\n"
        "e = torch.randn(8, 16, requires_grad=True)\n"
        "linear_cross_entropy(e, model.lm_head.weight, torch.randint(0, 64, (8,)),"
        " backend='reference').backward()\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PYTHONPATH=""))
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
