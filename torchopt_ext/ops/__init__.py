"""Compiled operators (torch.ops.torchopt_ext.*) with their Python wrappers and references."""
from torchopt_ext.ops.ib_alpha import ib_alpha, ib_alpha_reference

__all__ = ["ib_alpha", "ib_alpha_reference"]

from torchopt_ext.ops.probe import newton_lr, newton_lr_reference, probe_move_, probe_move_reference_  # noqa: E402,F401
