"""Activations that implicit backprop can solve for, by name or as a fitted piecewise cubic.

``get(name)`` returns one of the built-ins ("relu", "arctan", "hardtanh", "smoothstep", "identity");
``PiecewiseCubic`` describes any other activation as cubic pieces between sorted knots, and
``PiecewiseCubic.fit`` builds one that approximates an elementwise function (tanh, sigmoid, GELU,
SiLU, ...). Every activation knows its value, its derivative, the op's ``kind`` code and ``flops``:
the counted floating-point operations of one alpha solve (c_sigma in the paper's cost model).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from torchopt_ext._extension import _C

# The op's number for each activation kind: the compiled extension's table
# (csrc/include/torchopt_ext/ib_alpha_kinds.h), or this copy of it when the extension is missing,
# for the reference, which reads the same numbers; tests/ops/test_activation_kinds.py holds them equal.
_KINDS_WITHOUT_EXTENSION = {"relu": 0, "arctan": 1, "hardtanh": 2, "smoothstep": 3, "identity": 4, "piecewise": 5}
KINDS: Dict[str, int] = dict(_C.activation_kinds()) if _C is not None else dict(_KINDS_WITHOUT_EXTENSION)
KIND_RELU = KINDS["relu"]
KIND_ARCTAN = KINDS["arctan"]
KIND_HARDTANH = KINDS["hardtanh"]
KIND_SMOOTHSTEP = KINDS["smoothstep"]
KIND_IDENTITY = KINDS["identity"]
KIND_PIECEWISE = KINDS["piecewise"]


class Activation:
    """Base of every activation: value, derivative, kind code, optional piecewise-cubic table."""

    name: str = "activation"
    kind: int = KIND_PIECEWISE

    def __init__(self, knots: Optional[torch.Tensor] = None, coefficients: Optional[torch.Tensor] = None) -> None:
        self.knots = knots
        self.coefficients = coefficients
        self._tables: Dict[torch.device, tuple] = {}
        self._flops: Optional[int] = None
        self._flops32: Optional[int] = -2  # -2: not counted yet

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tables(self, device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(knots, coefficients) as float64 on ``device``; empty for the kinds that need none."""
        device = torch.device(device)
        if device not in self._tables:
            # built-in kinds ignore the tables in the kernels; the reference still reads them
            if self.coefficients is not None:
                self._tables[device] = (self.knots.to(device), self.coefficients.to(device))
            else:
                empty = torch.empty(0, dtype=torch.float64, device=device)
                self._tables[device] = (empty, empty.reshape(0, 4))
        return self._tables[device]

    @property
    def flops(self) -> Optional[int]:
        """Flops of one alpha solve, counted by running the compiled solver on a counting scalar
        (each +, -, *, /, comparison, sqrt, cbrt, acos, cos, fabs, copysign is one). The worst case
        over inputs that take every branch. None when the compiled extension is not available."""
        if self._flops is None and _C is not None:
            knots, coef = self.tables("cpu")
            self._flops = int(_C.ib_alpha_flops(self.kind, knots, coef))
        return self._flops

    @property
    def flops_float32(self) -> Optional[int]:
        """The same count for the CPU's float32 fast path (hardtanh, smoothstep, arctan: closed
        forms in float32 with their rounding certificates; for smoothstep and arctan, the first
        pass, which takes the common case of small steps), or None where there is none."""
        if getattr(self, "_flops32", -2) == -2:  # (an activation pickled before this attribute)
            n = int(_C.ib_alpha_flops_float32(self.kind)) if _C is not None else -1
            self._flops32 = None if n < 0 else n
        return self._flops32

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # pickling (e.g. a model holding its activation) must not carry device tables
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state


