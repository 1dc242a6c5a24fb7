"""Compiled operators (torch.ops.torchopt_ext.*) with their Python wrappers and references."""
from torchopt_ext.ops.ib_alpha import ib_alpha, ib_alpha_reference

__all__ = ["ib_alpha", "ib_alpha_reference"]
