"""torchopt_ext: implicit backprop, five-probe adaptive learning rates and dataset distillation."""
from torchopt_ext._extension import cuda_available, extension_available, warn_once_if_missing

warn_once_if_missing()

from torchopt_ext import activations, ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["activations", "ops", "extension_available", "cuda_available", "__version__"]
