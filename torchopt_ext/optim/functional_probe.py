"""A probe closure that can also evaluate all five probe points in one batched forward.

``FunctionalProbe(model, loss_fn, inputs, target)`` is an ordinary closure (``probe()`` returns
``loss_fn(model(inputs), target)``), and ``probe.batched(points)`` evaluates the model at a stack
of parameter sets with ``torch.func.functional_call`` under ``torch.func.vmap``: one forward over
five weight copies instead of five forwards. Dropout draws one mask for all five
(``randomness="same"``). The model's forward must not write to its buffers (batch norm in training
mode does: use the closure path, i.e. ``AdaptiveLRSGD(..., batched=False)``, for such models).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.func import functional_call, vmap


class FunctionalProbe:
    def __init__(self, model: nn.Module, loss_fn: Callable, inputs, target):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FunctionalProbe: model must be an nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn, self.inputs, self.target = model, loss_fn, inputs, target

    def __call__(self) -> torch.Tensor:
        return self.loss_fn(self.model(self.inputs), self.target)

    def batched(self, points: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Losses at K parameter sets: ``points[name]`` has shape (K, *param.shape). Returns (K,)."""
        buffers = dict(self.model.named_buffers())

        def loss_at(params):
            out = functional_call(self.model, {**params, **buffers}, (self.inputs,))
            return self.loss_fn(out, self.target)

        return vmap(loss_at, randomness="same")(points)
