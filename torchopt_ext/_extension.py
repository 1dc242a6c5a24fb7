"""Loads the compiled extension ``torchopt_ext._C`` once, or records why it could not be loaded."""
import warnings

import torch  # noqa: F401  (loads libc10 & co., which _C links against, before importing _C)

_C = None
_ERROR = None

try:  # the import registers the torch.ops.torchopt_ext.* operators
    from torchopt_ext import _C  # noqa: F811
except ImportError as exc:  # no compiled build: every op falls back to its pure-PyTorch reference
    _ERROR = exc

_warned = False


def extension_available() -> bool:
    """True when the compiled extension ``torchopt_ext._C`` loaded."""
    return _C is not None


def cuda_available() -> bool:
    """True when the compiled extension carries the CUDA kernels."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def warn_once_if_missing() -> None:
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"torchopt_ext: the compiled extension did not load ({_ERROR}); using the pure-PyTorch "
            "reference kernels, which are correct but slower. Reinstall with "
            "`pip install --no-build-isolation .` to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
