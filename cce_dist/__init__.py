"""cce-dist: vocabulary-parallel Cut Cross-Entropy for large-vocabulary language models."""

from .loss import LinearCrossEntropy, linear_cross_entropy
from .validation import default_filter_eps

__all__ = ["LinearCrossEntropy", "default_filter_eps", "linear_cross_entropy"]
__version__ = "0.1.0"
