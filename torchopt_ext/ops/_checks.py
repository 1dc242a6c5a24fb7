"""Argument checks shared by the ops' Python wrappers: each error names the argument and what
was expected."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch._subclasses.fake_tensor import is_fake

Scalar = Union[float, int, torch.Tensor]


def has_values(t: torch.Tensor) -> bool:
    """False for a tensor that carries only shape, dtype and device: meta, or fake (FakeTensorMode)."""
    return not (t.is_meta or is_fake(t))


def only_shapes_known(*tensors) -> bool:
    """True outside torch.compile when a tensor has no values: then only shapes can be checked
    (under torch.compile the tensors are fake too, but the op runs later on real ones)."""
    if torch.compiler.is_compiling():
        return False
    return not all(has_values(t) for t in tensors if isinstance(t, torch.Tensor))


def scalar_arg(name: str, value: Scalar, *, positive: bool, shape_only: bool = False) -> float:
    """A Python float from a number or a 0-dim tensor, checked finite and > 0 (or >= 0).

    With shape_only (meta or fake inputs, whose result has no values either) a tensor is not read
    and comes back as NaN; a number is still checked."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
        if shape_only:
            return math.nan
        if not has_values(value):
            raise ValueError(f"{name} must be a number or a tensor with a value, got a {value.device.type} tensor "
                             "without one (meta or fake) for inputs with values")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_ib_alpha(pre, grad_out, z_sqnorm, check_values: bool = True) -> None:
    for name, t in (("pre", pre), ("grad_out", grad_out), ("z_sqnorm", z_sqnorm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ib_alpha: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"ib_alpha: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if grad_out.dtype != pre.dtype or z_sqnorm.dtype != pre.dtype:
        raise TypeError(
            f"ib_alpha: pre, grad_out and z_sqnorm must share one dtype, got {pre.dtype}, {grad_out.dtype}, "
            f"{z_sqnorm.dtype}"
        )
    if pre.dim() < 1:
        raise ValueError("ib_alpha: pre must have shape (..., m) with at least one dimension, got a 0-dim tensor")
    if grad_out.shape != pre.shape:
        raise ValueError(f"ib_alpha: grad_out must have pre's shape {tuple(pre.shape)}, got {tuple(grad_out.shape)}")
    if z_sqnorm.shape != pre.shape[:-1]:
        raise ValueError(
            f"ib_alpha: z_sqnorm must have shape pre.shape[:-1] = {tuple(pre.shape[:-1])} (one squared input "
            f"norm per sample, bias's 1 included), got {tuple(z_sqnorm.shape)}"
        )
    if grad_out.device != pre.device or z_sqnorm.device != pre.device:
        raise ValueError(
            f"ib_alpha: pre, grad_out and z_sqnorm must be on one device, got {pre.device}, {grad_out.device}, "
            f"{z_sqnorm.device}"
        )
    # data check (a host sync on CUDA); skipped while tracing, where it would break the graph, and
    # on tensors without values. NaN passes on purpose: it only makes its own elements' alpha NaN.
    if check_values and z_sqnorm.numel() and not torch.compiler.is_compiling() and has_values(z_sqnorm):
        if bool((z_sqnorm <= 0).any()):
            raise ValueError("ib_alpha: z_sqnorm must be > 0 (it is ||z||^2 with the bias's 1, so >= 1 with a bias)")
