"""Optimizers that know about implicit layers."""
from torchopt_ext.optim.implicit_sgd import ImplicitSGD

__all__ = ["ImplicitSGD"]
