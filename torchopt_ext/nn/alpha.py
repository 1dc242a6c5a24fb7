"""alpha for the layers' backward: the raw compiled op (the layer already guarantees shapes,
dtypes and z_sqnorm >= 1, so the Python wrapper's checks and host syncs are skipped), or the
pure-PyTorch reference when the extension is not built for this device."""
from __future__ import annotations

import torch

from torchopt_ext import activations as _act
from torchopt_ext.nn.activation_fns import eb_signal
from torchopt_ext.ops.ib_alpha import _compiled_for, ib_alpha_reference


def alpha(q: torch.Tensor, b: torch.Tensor, z_sqnorm: torch.Tensor, eta: float, mu: float,
          act: _act.Activation) -> torch.Tensor:
    """alpha (q's shape) for pre-activations q, upstream gradients b, per-sample ||z||^2.

    z_sqnorm may be None for the identity activation (its alpha does not depend on it).
    eta == 0 is the explicit-backprop limit alpha = b sigma'(q) (the kernels need eta > 0).
    """
    if eta == 0.0:
        return eb_signal(act, b, q)
    if act.kind == _act.KIND_IDENTITY:  # linear sigma: alpha = b/(1+eta mu), no solve, no ||z||^2
        return b if mu == 0.0 else b * (1.0 / (1.0 + eta * mu))
    if _compiled_for(q.device):
        knots, coef = act.tables(q.device)
        return torch.ops.torchopt_ext.ib_alpha(q, b, z_sqnorm, eta, mu, act.kind, knots, coef)
    return ib_alpha_reference(q, b, z_sqnorm, eta, mu, act)

