"""The autograd of an implicit linear layer y = sigma(x W^T + bias), in its three execution paths.

The gradients (the input's explicit, the weight's and bias's implicit; docs/design.md#grad-convention)
are ``grads.implicit_grads`` and its compiled twin; eta and mu are read from the owning optimizer's param group when the
backward runs (see hyper.py). ``implicit_linear`` picks the path:
  - the C++ autograd node ``_C.implicit_linear`` (csrc/implicit_linear.cpp), eager built-in layers:
    no Python in forward or backward but the eta lookup;
  - ``_TracedImplicitLinearFunction`` under torch.compile: its backward is the opaque op
    torchopt_ext::implicit_linear_layer_backward, which holds the layer's id and calls
    ``hyper.resolve_id`` when the compiled backward runs, so a scheduler's new lr (float or tensor)
    reaches it without a recompile and without the optimizer lookup inside the traced graph;
  - ``ImplicitLinearFunction`` for everything else (a PiecewiseCubic, autocast, no extension, a
    module without an implicit-layer id).

Scaling of b (alpha is nonlinear in b, so it matters): b is the loss's gradient as given. With a
mean-reduced loss over B samples each sample's b carries 1/B. Under DistributedDataParallel with R
ranks each rank solves its own samples with b_i = (1/B_rank) dl_i/dy and DDP then averages the
gradients, so the step is mu theta/(1+eta mu) + (1/R) sum_ranks sum_i alpha_i(b_i) z_i, which is not
the single-process step on the mean over all R*B_rank samples (tests/nn/test_ddp_implicit.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext import activations as _act
from torchopt_ext._extension import _C
from torchopt_ext.nn import hyper
from torchopt_ext.nn.activation_fns import functions
from torchopt_ext.nn.grads import BUILTIN_KINDS, OP_DTYPES, linear_backward
from torchopt_ext.ops.ib_alpha import _compiled_for

if _C is not None:  # the compiled layer node asks hyper.resolve_id for eta at backward time
    _C.set_hyper_resolver(hyper.resolve_id)


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
        gx, gw, gb = linear_backward(x, weight, bias, q, grad_y, ctx.act, lambda: hyper.resolve(layer, weight),
                                     need_x, need_w, need_b)
        return gx, gw, gb, None, None


_BY_KIND = {_act.get(name).kind: _act.get(name) for name in _act.NAMES}


@torch.library.custom_op("torchopt_ext::implicit_linear_layer_backward", mutates_args=())
def _layer_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    q: torch.Tensor, grad_y: torch.Tensor, kind: int, layer_id: int, need_x: bool,
                    need_w: bool, need_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of the layer with id ``layer_id`` (a built-in activation ``kind``), eta and mu
    read from its optimizer now; an unneeded gradient comes back empty. Opaque to torch.compile,
    so the lookup happens when the compiled backward runs, not when it is traced."""
    gx, gw, gb = linear_backward(x, weight, bias, q, grad_y, _BY_KIND[kind], lambda: hyper.resolve_id(layer_id),
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


def _node_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ node takes a built-in layer in eager mode: one float32/float64 dtype, the
    extension built for the device, no autocast (its casts are the Python path's). Written for
    speed: at n = m = 100 this test is on every step."""
    dt = weight.dtype
    if x.dtype != dt or dt not in OP_DTYPES or _C is None:
        return False
    if weight.is_cpu:
        return not torch.is_autocast_enabled("cpu")
    return _compiled_for(weight.device) and not torch.is_autocast_enabled(weight.device.type)


def implicit_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    activation, layer: torch.nn.Module) -> torch.Tensor:
    """sigma(x W^T + bias) with implicit-backprop gradients; ``layer`` supplies eta and mu."""
    act = _act.get(activation)
    layer_id = getattr(layer, "_ib_id", None)
    if act.kind in BUILTIN_KINDS and layer_id is not None:
        if torch.compiler.is_compiling():
            # torch.compile cannot look inside the C++ node, and must not trace the eta lookup
            return _TracedImplicitLinearFunction.apply(x, weight, bias, act.kind, layer_id)
        if _node_runs(x, weight):
            # eager speed: one C++ autograd node, Python only for the eta lookup
            return _C.implicit_linear(x, weight, bias, act.kind, layer_id)
    # any activation, dtype mix or device, in Python around the one backward wrapper
    return ImplicitLinearFunction.apply(x, weight, bias, act, layer)
