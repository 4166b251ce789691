"""cce-dist: vocabulary-parallel Cut Cross-Entropy for large-vocabulary language models."""

import os as _os

# kernels/ and parallel/ sit at the repository root and are installed as cce_dist.kernels and
# cce_dist.parallel. When the source tree itself is on sys.path (Python started in the repository
# root, or PYTHONPATH pointing there), this folder is imported as-is: let the package also look
# in the root so that those two subpackages resolve the same way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "ops.py")
):
    __path__.append(_root)

from .loss import LinearCrossEntropy, linear_cross_entropy
from .parallel import vocab_range
from .rl import linear_logprobs_entropy
from .validation import default_filter_eps

__all__ = [
    "LinearCrossEntropy", "default_filter_eps", "linear_cross_entropy",
    "linear_logprobs_entropy", "vocab_range",
]
__version__ = "0.1.0"
