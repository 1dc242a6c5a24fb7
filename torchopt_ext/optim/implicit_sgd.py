"""``ImplicitSGD``: SGD that drives implicit layers (their gradients already hold the implicit
step) and plain SGD for every other parameter, in one optimizer."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd as _sgd

from torchopt_ext.nn import hyper


class ImplicitSGD(Optimizer):
    """Stochastic gradient descent for models mixing implicit (IB) and explicit (EB) layers.

    Parameters of implicit layers (``torchopt_ext.nn.ImplicitLinear``, ``ImplicitRNN``) carry the
    implicit gradient ``mu theta/(1+eta mu) + sum_i alpha_i z_i``, whose weight decay is already
    inside, so they step ``theta - lr * grad`` (with momentum if asked) and get no extra decay.
    All other parameters follow ``torch.optim.SGD`` exactly. The optimizer registers itself on the
    implicit parameters: their layers' backward reads the lr, weight_decay and maximize of the group
    owning the weight at the time of that backward, so schedulers, ``add_param_group`` and
    ``load_state_dict`` take effect at the next backward.

    Args match ``torch.optim.SGD``: lr (eta), momentum, dampening, weight_decay (mu), nesterov,
    maximize.
    """

    def __init__(self, params: ParamsT, lr: Union[float, torch.Tensor], momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False) -> None:
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not float(v) >= 0.0:
                raise ValueError(f"ImplicitSGD: {name} must be >= 0, got {v!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("ImplicitSGD: nesterov=True requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (as torch.optim.Optimizer does) and own its implicit parameters."""
        super().add_param_group(param_group)
        self._register(self.param_groups[-1])

    def _register(self, group: dict) -> None:
        for p in group["params"]:
            if hyper.is_implicit(p):
                hyper.register(p, self)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # runs on load_state_dict, unpickling and deepcopy: (re)claim the implicit parameters
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            self._register(group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One SGD step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # implicit parameters: their decay is inside the gradient already
            for implicit in (True, False):
                params, grads, bufs = [], [], []
                for p in group["params"]:
                    if p.grad is None or hyper.is_implicit(p) != implicit:
                        continue
                    params.append(p)
                    grads.append(p.grad)
                    bufs.append(self.state[p].get("momentum_buffer") if group["momentum"] else None)
                if not params:
                    continue
                _sgd(params, grads, bufs,
                     weight_decay=0.0 if implicit else group["weight_decay"],
                     momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                     nesterov=group["nesterov"], maximize=group["maximize"],
                     has_sparse_grad=any(g.is_sparse for g in grads), foreach=None)
                if group["momentum"]:
                    for p, buf in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = buf
        return loss
