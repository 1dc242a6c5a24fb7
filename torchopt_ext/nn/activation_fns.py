"""Fast forward and derivative of each activation for the implicit layers' own autograd.

The generic ``PiecewiseCubic`` evaluates via bucketize; the built-ins have cheaper closed forms.
Boundary conventions follow the piecewise tables (u <= knot takes the left piece).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext import activations as _act


def _smoothstep_d(u):
    inside = (u > -1.0) & (u <= 1.0)
    return torch.where(inside, 1.5 * (1.0 - u * u), torch.zeros_like(u))


def _hardtanh_d(u):
    return ((u > -1.0) & (u <= 1.0)).to(u.dtype)


_FAST = {
    _act.KIND_RELU: (torch.relu, lambda u: (u > 0).to(u.dtype)),
    _act.KIND_ARCTAN: (torch.atan, lambda u: 1.0 / (1.0 + u * u)),
    _act.KIND_HARDTANH: (F.hardtanh, _hardtanh_d),
    _act.KIND_SMOOTHSTEP: (_act.smoothstep, _smoothstep_d),
    _act.KIND_IDENTITY: (lambda u: u, torch.ones_like),
}

Pair = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def functions(act: _act.Activation) -> Pair:
    """(sigma, sigma') for ``act``: closed forms for the built-ins, the table for a PiecewiseCubic."""
    if act.kind in _FAST:  # the built-in kinds: the kernels use their closed forms too
        return _FAST[act.kind]
    return act, act.derivative
