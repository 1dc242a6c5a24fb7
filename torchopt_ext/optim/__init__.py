"""Optimizers of torchopt_ext: ImplicitSGD (implicit backprop) and AdaptiveLRSGD (five-probe eta)."""
from torchopt_ext.optim.adaptive_lr import AdaptiveLRSGD
from torchopt_ext.optim.functional_probe import FunctionalProbe
from torchopt_ext.optim.implicit_sgd import ImplicitSGD

__all__ = ["ImplicitSGD", "AdaptiveLRSGD", "FunctionalProbe"]
