"""The gradients of an implicit linear layer y = sigma(x W^T + bias), written once.

With b = dL/dy, q = x W^T + bias and z = [x, 1] (docs/design.md, "the .grad convention"):
    input grad  = (b * sigma'(q)) @ W                         (ordinary explicit backprop)
    weight grad = mu W / (1 + eta mu) + sum_i alpha_i x_i^T   (bias: mu bias/(1+eta mu) + sum_i alpha_i)
so that SGD's theta - eta * grad is exactly the implicit step. ``implicit_grads`` is this formula in
PyTorch ops and the reference of the compiled op torchopt_ext::implicit_linear_backward
(csrc/implicit_linear.cpp, the formula in C++); ``linear_backward`` is the one place that picks
between the two.

Scaling of b (alpha is nonlinear in b, so it matters): b is the loss's gradient as given. With a
mean-reduced loss over B samples each sample's b carries 1/B. Under DistributedDataParallel with R
ranks each rank solves its own samples with b_i = (1/B_rank) dl_i/dy and DDP then averages the
gradients, so the step is mu theta/(1+eta mu) + (1/R) sum_ranks sum_i alpha_i(b_i) z_i, which is not
the single-process step on the mean over all R*B_rank samples (tests/nn/test_ddp_implicit.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from torchopt_ext import activations as _act
from torchopt_ext.nn import hyper
from torchopt_ext.nn.activation_fns import eb_signal
from torchopt_ext.nn.alpha import alpha
from torchopt_ext.ops.ib_alpha import _compiled_for

Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
Solver = Callable[..., torch.Tensor]

# the kinds and dtypes the compiled op takes; any other activation or dtype mix runs the formula here
BUILTIN_KINDS = (_act.KIND_RELU, _act.KIND_ARCTAN, _act.KIND_HARDTANH, _act.KIND_SMOOTHSTEP, _act.KIND_IDENTITY)
OP_DTYPES = (torch.float32, torch.float64)


def implicit_grads(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], q: torch.Tensor,
                   grad_y: torch.Tensor, eta: float, mu: float, maximize: bool, act: _act.Activation,
                   need_x: bool = True, need_w: bool = True, need_b: bool = True,
                   solve: Solver = alpha) -> Grads:
    """(input, weight, bias) gradients of sigma(x W^T + bias), None where not needed.

    One layer: x (*, n), weight (m, n), bias (m,) or None, q = x W^T + bias and grad_y = dL/dy
    (*, m). Or a stack of k layers: weight (k, m, n), bias (k, m) or None, x (N, n) shared by all or
    (k, N, n), q and grad_y (k, N, m); the input gradient is then (k, N, n), one per layer.

    ``maximize`` solves with -grad_y and returns the negated gradients (maximizing L is minimizing
    -L). ``solve(q, b, z_sqnorm, eta, mu, act)`` gives alpha: the layers' raw op by default; the
    benchmark's naive baseline passes the plain-PyTorch reference, the distillation's nets the
    checked ``ib_alpha``. Under autocast q, grad_y (and x) may be float16/bfloat16: the gradients
    are formed in the weight's dtype (autograd casts the input gradient back to x's dtype).
    """
    stack = weight.dim() == 3
    n, m = weight.shape[-1], weight.shape[-2]
    grad_x = grad_w = grad_bias = None
    wdt = weight.dtype
    if need_x:
        grad_x = eb_signal(act, grad_y, q).to(wdt) @ weight
    if need_w or need_b:
        if stack:  # the leading axis is the layers', the next the samples'
            x2, q2, b2 = x.to(wdt), q.to(wdt), grad_y.to(wdt)
        else:  # every leading axis is the samples'
            x2, q2, b2 = x.reshape(-1, n).to(wdt), q.reshape(-1, m).to(wdt), grad_y.reshape(-1, m).to(wdt)
        if maximize:
            b2 = -b2
        z_sqnorm = torch.linalg.vecdot(x2, x2)  # ||z||^2 with the bias's trailing 1
        if bias is not None:
            z_sqnorm += 1.0
        if stack:  # a shared x: the same norms for every layer
            z_sqnorm = z_sqnorm.expand(q2.shape[:-1]).contiguous()
        a = solve(q2, b2, z_sqnorm, eta, mu, act)
        if maximize:
            a = -a
        shrink = mu / (1.0 + eta * mu)  # the decay part of theta/(1+eta mu), written as a gradient
        signed = -shrink if maximize else shrink
        if need_w and stack:
            # formed transposed, (x^T alpha)^T: a stack's owner keeps W^T, which then comes out dense
            xt = x2.mT.expand(a.shape[0], -1, -1)
            grad_w = (torch.baddbmm(weight.mT, xt, a, beta=signed) if shrink else torch.matmul(xt, a)).mT
        elif need_w:
            # one addmm writes sum_i alpha_i x_i^T plus the signed decay term
            grad_w = torch.addmm(weight, a.t(), x2, beta=signed) if shrink else a.t() @ x2
        if need_b and bias is not None:
            grad_bias = a.sum(-2)
            if shrink:
                grad_bias = grad_bias.add_(bias, alpha=signed)
    return grad_x, grad_w, grad_bias


def _op_applies(act: _act.Activation, weight: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the compiled op computes these gradients: a built-in activation, one float32/float64
    dtype throughout (autocast's mixed dtypes take the formula here), the extension built for the
    device."""
    dt = weight.dtype
    return (act.kind in BUILTIN_KINDS and dt in OP_DTYPES and all(t.dtype == dt for t in tensors)
            and _compiled_for(weight.device))


def linear_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], q: torch.Tensor,
                    grad_y: torch.Tensor, act: _act.Activation, hyper_now: Callable[[], hyper.Hyper],
                    need_x: bool, need_w: bool, need_b: bool) -> Grads:
    """``implicit_grads`` by the compiled op where it applies, else in PyTorch ops; ``hyper_now()``
    gives eta, mu and maximize and is called only when a weight or bias gradient is needed."""
    if _op_applies(act, weight, x, q, grad_y):
        eta, mu, maximize = hyper_now() if need_w or need_b else (0.0, 0.0, False)
        gx, gw, gb = torch.ops.torchopt_ext.implicit_linear_backward(
            x, weight, bias, q, grad_y, eta, mu, maximize, act.kind, need_x, need_w, need_b)
        return (gx if need_x else None, gw if need_w else None,
                gb if need_b and bias is not None else None)
    eta, mu, maximize = hyper_now() if need_w or need_b else (0.0, 0.0, False)
    return implicit_grads(x, weight, bias, q, grad_y, eta, mu, maximize, act, need_x, need_w, need_b)
