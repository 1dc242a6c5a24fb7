"""``ImplicitLinear``: a fully connected layer plus activation trained by implicit backprop."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from torchopt_ext import activations as _act
from torchopt_ext.nn import hyper
from torchopt_ext.nn.functional import implicit_linear


class ImplicitLinear(nn.Module):
    """y = activation(x W^T + b) for x of shape (*, in_features).

    The backward passes the ordinary (explicit) gradient to x and writes the implicit-backprop
    gradient to W and b, so one ``ImplicitSGD`` (or plain SGD with the same lr) step is the implicit
    step of the paper. eta and mu come from the param group of the ImplicitSGD that manages
    ``weight`` at backward time; an unmanaged layer uses ``lr`` / ``weight_decay`` if you set them,
    and raises otherwise.

    For the built-in activations in float32/float64 the layer runs as one C++ autograd node
    (csrc/implicit_linear.cpp) that asks for eta and mu at backward time; that node holds the
    layer's id, not the layer, so delete a layer only after its backward has run. Under
    torch.compile the layer traces (fullgraph too) and its backward is one opaque op that reads
    eta and mu when the compiled backward runs, so a scheduler's lr takes effect there as well.
    Anything else (a PiecewiseCubic, autocast, no compiled extension) runs in Python; all three
    paths compute the gradients of ``torchopt_ext.nn.grads.implicit_grads``.

    Each backward through the layer writes the decay term mu W/(1+eta mu) once
    (docs/design.md#grad-convention). Calling the layer k times before one backward (weight sharing),
    or accumulating k backwards before one step, therefore adds the decay k times; use weight_decay=0
    there or divide.

    Args:
        in_features, out_features: sizes n and m.
        activation: "relu", "arctan", "hardtanh", "smoothstep", "identity" or a PiecewiseCubic.
        bias: learn an additive bias (z gets a trailing 1).
    """

    def __init__(self, in_features: int, out_features: int,
                 activation: Union[str, _act.Activation] = "relu", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ImplicitLinear: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.activation = _act.get(activation)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        # explicit eta / mu for a layer no ImplicitSGD manages (None: ask the optimizer)
        self.lr: Optional[float] = None
        self.weight_decay: Optional[float] = None
        self.reset_parameters()
        hyper.mark(self)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """activation(x W^T + b); x has shape (*, in_features)."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"ImplicitLinear: input must have shape (*, in_features={self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        return implicit_linear(x, self.weight, self.bias, self.activation, self)

    def __setstate__(self, state):
        # deepcopy/pickle rebuild the parameters without their tag: put it back
        super().__setstate__(state)
        hyper.mark(self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation.name!r}, bias={self.bias is not None}")
