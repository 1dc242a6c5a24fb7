"""Activation modules for the activations torch.nn lacks, so ``implicit(model)`` can find them."""
import torch
from torch import nn

from torchopt_ext.activations import smoothstep


class Arctan(nn.Module):
    """Elementwise arctan (the paper's activation for the UCI and RNN experiments)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """arctan(u)."""
        return torch.atan(u)


class Smoothstep(nn.Module):
    """Elementwise smoothstep: -1 below -1, 1.5u - 0.5u^3 on [-1, 1], 1 above 1."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """smoothstep(u)."""
        return smoothstep(u)
