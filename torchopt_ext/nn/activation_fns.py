"""Fast forward of each activation and the explicit-backprop signal b * sigma'(u), for the
implicit layers' own autograd: the one Python place of sigma' in the layers' backward.

The generic ``PiecewiseCubic`` evaluates via bucketize; the built-ins have cheaper closed forms.
Boundary conventions follow the piecewise tables (u <= knot takes the left piece); the derivative
tables (``Activation.derivative``) are the reference the tests hold ``eb_signal`` to.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext import activations as _act

_FAST = {
    _act.KIND_RELU: torch.relu,
    _act.KIND_ARCTAN: torch.atan,
    _act.KIND_HARDTANH: F.hardtanh,
    _act.KIND_SMOOTHSTEP: _act.smoothstep,
    _act.KIND_IDENTITY: lambda u: u,
}

Pair = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def functions(act: _act.Activation) -> Pair:
    """(sigma, sigma') for ``act``: sigma in closed form for the built-ins (the kernels use it too),
    sigma' the activation's own derivative (the layers' backward uses ``eb_signal``)."""
    return _FAST.get(act.kind, act), act.derivative


# b * sigma'(u) in one pass where aten has one: at small layers an elementwise op costs more in
# dispatch than in arithmetic.
def _relu_eb(b, u):
    return torch.ops.aten.threshold_backward(b, u, 0)  # b where u > 0, else 0: relu'(0) = 0


def _hardtanh_eb(b, u):
    # aten's hardtanh_backward passes b where min < u < max; our convention also passes u == 1
    # (the left piece owns the knot), so max is the next number above 1 in u's dtype
    return torch.ops.aten.hardtanh_backward(b, u, -1.0, _next_above_one(u.dtype))


def _smoothstep_eb(b, u):
    # 1.5 (1 - u^2) is < 0 exactly where |u| > 1 and 0 at |u| = 1, so a clamp is the whole piece table
    return (1.0 - u * u).clamp_min_(0.0).mul_(b).mul_(1.5)


def _arctan_eb(b, u):
    return b / (u * u).add_(1.0)


_NEXT_ABOVE_ONE = {}


def _next_above_one(dtype: torch.dtype) -> float:
    if dtype not in _NEXT_ABOVE_ONE:
        one = torch.ones((), dtype=dtype)
        _NEXT_ABOVE_ONE[dtype] = float(torch.nextafter(one, one + 1))
    return _NEXT_ABOVE_ONE[dtype]


_FAST_EB = {
    _act.KIND_RELU: _relu_eb,
    _act.KIND_ARCTAN: _arctan_eb,
    _act.KIND_HARDTANH: _hardtanh_eb,
    _act.KIND_SMOOTHSTEP: _smoothstep_eb,
    _act.KIND_IDENTITY: lambda b, u: b,
}


def eb_signal(act: _act.Activation, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The explicit-backprop signal b * sigma'(u), same conventions as ``act.derivative``."""
    fast = _FAST_EB.get(act.kind)
    return fast(b, u) if fast is not None else b * act.derivative(u)
