"""The autograd function of an implicit linear layer: y = sigma(x W^T + bias).

Backward (docs/design.md#grad-convention), with b = dL/dy, q = x W^T + bias and
z = [x, 1]:
    input grad  = (b * sigma'(q)) @ W                         (ordinary explicit backprop)
    weight grad = mu W / (1 + eta mu) + sum_i alpha_i x_i^T   (bias: mu bias/(1+eta mu) + sum_i alpha_i)
so that SGD's theta - eta * grad is exactly the implicit step. eta and mu are read from the owning
optimizer's param group when the backward runs (see hyper.py).

Under torch.compile the layer is ``_TracedImplicitLinearFunction``: its backward is the opaque op
torchopt_ext::implicit_linear_layer_backward, which holds the layer's id and calls
``hyper.resolve_id`` when the compiled backward runs, so a scheduler's new lr (float or tensor)
reaches it without a recompile and without the optimizer lookup inside the traced graph.

Scaling of b (alpha is nonlinear in b, so it matters): b is the loss's gradient as given. With a
mean-reduced loss over B samples each sample's b carries 1/B. Under DistributedDataParallel with R
ranks each rank solves its own samples with b_i = (1/B_rank) dl_i/dy and DDP then averages the
gradients, so the step is mu theta/(1+eta mu) + (1/R) sum_ranks sum_i alpha_i(b_i) z_i, which is not
the single-process step on the mean over all R*B_rank samples (tests/test_ddp_implicit.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext import activations as _act
from torchopt_ext._extension import _C
from torchopt_ext.nn import hyper
from torchopt_ext.nn.activation_fns import eb_signal, functions
from torchopt_ext.nn.alpha import alpha as _alpha
from torchopt_ext.ops.ib_alpha import _compiled_for

if _C is not None:  # the compiled layer node asks hyper.resolve_id for eta at backward time
    _C.set_hyper_resolver(hyper.resolve_id)

_BUILTIN = (_act.KIND_RELU, _act.KIND_ARCTAN, _act.KIND_HARDTANH, _act.KIND_SMOOTHSTEP, _act.KIND_IDENTITY)
_NODE_DTYPES = (torch.float32, torch.float64)


def _one_op_backward(act: _act.Activation, weight, *tensors) -> bool:
    """The whole backward as one compiled op (csrc/implicit_linear.cpp): built-in activations,
    one float32/float64 dtype throughout (autocast's mixed dtypes take the Python path)."""
    dt = weight.dtype
    return (act.kind in _BUILTIN and dt in (torch.float32, torch.float64)
            and all(t.dtype == dt for t in tensors) and _compiled_for(weight.device))


class ImplicitLinearFunction(torch.autograd.Function):
    """sigma(x W^T + bias) whose weight/bias gradients are the implicit-backprop gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, act: _act.Activation, layer):
        q = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, bias, q)
        ctx.act, ctx.layer = act, layer
        return functions(act)[0](q)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, q = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = _grads(x, weight, bias, q, grad_y, ctx.act, lambda: hyper.resolve(layer, weight),
                            need_x, need_w, need_b)
        return gx, gw, gb, None, None


def _grads(x, weight, bias, q, grad_y, act: _act.Activation, hyper_now: Callable[[], hyper.Hyper],
           need_x: bool, need_w: bool, need_b: bool):
    """(input, weight, bias) gradients, None where not needed; ``hyper_now()`` gives eta, mu and
    maximize and is called only when a weight or bias gradient is needed."""
    if _one_op_backward(act, weight, x, q, grad_y):
        eta, mu, maximize = hyper_now() if need_w or need_b else (0.0, 0.0, False)
        gx, gw, gb = torch.ops.torchopt_ext.implicit_linear_backward(
            x, weight, bias, q, grad_y, eta, mu, maximize, act.kind, need_x, need_w, need_b)
        return (gx if need_x else None, gw if need_w else None,
                gb if need_b and bias is not None else None)
    n, m = weight.shape[1], weight.shape[0]
    grad_x = grad_w = grad_bias = None
    # under autocast q, grad_y (and x) may be float16/bfloat16: the gradients are formed in the
    # weight's dtype (autograd casts grad_x back to x's dtype)
    wdt = weight.dtype
    if need_x:
        grad_x = eb_signal(act, grad_y, q).to(wdt) @ weight
    if need_w or need_b:
        eta, mu, maximize = hyper_now()
        x2 = x.reshape(-1, n).to(wdt)
        q2 = q.reshape(-1, m).to(wdt)
        b2 = grad_y.reshape(-1, m).to(wdt)
        if maximize:  # maximizing L is minimizing -L: solve with -b, hand the optimizer -grad
            b2 = -b2
        # ||z||^2 with the bias's trailing 1
        z_sqnorm = None
        if act.kind != _act.KIND_IDENTITY:  # identity's alpha does not depend on ||z||^2
            z_sqnorm = torch.linalg.vecdot(x2, x2)
            if bias is not None:
                z_sqnorm += 1.0
        a = _alpha(q2, b2, z_sqnorm, eta, mu, act)
        shrink = mu / (1.0 + eta * mu)  # the decay part of theta/(1+eta mu), written as a gradient
        if maximize:
            a = -a
        if need_w:
            # one addmm writes sum_i alpha_i x_i^T plus the signed decay term
            grad_w = (torch.addmm(weight, a.t(), x2, beta=-shrink if maximize else shrink)
                      if shrink else a.t() @ x2)
        if need_b and bias is not None:
            grad_bias = a.sum(0)
            if shrink:
                grad_bias = grad_bias.add_(bias, alpha=-shrink if maximize else shrink)
    return grad_x, grad_w, grad_bias


_BY_KIND = {_act.get(name).kind: _act.get(name) for name in _act.NAMES}


@torch.library.custom_op("torchopt_ext::implicit_linear_layer_backward", mutates_args=())
def _layer_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    q: torch.Tensor, grad_y: torch.Tensor, kind: int, layer_id: int, need_x: bool,
                    need_w: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of the layer with id ``layer_id`` (a built-in activation ``kind``), eta and mu
    read from its optimizer now; an unneeded gradient comes back empty. Opaque to torch.compile,
    so the lookup happens when the compiled backward runs, not when it is traced."""
    gx, gw, gb = _grads(x, weight, bias, q, grad_y, _BY_KIND[kind], lambda: hyper.resolve_id(layer_id),
                        need_x, need_w, need_b)
    # outputs must be fresh, contiguous tensors to match the fake kernel
    empty = weight.new_empty(0)
    return (empty if gx is None else gx.contiguous(), empty.clone() if gw is None else gw.contiguous(),
            empty.clone() if gb is None else gb.contiguous())


@_layer_backward.register_fake
def _layer_backward_fake(x, weight, bias, q, grad_y, kind, layer_id, need_x, need_w, need_b):
    torch._check(q.shape == grad_y.shape)
    gx = weight.new_empty(x.shape) if need_x else weight.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    gb = weight.new_empty(bias.shape) if need_b and bias is not None else weight.new_empty(0)
    return gx, gw, gb


class _TracedImplicitLinearFunction(torch.autograd.Function):
    """``ImplicitLinearFunction`` for torch.compile: the layer travels as its id and the backward
    is one opaque op (no module or optimizer lookup inside the traced region)."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind: int, layer_id: int):
        q = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, bias, q)
        ctx.kind, ctx.layer_id = kind, layer_id
        return functions(_BY_KIND[kind])[0](q)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, q = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        gx, gw, gb = torch.ops.torchopt_ext.implicit_linear_layer_backward(
            x, weight, bias, q, grad_y, ctx.kind, ctx.layer_id, need_x, need_w, need_b)
        return gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None


def _compiled_node(act: _act.Activation, x: torch.Tensor, weight: torch.Tensor, layer) -> bool:
    """Whether the layer can run as one C++ autograd node (no Python in forward or backward but
    the eta lookup): built-in activation, one float32/float64 dtype, the extension built for the
    device, no autocast (its casts are the Python path's), no torch.compile tracing (it cannot
    look inside a pybind call). Written for speed: at n = m = 100 this test is on every step."""
    dt = weight.dtype
    if act.kind not in _BUILTIN or x.dtype != dt or dt not in _NODE_DTYPES or _C is None:
        return False
    if getattr(layer, "_ib_id", None) is None or torch.compiler.is_compiling():
        return False
    if weight.is_cpu:
        return not torch.is_autocast_enabled("cpu")
    return _compiled_for(weight.device) and not torch.is_autocast_enabled(weight.device.type)


def implicit_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    activation, layer: torch.nn.Module) -> torch.Tensor:
    """sigma(x W^T + bias) with implicit-backprop gradients; ``layer`` supplies eta and mu."""
    act = _act.get(activation)
    if _compiled_node(act, x, weight, layer):
        return _C.implicit_linear(x, weight, bias, act.kind, layer._ib_id)
    if (torch.compiler.is_compiling() and act.kind in _BUILTIN
            and getattr(layer, "_ib_id", None) is not None):
        return _TracedImplicitLinearFunction.apply(x, weight, bias, act.kind, layer._ib_id)
    return ImplicitLinearFunction.apply(x, weight, bias, act, layer)
