"""A probe closure that can also evaluate all five probe points in one batched forward.

``FunctionalProbe(model, loss_fn, inputs, target)`` is an ordinary closure (``probe()`` returns
``loss_fn(model(inputs), target)``), and ``probe.batched(points)`` evaluates the model at a stack
of parameter sets with ``torch.func.functional_call`` under ``torch.func.vmap``: one forward over
five weight copies instead of five forwards. Dropout draws one mask for all five
(``randomness="same"``). The model's forward must not write to its buffers (batch norm in training
mode does: use the closure path, i.e. ``AdaptiveLRSGD(..., batched=False)``, for such models).

Fast path: an ``nn.Sequential`` of ``Linear`` layers, element-wise activations and ``Dropout`` is
evaluated by stacking the five weight sets, one broadcast matmul per layer (no ``functional_call``,
no vmap: on a CPU their per-op overhead cost more than the five forwards they replace).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

# modules that act element-wise, so they apply to a (K, B, ...) stack unchanged
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity)


def _stacked_sequential(model: nn.Module, points: Dict[str, torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """(K, B, out) outputs of an MLP-like Sequential at K stacked weight sets; None if not MLP-like."""
    if not isinstance(model, nn.Sequential) or not isinstance(x, torch.Tensor):
        return None
    if not all(isinstance(m, (nn.Linear, nn.Dropout) + _ELEMENTWISE) for m in model):
        return None
    h = x  # (B, in) for the first layer, broadcast against the K weight sets
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            w = points[f"{name}.weight"]  # (K, out, in)
            h = torch.matmul(h, w.transpose(-1, -2))
            if m.bias is not None:
                h = h + points[f"{name}.bias"].unsqueeze(-2)
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:  # one mask for all K points
                h = h * nn.functional.dropout(torch.ones_like(h[0] if h.dim() > x.dim() else h), m.p, True)
        else:
            h = m(h)
    return h


class FunctionalProbe:
    """A probe closure ``loss_fn(model(inputs), target)`` that can also evaluate K parameter sets at once."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any,
                 target: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FunctionalProbe: model must be an nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn, self.inputs, self.target = model, loss_fn, inputs, target

    def __call__(self) -> torch.Tensor:
        return self.loss_fn(self.model(self.inputs), self.target)

    def batched(self, points: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Losses at K parameter sets: ``points[name]`` has shape (K, *param.shape). Returns (K,)."""
        out = _stacked_sequential(self.model, points, self.inputs)
        if out is not None:
            return torch.stack([self.loss_fn(o, self.target) for o in out.unbind(0)])
        buffers = dict(self.model.named_buffers())

        def loss_at(params):
            out = functional_call(self.model, {**params, **buffers}, (self.inputs,))
            return self.loss_fn(out, self.target)

        return vmap(loss_at, randomness="same")(points)