class PiecewiseCubic(Activation):
    """sigma(u) = a0 + a1 u + a2 u^2 + a3 u^3 on each piece between sorted knots.

    ``breakpoints``: the M-1 interior knots, strictly increasing; the first piece is (-inf, k_1],
    the last [k_{M-1}, inf). ``coefficients``: shape (M, 4), row m = (a0, a1, a2, a3) of piece m in
    the global variable u. The two unbounded pieces must be linear (a2 = a3 = 0), otherwise the
    implicit step's objective is unbounded below and has no minimiser.
    """

    kind = KIND_PIECEWISE

    def __init__(self, breakpoints: Union[Sequence[float], torch.Tensor],
                 coefficients: Union[Sequence[Sequence[float]], torch.Tensor], name: str = "piecewise_cubic") -> None:
        knots = torch.as_tensor(breakpoints, dtype=torch.float64).detach().cpu().reshape(-1).clone()
        coef = torch.as_tensor(coefficients, dtype=torch.float64).detach().cpu().clone()
        if coef.dim() != 2 or coef.shape[1] != 4 or coef.shape[0] < 1:
            raise ValueError(
                f"PiecewiseCubic: coefficients must have shape (M, 4) with M >= 1 pieces, got {tuple(coef.shape)}"
            )
        if knots.numel() != coef.shape[0] - 1:
            raise ValueError(
                f"PiecewiseCubic: breakpoints must hold M-1 = {coef.shape[0] - 1} interior knots for "
                f"{coef.shape[0]} pieces, got {knots.numel()}"
            )
        if not torch.isfinite(knots).all() or not torch.isfinite(coef).all():
            raise ValueError("PiecewiseCubic: breakpoints and coefficients must be finite")
        if knots.numel() > 1 and not bool((knots[1:] > knots[:-1]).all()):
            raise ValueError(
                f"PiecewiseCubic: breakpoints must be strictly increasing (no unsorted or overlapping "
                f"knots), got {knots.tolist()}"
            )
        for m in (0, coef.shape[0] - 1):
            if coef[m, 2] != 0 or coef[m, 3] != 0:
                raise ValueError(
                    f"PiecewiseCubic: the unbounded piece {m} must be linear (a2 = a3 = 0), got "
                    f"{coef[m].tolist()}; extend the activation linearly beyond the outer knots"
                )
        super().__init__(knots, coef)
        self.name = name
        self.max_error: Optional[float] = None

    @property
    def num_pieces(self) -> int:
        return self.coefficients.shape[0]

    def _piece_coefficients(self, u: torch.Tensor) -> torch.Tensor:
        knots = self.knots.to(device=u.device, dtype=u.dtype)
        idx = torch.bucketize(u, knots, right=False)  # u <= k_1 -> piece 0, as the solvers do
        return self.coefficients.to(device=u.device, dtype=u.dtype)[idx]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        a = self._piece_coefficients(u)
        return a[..., 0] + u * (a[..., 1] + u * (a[..., 2] + u * a[..., 3]))

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        a = self._piece_coefficients(u)
        return a[..., 1] + u * (2 * a[..., 2] + 3 * a[..., 3] * u)

    @classmethod
    def fit(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        lo: float,
        hi: float,
        pieces: int,
        name: Optional[str] = None,
    ) -> "PiecewiseCubic":
        """C1 piecewise-cubic (Hermite) fit of ``fn`` on ``[lo, hi]`` with ``pieces`` equal pieces,
        extended linearly (value and slope of the ends) outside. The fit's largest absolute error on
        a dense grid of [lo, hi] is stored in ``max_error``. ``fn`` maps a float64 tensor elementwise;
        slopes come from autograd."""
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"PiecewiseCubic.fit: need finite lo < hi, got lo={lo}, hi={hi}")
        if int(pieces) != pieces or pieces < 1:
            raise ValueError(f"PiecewiseCubic.fit: pieces must be a positive integer, got {pieces}")
        pieces = int(pieces)
        x = torch.linspace(lo, hi, pieces + 1, dtype=torch.float64).requires_grad_(True)
        y = fn(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise ValueError("PiecewiseCubic.fit: fn must map a tensor elementwise to a tensor of the same shape")
        (slope,) = torch.autograd.grad(y.sum(), x)
        x, y, slope = x.detach(), y.detach(), slope.detach()
        rows = [[float(y[0] - slope[0] * x[0]), float(slope[0]), 0.0, 0.0]]
        for i in range(pieces):
            x0, h = float(x[i]), float(x[i + 1] - x[i])
            y0, m0, m1 = float(y[i]), float(slope[i]), float(slope[i + 1])
            delta = float(y[i + 1] - y[i]) / h
            c2 = (3 * delta - 2 * m0 - m1) / h
            c3 = (m0 + m1 - 2 * delta) / (h * h)
            # expand y0 + m0 t + c2 t^2 + c3 t^3, t = u - x0, in powers of u
            rows.append([
                y0 - m0 * x0 + c2 * x0**2 - c3 * x0**3,
                m0 - 2 * c2 * x0 + 3 * c3 * x0**2,
                c2 - 3 * c3 * x0,
                c3,
            ])
        rows.append([float(y[-1] - slope[-1] * x[-1]), float(slope[-1]), 0.0, 0.0])
        pc = cls(x, rows, name=name or getattr(fn, "__name__", "fitted"))
        grid = torch.linspace(lo, hi, 200 * pieces + 1, dtype=torch.float64)
        with torch.no_grad():
            pc.max_error = float((pc(grid) - fn(grid)).abs().max())
        return pc


class _Relu(PiecewiseCubic):
    def __init__(self):
        super().__init__([0.0], [[0, 0, 0, 0], [0, 1, 0, 0]], name="relu")
        self.kind = KIND_RELU  # closed form in the kernels; the table serves tests and the reference

    def __call__(self, u):
        return torch.relu(u)

    def derivative(self, u):
        return (u > 0).to(u.dtype)


class _Hardtanh(PiecewiseCubic):
    def __init__(self):
        super().__init__([-1.0, 1.0], [[-1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], name="hardtanh")
        self.kind = KIND_HARDTANH


class _Smoothstep(PiecewiseCubic):
    def __init__(self):
        super().__init__([-1.0, 1.0], [[-1, 0, 0, 0], [0, 1.5, 0, -0.5], [1, 0, 0, 0]], name="smoothstep")
        self.kind = KIND_SMOOTHSTEP


class _Identity(PiecewiseCubic):
    def __init__(self):
        super().__init__([], [[0, 1, 0, 0]], name="identity")
        self.kind = KIND_IDENTITY

    def __call__(self, u):
        return u

    def derivative(self, u):
        return torch.ones_like(u)


class _Arctan(Activation):
    name = "arctan"
    kind = KIND_ARCTAN

    def __call__(self, u):
        return torch.atan(u)

    def derivative(self, u):
        return 1.0 / (1.0 + u * u)


_BUILTINS = {
    "relu": _Relu(),
    "arctan": _Arctan(),
    "hardtanh": _Hardtanh(),
    "smoothstep": _Smoothstep(),
    "identity": _Identity(),
}
NAMES = tuple(_BUILTINS)


def get(activation: Union[str, Activation]) -> Activation:
    """The activation named ``activation`` (one of ``NAMES``), or ``activation`` itself if it is
    already an ``Activation`` (e.g. a ``PiecewiseCubic``)."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str) and activation.lower() in _BUILTINS:
        return _BUILTINS[activation.lower()]
    raise ValueError(
        f"activation must be one of {list(NAMES)} or a torchopt_ext.activations.PiecewiseCubic, "
        f"got {activation!r}"
    )


def smoothstep(u: torch.Tensor) -> torch.Tensor:
    """The smoothstep activation: -1 below -1, 1.5u - 0.5u^3 on [-1, 1], 1 above 1."""
    v = u.clamp(-1.0, 1.0)
    return 1.5 * v - 0.5 * v * v * v


__all__ = ["Activation", "PiecewiseCubic", "get", "NAMES", "smoothstep"]
