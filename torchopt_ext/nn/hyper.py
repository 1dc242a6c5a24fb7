"""Where an implicit layer finds its learning rate eta and weight decay mu at backward time.

The implicit step needs eta and mu *inside* the backward (alpha depends on them), but they belong
to the optimizer's param group, which schedulers, ``add_param_group`` and ``load_state_dict`` change
between steps. So the optimizer registers itself for every implicit parameter it manages
(``register``), and the backward asks ``resolve`` for the current values of the group that owns the
layer's weight. Nothing is cached: the group is looked up again at every backward.
"""
from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> weakref to the optimizer that manages it (weak both ways: neither keeps the other alive)
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()

# attribute set on the parameters of implicit layers; ImplicitSGD skips weight decay on them
MARK = "_implicit_backprop"


class Hyper(NamedTuple):
    """eta (learning rate), mu (weight decay) and whether the optimizer maximizes."""

    eta: float
    mu: float
    maximize: bool


# layer id -> layer, for the compiled layers' backward (which holds an id, not the module)
_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count(1)


def mark(module: torch.nn.Module) -> None:
    """Tag ``module``'s own parameters as implicit (their gradient already holds the decay), and
    give the module an id of its own (a deepcopy or unpickled copy gets a new one)."""
    for p in module.parameters(recurse=False):
        setattr(p, MARK, True)
    module._ib_id = next(_NEXT_ID)
    _LAYERS[module._ib_id] = module


def resolve_id(layer_id: int):
    """``resolve`` for the layer with this id, as a plain tuple (called from the compiled backward)."""
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise RuntimeError("implicit layer: the layer was deleted before its backward ran")
    return resolve(layer, layer.weight)  # a NamedTuple is a tuple


def is_implicit(p: torch.Tensor) -> bool:
    """True for a parameter of an implicit layer."""
    return bool(getattr(p, MARK, False))


def register(p: torch.Tensor, optimizer) -> None:
    """Make ``optimizer`` the owner of parameter ``p`` (the latest registration wins)."""
    _OWNER[p] = weakref.ref(optimizer)


def owner(p: torch.Tensor):
    """The optimizer registered for ``p``, or None."""
    ref = _OWNER.get(p)
    return None if ref is None else ref()


def _as_float(value) -> float:
    # torch.optim allows a tensor lr; the kernels take a Python float
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def resolve(layer: torch.nn.Module, weight: torch.Tensor) -> Hyper:
    """eta, mu and maximize for ``layer``'s backward, read now.

    The param group of the optimizer managing ``weight`` wins; otherwise the layer's explicit
    ``lr`` / ``weight_decay`` attributes; otherwise a RuntimeError (an unmanaged layer has no eta).
    """
    opt = owner(weight)
    if opt is not None:
        for group in opt.param_groups:
            for p in group["params"]:  # (a plain loop: any() over a generator costs a frame)
                if p is weight:
                    return Hyper(
                        _as_float(group["lr"]),
                        _as_float(group.get("weight_decay", 0.0)),
                        bool(group.get("maximize", False)),
                    )
    lr: Optional[float] = getattr(layer, "lr", None)
    if lr is not None:
        mu = getattr(layer, "weight_decay", None)
        return Hyper(_as_float(lr), 0.0 if mu is None else _as_float(mu), False)
    raise RuntimeError(
        f"{type(layer).__name__}: backward needs the learning rate eta, but no "
        "torchopt_ext.optim.ImplicitSGD manages this layer's weight. Create "
        "ImplicitSGD(model.parameters(), lr=...) before the backward, or set layer.lr (and "
        "layer.weight_decay) explicitly."
    )
