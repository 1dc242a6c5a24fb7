"""``ib_alpha``: the per-(sample, neuron) alpha of the implicit-backprop step, compiled.

See ``ib_alpha_reference`` for the same contract in plain PyTorch ops, and
csrc/include/torchopt_ext/ib_alpha_math.h for the solvers.
"""
from __future__ import annotations

from typing import Union

import torch

from torchopt_ext import activations as _act
from torchopt_ext._extension import _C, cuda_available
from torchopt_ext.ops._checks import Scalar, check_ib_alpha, only_shapes_known, scalar_arg
from torchopt_ext.ops.ib_alpha_reference import alpha_reference_float64

ActivationLike = Union[str, _act.Activation]


def _alpha_like(pre: torch.Tensor) -> torch.Tensor:
    """An uninitialised alpha: pre's shape, dtype and device, contiguous (as the kernels return it)."""
    return torch.empty_like(pre, memory_format=torch.contiguous_format)


if _C is not None:

    @torch.library.register_fake("torchopt_ext::ib_alpha")
    def _ib_alpha_fake(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients):
        torch._check(grad_out.shape == pre.shape)
        return _alpha_like(pre)


def _tables_without_values(act: _act.Activation, like: torch.Tensor):
    """(knots, coefficients) of act's shapes on like's meta or fake device. The shape rule reads
    no table, and the activation's cache of tables must not take a fake tensor."""
    shapes = [(0,), (0, 4)] if act.coefficients is None else [act.knots.shape, act.coefficients.shape]
    return tuple(like.new_empty(shape, dtype=torch.float64) for shape in shapes)


def _compiled_for(device: torch.device) -> bool:
    return _C is not None and (device.type == "cpu" or (device.type == "cuda" and cuda_available()))


def ib_alpha(
    pre: torch.Tensor,
    grad_out: torch.Tensor,
    z_sqnorm: torch.Tensor,
    lr: Scalar,
    weight_decay: Scalar = 0.0,
    activation: ActivationLike = "relu",
) -> torch.Tensor:
    """alpha of the implicit-backprop step for every sample and neuron.

    Args:
        pre: (..., m) pre-activations q = theta_j^T z.
        grad_out: (..., m) upstream gradients b = dL/dsigma(q), as the loss gives them.
        z_sqnorm: (...) squared norm of each sample's input, the bias's 1 included (> 0).
        lr: the learning rate eta (> 0), a float or a 0-dim tensor.
        weight_decay: the ridge coefficient mu (>= 0).
        activation: "relu", "arctan", "hardtanh", "smoothstep", "identity" or a PiecewiseCubic.

    Returns alpha with pre's shape and dtype: theta_j+ = theta_j/(1 + eta mu) - eta sum alpha z.
    float16/bfloat16 are computed in float32. NaN or Inf in an element of pre/grad_out (or in a
    sample's z_sqnorm) makes only that element's (that sample's) alpha NaN.

    alpha is not differentiable; inputs are treated as constants (the result never requires grad).
    Meta or fake (FakeTensorMode) inputs give an alpha of the right shape, dtype and device through
    the op's fake kernel; their values, and a tensor lr's, are not checked.
    """
    act = _act.get(activation)
    no_values = only_shapes_known(pre, grad_out, z_sqnorm)
    eta = scalar_arg("lr", lr, positive=True, shape_only=no_values)
    mu = scalar_arg("weight_decay", weight_decay, positive=False, shape_only=no_values)
    check_ib_alpha(pre, grad_out, z_sqnorm)
    if no_values and _C is not None:
        knots, coef = _tables_without_values(act, pre)
        return torch.ops.torchopt_ext.ib_alpha(pre, grad_out, z_sqnorm, eta, mu, act.kind, knots, coef)
    if not _compiled_for(pre.device):
        return ib_alpha_reference(pre, grad_out, z_sqnorm, eta, mu, act)
    knots, coef = act.tables(pre.device)
    return torch.ops.torchopt_ext.ib_alpha(pre, grad_out, z_sqnorm, eta, mu, act.kind, knots, coef)


def ib_alpha_reference(
    pre: torch.Tensor,
    grad_out: torch.Tensor,
    z_sqnorm: torch.Tensor,
    lr: Scalar,
    weight_decay: Scalar = 0.0,
    activation: ActivationLike = "relu",
) -> torch.Tensor:
    """``ib_alpha`` in plain PyTorch ops (computed in float64): the ground truth and the fallback.
    Meta or fake inputs give an uninitialised alpha of the right shape, dtype and device."""
    act = _act.get(activation)
    no_values = only_shapes_known(pre, grad_out, z_sqnorm)
    eta = scalar_arg("lr", lr, positive=True, shape_only=no_values)
    mu = scalar_arg("weight_decay", weight_decay, positive=False, shape_only=no_values)
    check_ib_alpha(pre, grad_out, z_sqnorm)
    if no_values:
        return _alpha_like(pre)
    q = pre.detach().to(torch.float64)
    b = grad_out.detach().to(torch.float64)
    z = z_sqnorm.detach().to(torch.float64).unsqueeze(-1).expand_as(q)
    return alpha_reference_float64(q, b, z, eta, mu, act).to(pre.dtype)
