"""``ImplicitRNN``: an Elman RNN whose cells are implicit linear maps on z = [x_t, h_{t-1}, 1].

h_t = sigma(W_ih x_t + W_hh h_{t-1} + bias). Each step is one implicit "sample": with
b_t = dL/dh_t (everything flowing back into h_t), its alpha_t solves the per-neuron problem with
||z_t||^2 = ||x_t||^2 + ||h_{t-1}||^2 + 1, and the layer's gradient is
    mu theta/(1+eta mu) + sum_t sum_i alpha_{t,i} z_{t,i}^T,
alphas summed over steps and samples as for a minibatch. The decay term must enter once per
backward, not once per step, so it lives in ``_Decay``, which wraps each weight once per forward and
sees the sum of all steps' gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from torchopt_ext import activations as _act
from torchopt_ext.nn import hyper
from torchopt_ext.nn.activation_fns import eb_signal, functions
from torchopt_ext.nn.alpha import alpha as _alpha


class _Decay(torch.autograd.Function):
    """Identity on a weight; backward adds the implicit decay mu theta/(1+eta mu) (signed)."""

    @staticmethod
    def forward(ctx, theta, layer, key):
        ctx.layer, ctx.key = layer, key
        ctx.save_for_backward(theta)
        return theta.view_as(theta)

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        eta, mu, maximize = hyper.resolve(ctx.layer, ctx.key)
        shrink = mu / (1.0 + eta * mu)
        if shrink:
            grad = grad + (-shrink if maximize else shrink) * theta
        return grad, None, None


class _Cell(torch.autograd.Function):
    """One step h = sigma(x W_ih^T + h_prev W_hh^T + bias) with implicit weight gradients
    (without the decay term, which _Decay adds once)."""

    @staticmethod
    def forward(ctx, x, h_prev, w_ih, w_hh, bias, act, layer, key):
        q = torch.addmm(bias, x, w_ih.t()) if bias is not None else x @ w_ih.t()
        q = q.addmm_(h_prev, w_hh.t())
        ctx.save_for_backward(x, h_prev, w_ih, w_hh, q)
        ctx.act, ctx.layer, ctx.key, ctx.has_bias = act, layer, key, bias is not None
        return functions(act)[0](q)

    @staticmethod
    def backward(ctx, grad_h):
        x, h_prev, w_ih, w_hh, q = ctx.saved_tensors
        act = ctx.act
        g_q = eb_signal(act, grad_h, q)  # explicit signal for x_t and h_{t-1}
        grad_x = g_q @ w_ih if ctx.needs_input_grad[0] else None
        grad_hp = g_q @ w_hh if ctx.needs_input_grad[1] else None
        eta, mu, maximize = hyper.resolve(ctx.layer, ctx.key)
        b = -grad_h if maximize else grad_h
        z_sqnorm = (x * x).sum(-1) + (h_prev * h_prev).sum(-1) + (1.0 if ctx.has_bias else 0.0)
        a = _alpha(q, b, z_sqnorm, eta, mu, act)
        if maximize:
            a = -a
        at = a.t()
        grad_bias = a.sum(0) if ctx.has_bias else None
        return grad_x, grad_hp, at @ x, at @ h_prev, grad_bias, None, None, None


class ImplicitRNN(nn.Module):
    """Elman RNN trained by implicit backprop (multi-layer, like ``torch.nn.RNN`` with one bias).

    Input (T, B, input_size), or (B, T, input_size) with ``batch_first``, or unbatched (T, input_size);
    optional h0 (num_layers, B, hidden_size). Returns (output, h_n) as torch.nn.RNN does. Parameters
    of layer k: ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_l{k}``; eta and mu come from the
    group owning ``weight_hh_l{k}`` (keep a layer's parameters in one group).
    """

    def __init__(self, input_size: int, hidden_size: int,
                 activation: Union[str, _act.Activation] = "arctan", num_layers: int = 1,
                 batch_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ImplicitRNN: {name} must be a positive int, got {v!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.has_bias = batch_first, bias
        self.activation = _act.get(activation)
        self.lr: Optional[float] = None
        self.weight_decay: Optional[float] = None
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(hidden_size, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(hidden_size, hidden_size)))
            self.register_parameter(f"bias_l{k}", nn.Parameter(torch.empty(hidden_size)) if bias else None)
        self.reset_parameters()
        hyper.mark(self)

    def reset_parameters(self) -> None:
        """torch.nn.RNN's initialisation: U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the sequence; returns (output of the last layer at every step, final hidden states)."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(
                f"ImplicitRNN: input must have shape (T, B, input_size={self.input_size}) "
                f"(or (B, T, ...) with batch_first, or (T, input_size)), got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, B, self.hidden_size)
        elif unbatched:
            h0 = h0.unsqueeze(1)
        if h0.shape != (self.num_layers, B, self.hidden_size):
            raise ValueError(f"ImplicitRNN: h0 must have shape {(self.num_layers, B, self.hidden_size)}, "
                             f"got {tuple(h0.shape)}")
        layer_in = x
        finals = []
        for k in range(self.num_layers):
            key = getattr(self, f"weight_hh_l{k}")
            w_ih = _Decay.apply(getattr(self, f"weight_ih_l{k}"), self, key)
            w_hh = _Decay.apply(key, self, key)
            bias = getattr(self, f"bias_l{k}")
            if bias is not None:
                bias = _Decay.apply(bias, self, key)
            h = h0[k]
            outs = []
            for t in range(T):
                h = _Cell.apply(layer_in[t], h, w_ih, w_hh, bias, self.activation, self, key)
                outs.append(h)
            layer_in = torch.stack(outs)
            finals.append(h)
        out, h_n = layer_in, torch.stack(finals)
        if unbatched:
            return out.squeeze(1), h_n.squeeze(1)
        return (out.transpose(0, 1) if self.batch_first else out), h_n

    def __setstate__(self, state):
        super().__setstate__(state)
        hyper.mark(self)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, activation={self.activation.name!r}, "
                f"num_layers={self.num_layers}, batch_first={self.batch_first}")
