"""Optimizers of torchopt_ext."""
from torchopt_ext.optim.adaptive_lr import AdaptiveLRSGD
from torchopt_ext.optim.functional_probe import FunctionalProbe

__all__ = ["AdaptiveLRSGD", "FunctionalProbe"]
