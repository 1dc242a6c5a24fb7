"""Sample inputs for every custom op in ``torch.ops.torchopt_ext``, one table per op, each sample
held to the op's reference (the pattern of pytorch/extension-cpp's and bitsandbytes' op tests).

``TABLES[op].samples(device, requires_grad)`` builds the op's samples: with ``requires_grad`` only
those whose inputs require grad, which make opcheck test the op's autograd registration ([] for an
op that takes no differentiable input). ``TABLES[op].reference(*args)`` takes the op's own
arguments and returns what the op returns; a mutating op is compared on its mutated arguments.
The references are the package's pure-PyTorch ones (torchopt_ext.ops) or, for the layer backward,
its formula written out here from the activation's derivative and ``ib_alpha_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from torchopt_ext import activations
from torchopt_ext.ops import ib_alpha_reference
from torchopt_ext.ops.probe import guarded_lr_reference, newton_lr_reference, probe_move_reference_


@dataclass
class Sample:
    """One call of an op: ``name`` for the test id, ``args`` as the op takes them, ``keep`` the
    objects the args refer to only by id (a layer and its optimizer), held alive with the sample."""

    name: str
    args: Tuple[Any, ...]
    keep: Tuple[Any, ...] = ()


@dataclass
class OpTable:
    samples: Callable[[str, bool], List[Sample]]
    reference: Callable[..., Any]
    mutates: bool = False  # the op writes its first argument (a list of tensors) and returns nothing


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# ib_alpha(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients)

FITTED_SIGMOID = activations.PiecewiseCubic.fit(torch.sigmoid, -6, 6, 12, name="fitted_sigmoid")
ALPHA_ACTIVATIONS = [activations.get(name) for name in activations.NAMES] + [FITTED_SIGMOID]
_BY_KIND = {act.kind: act for act in map(activations.get, activations.NAMES)}  # the built-ins


def _activation_of(kind: int, knots: torch.Tensor, coefficients: torch.Tensor) -> activations.Activation:
    """The activation an op's (kind, knots, coefficients) describe: a built-in, or the table's cubic."""
    if kind == FITTED_SIGMOID.kind:
        return activations.PiecewiseCubic(knots.cpu(), coefficients.cpu())
    return _BY_KIND[kind]


def _alpha_inputs(shape, dtype, device, seed):
    g = _gen(seed)
    q = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    b = torch.randn(*shape, generator=g, dtype=torch.float64)
    z = torch.rand(*shape[:-1], generator=g, dtype=torch.float64) * 4 + 1
    return q.to(device, dtype), b.to(device, dtype), z.to(device, dtype)


def ib_alpha_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    out = []
    for seed, act in enumerate(ALPHA_ACTIVATIONS):
        knots, coef = act.tables(device)
        if requires_grad:
            if act.name in ("relu", "fitted_sigmoid"):  # a closed form and the table
                q, b, z = _alpha_inputs((8, 5), torch.float64, device, seed)
                out.append(Sample(f"{act.name}-requires-grad", (q.requires_grad_(), b, z, 0.1, 0.01, act.kind,
                                                                knots, coef)))
            continue
        q, b, z = _alpha_inputs((8, 5), torch.float64, device, seed)
        out.append(Sample(f"{act.name}-float64", (q, b, z, 0.1, 0.01, act.kind, knots, coef)))
        q, b, _ = _alpha_inputs((5, 8), torch.float32, device, seed)  # transposed: non-contiguous
        out.append(Sample(f"{act.name}-float32-transposed", (q.t(), b.t(), q.new_ones(8), 2.0, 0.0, act.kind,
                                                             knots, coef)))
    q, b, z = _alpha_inputs((3, 4, 6), torch.float64, device, 7)
    arctan = activations.get("arctan")
    out.append(Sample("arctan-batched-3d", (q, b, z, 0.5, 0.0, arctan.kind, *arctan.tables(device))))
    return out


def ib_alpha_op_reference(pre, grad_out, z_sqnorm, lr, weight_decay, kind, knots, coefficients):
    return ib_alpha_reference(pre, grad_out, z_sqnorm, lr, weight_decay, _activation_of(kind, knots, coefficients))


# ---------------------------------------------------------------------------------------------
# implicit_linear_backward(x, weight, bias, q, grad_y, eta, mu, maximize, kind, need_x, need_w, need_b)


def implicit_gradients(x, weight, bias, q, grad_y, eta, mu, maximize, act, need_x, need_w, need_b):
    """The layer's (input, weight, bias) gradients from the math, an unneeded one empty: the input
    gets b sigma'(q) W; the weight mu W/(1+eta mu) + sum_i alpha_i x_i^T with alpha solved for -b
    and negated when maximizing (eta = 0: alpha = b sigma'(q)); the bias likewise with z's 1."""
    m, n = weight.shape
    empty = weight.new_empty(0)
    sign = -1.0 if maximize else 1.0
    gx = (grad_y * act.derivative(q)) @ weight if need_x else empty
    x2, q2, b2 = x.reshape(-1, n), q.reshape(-1, m), grad_y.reshape(-1, m)
    if eta == 0.0:
        alpha = b2 * act.derivative(q2)
    else:
        z_sqnorm = (x2 * x2).sum(-1) + (0.0 if bias is None else 1.0)
        alpha = sign * ib_alpha_reference(q2, sign * b2, z_sqnorm, eta, mu, act)
    decay = sign * mu / (1.0 + eta * mu)
    gw = alpha.t() @ x2 + decay * weight if need_w else empty
    gb = alpha.sum(0) + decay * bias if need_b and bias is not None else empty
    return gx, gw, gb


def _linear_inputs(dtype, bias, batch, device, seed=0):
    g = _gen(seed)
    x = (torch.randn(*batch, 5, generator=g, dtype=torch.float64) * 2).to(device, dtype)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    q = torch.nn.functional.linear(x, w, b)
    return x, w, b, q, torch.randn(q.shape, generator=g, dtype=torch.float64).to(device, dtype)


# (activation, dtype, bias, batch shape, eta, mu, maximize, need_x/w/b): every built-in kind once,
# with bias or none, a 3-D input, decay, maximize, eta = 0 (the explicit limit), unneeded gradients
_LINEAR_CASES = [
    ("relu", torch.float64, True, (7,), 0.3, 0.01, False, (True, True, True)),
    ("arctan", torch.float32, False, (2, 3), 1.5, 0.0, True, (True, True, True)),
    ("arctan", torch.float64, True, (6,), 0.0, 0.1, False, (False, True, True)),
    ("hardtanh", torch.float32, True, (6,), 0.4, 0.05, False, (True, False, True)),
    ("smoothstep", torch.float64, True, (2, 3), 0.8, 0.0, True, (True, True, False)),
    ("identity", torch.float32, True, (6,), 0.4, 0.1, False, (True, True, True)),
]


def _case_name(act, dtype, bias, eta, maximize, needs):
    parts = [act, str(dtype).replace("torch.", "")]
    parts += [] if bias else ["nobias"]
    parts += ["eta0"] if eta == 0.0 else []
    parts += ["max"] if maximize else []
    parts += [] if all(needs) else ["need" + "".join(k for k, need in zip("xwb", needs) if need)]
    return "-".join(parts)


def implicit_linear_backward_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    if requires_grad:
        return []
    out = []
    for seed, (name, dtype, bias, batch, eta, mu, maximize, needs) in enumerate(_LINEAR_CASES):
        x, w, b, q, g = _linear_inputs(dtype, bias, batch, device, seed)
        kind = activations.get(name).kind
        out.append(Sample(_case_name(name, dtype, bias, eta, maximize, needs),
                          (x, w, b, q, g, eta, mu, maximize, kind, *needs)))
    return out


def implicit_linear_backward_reference(x, weight, bias, q, grad_y, eta, mu, maximize, kind, need_x, need_w, need_b):
    return implicit_gradients(x, weight, bias, q, grad_y, eta, mu, maximize, _BY_KIND[kind], need_x, need_w, need_b)


# ---------------------------------------------------------------------------------------------
# implicit_linear_layer_backward(x, weight, bias, q, grad_y, kind, layer_id, need_x, need_w, need_b):
# the layer backward under torch.compile, eta and mu read from the layer's optimizer when it runs

# layer id -> (eta, mu, maximize) its sample's optimizer was made with
_LAYER_HYPER: Dict[int, Tuple[float, float, bool]] = {}

# (activation, bias, lr, weight_decay, maximize, needs)
_LAYER_CASES = [
    ("relu", True, 0.5, 0.02, False, (True, True, True)),
    ("arctan", True, 0.5, 0.02, False, (False, True, False)),
    ("identity", True, 0.5, 0.02, False, (True, False, False)),
    ("smoothstep", False, 0.9, 0.0, True, (True, True, False)),
]


def implicit_linear_layer_backward_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    from torchopt_ext.nn import ImplicitLinear
    from torchopt_ext.optim import ImplicitSGD

    if requires_grad:
        return []
    out = []
    for seed, (name, bias, lr, wd, maximize, needs) in enumerate(_LAYER_CASES):
        torch.manual_seed(seed)
        layer = ImplicitLinear(5, 4, name, bias=bias).to(device, torch.float64)
        opt = ImplicitSGD(layer.parameters(), lr=lr, weight_decay=wd, maximize=maximize)
        _LAYER_HYPER[layer._ib_id] = (lr, wd, maximize)
        x, _, _, _, g = _linear_inputs(torch.float64, bias, (7,), device, seed)
        w = layer.weight.detach()
        b = None if layer.bias is None else layer.bias.detach()
        q = torch.nn.functional.linear(x, w, b)
        if not bias:
            g = g.t().contiguous().t()  # a column-major upstream gradient
        out.append(Sample(_case_name(name, torch.float64, bias, lr, maximize, needs),
                          (x, w, b, q, g, layer.activation.kind, layer._ib_id, *needs), keep=(layer, opt)))
    return out


def implicit_linear_layer_backward_reference(x, weight, bias, q, grad_y, kind, layer_id, need_x, need_w, need_b):
    eta, mu, maximize = _LAYER_HYPER[layer_id]
    return implicit_gradients(x, weight, bias, q, grad_y, eta, mu, maximize, _BY_KIND[kind], need_x, need_w, need_b)


# ---------------------------------------------------------------------------------------------
# probe_move_(params, saved, direction, step), newton_lr(...), guarded_lr(...)


def _probe_lists(dtype, device, contiguous, seed=0):
    g = _gen(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (0,)]
    saved = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    dirs = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    if not contiguous:
        saved = [s.t().contiguous().t() if s.dim() == 2 else s for s in saved]
    return [torch.zeros_like(s) for s in saved], saved, dirs


def probe_move_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    if requires_grad:
        return []
    out = []
    for dtype, contiguous in ((torch.float32, True), (torch.float64, False), (torch.float16, True)):
        params, saved, dirs = _probe_lists(dtype, device, contiguous)
        step = torch.tensor(0.0123 + 2e-5, dtype=torch.float64, device=device)
        layout = "" if contiguous else "-strided"
        out.append(Sample(f"{str(dtype).replace('torch.', '')}{layout}", (params, saved, dirs, step)))
    return out


def probe_move_op_reference(params, saved, direction, step):
    probe_move_reference_(params, saved, direction, step)


def _line(eta, s, c, eps, device, f0=1.0):
    """The five probes f(eta + j*eps) of the quadratic line f0 + s*t + c*t^2/2 (t = offset from eta)."""
    return torch.tensor([f0 + s * j * eps + 0.5 * c * (j * eps) ** 2 for j in (-2, -1, 0, 1, 2)],
                        dtype=torch.float64, device=device)


def _scalar(v, device):
    return torch.tensor(v, dtype=torch.float64, device=device)


def newton_lr_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    if requires_grad:
        return []
    f = _line(0.1, -1.0, 4.0, 1e-2, device)
    rising = _line(0.1, 1.0, 4.0, 1e-2, device)  # eta + v below delta: clamped
    bad = f.clone()
    bad[4] = float("nan")  # eta halves, the momentum resets
    return [
        Sample("convex", (f, _scalar(0.1, device), _scalar(0.0, device), 1e-2, 1e-6, 0.9)),
        Sample("clamped", (rising, _scalar(0.01, device), _scalar(0.0, device), 1e-2, 1e-6, 0.0)),
        Sample("nan-probe", (bad, _scalar(0.1, device), _scalar(0.02, device), 1e-2, 1e-6, 0.5)),
        Sample("float32-losses", (f.float(), _scalar(0.1, device), _scalar(0.003, device), 1e-2, 1e-6, 0.9)),
    ]


def guarded_lr_samples(device: str, requires_grad: bool = False) -> List[Sample]:
    if requires_grad:
        return []
    # (eta, slope, curvature) of a line: inside the trust region, the minimiser far, behind 0, concave
    lines = {"inside": (0.3, -1.0, 4.0), "grow": (0.01, -1.0, 4.0), "behind-zero": (1.0, 1.0, 0.1),
             "concave-rising": (0.4, 1.0, -3.0)}
    out = [Sample(name, (_line(eta, s, c, 1e-2, device), _scalar(eta, device), 1e-2, 1e-6, 2.0, 0.5, 10.0))
           for name, (eta, s, c) in lines.items()]
    bad = _line(0.4, -1.0, 4.0, 1e-2, device)
    bad[3] = float("inf")
    out.append(Sample("inf-probe", (bad, _scalar(0.4, device), 1e-2, 1e-6, 1.5, 1.0, 3.0)))
    return out


TABLES: Dict[str, OpTable] = {
    "ib_alpha": OpTable(ib_alpha_samples, ib_alpha_op_reference),
    "implicit_linear_backward": OpTable(implicit_linear_backward_samples, implicit_linear_backward_reference),
    "implicit_linear_layer_backward": OpTable(implicit_linear_layer_backward_samples,
                                              implicit_linear_layer_backward_reference),
    "probe_move_": OpTable(probe_move_samples, probe_move_op_reference, mutates=True),
    "newton_lr": OpTable(newton_lr_samples, newton_lr_reference),
    "guarded_lr": OpTable(guarded_lr_samples, guarded_lr_reference),
}


def op(name: str) -> Any:
    """``torch.ops.torchopt_ext.<name>.default``."""
    return getattr(torch.ops.torchopt_ext, name).default
