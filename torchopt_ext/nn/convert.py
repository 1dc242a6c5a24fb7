"""``implicit(model)``: turn every nn.Linear followed by a supported activation into ImplicitLinear.

Only consecutive children of an ``nn.Sequential`` count as "followed by" (elsewhere the order of
calls is not known from the module tree). The Linear becomes an ImplicitLinear holding the same
weights and the activation module becomes ``nn.Identity`` (the layer applies it). Everything else
(convolutions, norms, attention, Linear without a supported activation) stays explicit backprop
and keeps working in the same model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Tuple, Union

import torch
from torch import nn

from torchopt_ext import activations as _act
from torchopt_ext.nn import hyper
from torchopt_ext.nn.linear import ImplicitLinear
from torchopt_ext.nn.modules import Arctan, Smoothstep
from torchopt_ext.nn.rnn import ImplicitRNN

# activations that need a fitted piecewise cubic: (function, lo, hi, pieces)
_FITTABLE: Dict[type, Tuple[Callable, float, float, int]] = {
    nn.Tanh: (torch.tanh, -4.0, 4.0, 32),
    nn.Sigmoid: (torch.sigmoid, -8.0, 8.0, 32),
    nn.GELU: (nn.functional.gelu, -4.0, 4.0, 32),
}
_FIT_NAMES = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
_fitted_cache: Dict[type, _act.PiecewiseCubic] = {}


@dataclass
class ConversionReport:
    """What ``implicit`` did: ``converted`` and ``explicit`` hold "path: description" lines;
    ``max_fit_error`` the largest error of a fitted activation used (0 if none)."""

    converted: List[str] = field(default_factory=list)
    explicit: List[str] = field(default_factory=list)
    max_fit_error: float = 0.0

    def __str__(self) -> str:
        lines = [f"implicit backprop ({len(self.converted)}):"] + [f"  {c}" for c in self.converted]
        lines += [f"explicit backprop ({len(self.explicit)}):"] + [f"  {e}" for e in self.explicit]
        if self.max_fit_error:
            lines.append(f"largest piecewise-cubic fit error: {self.max_fit_error:.2e}")
        return "\n".join(lines)


def _fit_types(fit) -> Tuple[type, ...]:
    if fit is True:
        return tuple(_FITTABLE)
    if not fit:
        return ()
    out = []
    for f in ([fit] if isinstance(fit, (str, type)) else fit):
        t = _FIT_NAMES.get(f.lower()) if isinstance(f, str) else f
        if t not in _FITTABLE:
            raise ValueError(f"implicit: fit must hold names from {sorted(_FIT_NAMES)} or their nn "
                             f"module types (or be True/False), got {f!r}")
        out.append(t)
    return tuple(out)


def _activation_of(mod: nn.Module, fit_types) -> Union[None, str, _act.Activation]:
    if isinstance(mod, nn.ReLU):
        return "relu"
    if isinstance(mod, nn.Hardtanh) and mod.min_val == -1.0 and mod.max_val == 1.0:
        return "hardtanh"
    if isinstance(mod, Arctan):
        return "arctan"
    if isinstance(mod, Smoothstep):
        return "smoothstep"
    if isinstance(mod, nn.Identity):
        return None
    for t in fit_types:
        if isinstance(mod, t) and (t is not nn.GELU or mod.approximate == "none"):
            if t not in _fitted_cache:
                fn, lo, hi, pieces = _FITTABLE[t]
                _fitted_cache[t] = _act.PiecewiseCubic.fit(fn, lo, hi, pieces, name=t.__name__.lower())
            return _fitted_cache[t]
    return None


def _convert_sequential(seq: nn.Sequential, prefix: str, fit_types, report: ConversionReport) -> None:
    names = list(seq._modules)
    for i, name in enumerate(names[:-1]):
        lin, nxt = seq._modules[name], seq._modules[names[i + 1]]
        if type(lin) is not nn.Linear:
            continue
        act = _activation_of(nxt, fit_types)
        if act is None:
            continue
        new = ImplicitLinear(lin.in_features, lin.out_features, act, bias=lin.bias is not None,
                             device=lin.weight.device, dtype=lin.weight.dtype)
        # the Linear's own Parameter objects move over (values, requires_grad, hooks and any
        # outside references stay valid), now tagged implicit
        new.weight = lin.weight
        if lin.bias is not None:
            new.bias = lin.bias
        hyper.mark(new)
        seq._modules[name] = new
        seq._modules[names[i + 1]] = nn.Identity()
        a = _act.get(act)
        if isinstance(a, _act.PiecewiseCubic) and a.max_error:
            report.max_fit_error = max(report.max_fit_error, a.max_error)
        report.converted.append(f"{prefix}{name} + {prefix}{names[i + 1]}: {lin} + {type(nxt).__name__} "
                                f"-> ImplicitLinear({a.name})")


def implicit(model: nn.Module, inplace: bool = False, fit: Union[bool, str, Iterable] = False):
    """Convert ``model``'s Linear+activation pairs to implicit backprop, keeping the weights.

    Args:
        model: any module; pairs are looked for inside every nn.Sequential.
        inplace: modify ``model`` itself (True) or a deep copy (False, the default).
        fit: also convert Linear followed by Tanh / Sigmoid / GELU through a fitted piecewise
            cubic (outputs then change by at most the fit's error): True for all, or names
            such as ("tanh",).

    Returns (model, report): the converted model and a ConversionReport listing what became
    implicit and which parameterised modules stay explicit. Create the ImplicitSGD after
    converting: it recognises the implicit parameters when it is constructed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"implicit: model must be a torch.nn.Module, got {type(model).__name__}")
    fit_types = _fit_types(fit)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    for path, mod in list(model.named_modules()):
        if isinstance(mod, nn.Sequential):
            _convert_sequential(mod, f"{path}." if path else "", fit_types, report)
    for path, mod in model.named_modules():
        if isinstance(mod, (ImplicitLinear, ImplicitRNN)):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            report.explicit.append(f"{path or '(root)'}: {type(mod).__name__}")
    return model, report
