"""Closed-form kernels of infinitely wide fully connected relu nets: NNGP and NTK (docs/KIP.md).

The net: ``depth`` hidden layers ``h^{l+1} = (sigma_w / sqrt(n_l)) W^l relu(h^l) + sigma_b b^l`` with
standard-normal W, b (the NTK parameterisation), the first layer acting on the flattened input
``x`` of dimension d, then a linear readout of the same form. With ``w_var = sigma_w^2`` and
``b_var = sigma_b^2`` (defaults 2 and 0.01: the KIP reference code's W_std = sqrt(2), b_std = 0.1):

    K^0(x, x')     = w_var x.x'/d + b_var                   Theta^0 = K^0
    cos phi        = K^l(x, x') / sqrt(K^l(x, x) K^l(x', x'))
    K^{l+1}(x, x') = w_var/(2 pi) sqrt(K^l(x, x) K^l(x', x')) J1(cos phi) + b_var
    Theta^{l+1}    = K^{l+1} + w_var/(2 pi) J0(cos phi) Theta^l

with ``J1(c) = sqrt(1 - c^2) + (pi - arccos c) c`` and ``J0(c) = pi - arccos c`` (Cho & Saul's
arc-cosine functions). After ``depth`` relu layers, K^depth is the covariance of one output of the
random net (NNGP) and Theta^depth its neural tangent kernel, both per output unit (the kernel matrix
is shared by all classes).

Both functions of c come from :class:`_ArcCos`, an autograd function with the derivatives written out:
d J1/dc = pi - arccos c is finite on [-1, 1], whereas the textbook pieces (sqrt(1 - c^2), arccos c) each
have an infinite derivative at c = +-1, which autograd would turn into inf * 0 = nan on the diagonal of
K(S, S). d J0/dc = 1/sqrt(1 - c^2) is genuinely infinite at c = +-1
(the NTK has a cone-shaped kink at coincident inputs); there we return 0, the symmetric subgradient,
as neural-tangents does.

:func:`relu_kernels_reference` is the same recursion one pair at a time in plain float64 Python
(``math``), the reference the batched version is tested against.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

KERNELS = ("nngp", "ntk")


class _ArcCos(torch.autograd.Function):
    """(J1(c), J0(c)) for c in [-1, 1], sharing one arccos; derivatives pi - arccos c and 1/sqrt(1 - c^2).

    J0's derivative is set to 0 where 1 - c^2 is below one ulp: there the slope is rounding noise on top
    of the kink.
    """

    @staticmethod
    def forward(ctx, c):
        ctx.set_materialize_grads(False)
        j0 = torch.pi - torch.arccos(c)
        ctx.save_for_backward(c, j0)
        return torch.sqrt((1 - c * c).clamp_min(0)) + j0 * c, j0

    @staticmethod
    def backward(ctx, grad_j1, grad_j0):
        c, j0 = ctx.saved_tensors
        grad = torch.zeros_like(c) if grad_j1 is None else grad_j1 * j0
        if grad_j0 is not None:
            s2 = 1 - c * c
            safe = s2 > torch.finfo(c.dtype).eps
            grad = grad + grad_j0 * torch.where(safe, torch.rsqrt(torch.where(safe, s2, torch.ones_like(s2))), 0.0)
        return grad


def _check(x: torch.Tensor, y: Optional[torch.Tensor], depth: int, w_var: float, b_var: float):
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a batch (N, ...) with N >= 1, got shape {tuple(x.shape)}")
    if y is not None and (y.dim() < 2 or y[0].numel() != x[0].numel()):
        raise ValueError(f"y: expected (M, ...) with {x[0].numel()} features per row like x, got shape "
                         f"{tuple(y.shape)}")
    if int(depth) != depth or depth < 0:
        raise ValueError(f"depth: expected an integer >= 0 (hidden relu layers), got {depth!r}")
    if not (w_var > 0 and b_var >= 0):
        raise ValueError(f"w_var, b_var: expected w_var > 0 and b_var >= 0, got {w_var!r}, {b_var!r}")


def relu_kernels(x: torch.Tensor, y: Optional[torch.Tensor] = None, depth: int = 1, w_var: float = 2.0,
                 b_var: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """(NNGP, NTK) of a ``depth``-hidden-layer relu net between the rows of x and y.

    x: (N, ...), y: (M, ...) or None for y = x (then the diagonal's cos phi is exactly 1 and the
    matrices are exactly symmetric); each row is flattened to d features. Returns two (N, M) tensors
    in x's dtype, differentiable with respect to x and y.
    """
    _check(x, y, depth, w_var, b_var)
    same = y is None
    x = x.flatten(1)
    y = x if same else y.flatten(1).to(x.dtype)
    d = x.shape[1]
    gram = x @ y.T
    if same:
        gram = (gram + gram.T) / 2
    k = w_var * gram / d + b_var
    kx = w_var * (x * x).sum(1) / d + b_var
    ky = kx if same else w_var * (y * y).sum(1) / d + b_var
    theta = k
    tiny = torch.finfo(x.dtype).tiny
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device) if same else None
    for _ in range(depth):
        norm = torch.sqrt((kx[:, None] * ky[None, :]).clamp_min(tiny))
        c = (k / norm).clamp(-1.0, 1.0)
        if same:
            c = torch.where(eye, torch.ones_like(c), c)
        j1, j0 = _ArcCos.apply(c)
        k = w_var / (2 * math.pi) * norm * j1 + b_var
        theta = k + w_var / (2 * math.pi) * j0 * theta
        # on the diagonal c = 1, J1 = pi: the variance recursion in closed form
        kx = w_var / 2 * kx + b_var
        ky = kx if same else w_var / 2 * ky + b_var
    return k, theta


def relu_kernel(x: torch.Tensor, y: Optional[torch.Tensor] = None, kind: str = "ntk", depth: int = 1,
                w_var: float = 2.0, b_var: float = 0.01) -> torch.Tensor:
    """One of the two kernels by name (``"nngp"`` or ``"ntk"``): (N, M), see :func:`relu_kernels`."""
    if kind not in KERNELS:
        raise ValueError(f"kind: expected one of {', '.join(KERNELS)}, got {kind!r}")
    nngp, ntk = relu_kernels(x, y, depth, w_var, b_var)
    return ntk if kind == "ntk" else nngp


def relu_kernels_reference(x, y, depth: int = 1, w_var: float = 2.0, b_var: float = 0.01):
    """The recursion pair by pair in float64 Python: lists of lists (N x M) for NNGP and NTK."""
    xs = [[float(v) for v in row.flatten()] for row in torch.as_tensor(x)]
    ys = [[float(v) for v in row.flatten()] for row in torch.as_tensor(y)]
    d = len(xs[0])

    def dot(a, b):
        return sum(u * v for u, v in zip(a, b))

    nngp = [[0.0] * len(ys) for _ in xs]
    ntk = [[0.0] * len(ys) for _ in xs]
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            kab = w_var * dot(a, b) / d + b_var
            kaa = w_var * dot(a, a) / d + b_var
            kbb = w_var * dot(b, b) / d + b_var
            th = kab
            for _ in range(depth):
                c = max(-1.0, min(1.0, kab / math.sqrt(kaa * kbb)))
                phi = math.acos(c)
                kab_next = w_var / (2 * math.pi) * math.sqrt(kaa * kbb) * (math.sin(phi) + (math.pi - phi) * c) + b_var
                th = kab_next + w_var * th * (math.pi - phi) / (2 * math.pi)
                kab = kab_next
                kaa = w_var / 2 * kaa + b_var
                kbb = w_var / 2 * kbb + b_var
            nngp[i][j], ntk[i][j] = kab, th
    return nngp, ntk
