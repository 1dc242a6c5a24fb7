"""The reference solver (ib_alpha_reference) held to the mathematics: brute-force minimisation
of the 1-D implicit-SGD objective, and the limits of docs/derivations.md#notation."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.helpers.brute_force import arctan_nearest_root, global_min_u, prox_objective
from torchopt_ext import activations
from torchopt_ext.ops import ib_alpha_reference

PIECEWISE = ["relu", "hardtanh", "smoothstep", "identity", "fitted_tanh", "fitted_gelu"]
_FITTED = {}


def act_of(name):
    if name == "fitted_tanh":
        _FITTED.setdefault(name, activations.PiecewiseCubic.fit(torch.tanh, -3, 3, 6))
        return _FITTED[name]
    if name == "fitted_gelu":
        _FITTED.setdefault(name, activations.PiecewiseCubic.fit(torch.nn.functional.gelu, -3, 3, 5))
        return _FITTED[name]
    return activations.get(name)


def one(q, b, zsq, eta, mu, act):
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)
    return float(ib_alpha_reference(t(q), t(b), torch.tensor([zsq], dtype=torch.float64), eta, mu, act))


def lipschitz(act):
    u = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    return float(act.derivative(u).abs().max()) + 1e-9


finite = dict(allow_nan=False, allow_infinity=False)
cases = dict(
    q=st.floats(-4, 4, **finite),
    b=st.floats(-4, 4, **finite),
    zsq=st.floats(1, 8, **finite),
    eta=st.floats(1e-3, 20, **finite),
    mu=st.sampled_from([0.0, 0.01, 0.5]),
)


@pytest.mark.parametrize("name", PIECEWISE)
@settings(max_examples=60, deadline=None)
@given(**cases)
def test_piecewise_reference_is_the_global_minimum(name, q, b, zsq, eta, mu):
    act = act_of(name)
    d = 1 + eta * mu
    c, tau, s = q / d, eta * zsq / d, eta * zsq
    alpha = one(q, b, zsq, eta, mu, act)
    u_ours = c - alpha * s
    sigma = lambda u: float(act(torch.tensor([u], dtype=torch.float64)))
    knots = act.knots.tolist() if act.knots is not None else []
    u_bf, f_bf = global_min_u(sigma, lipschitz(act), b, c, tau, knots)
    F = prox_objective(sigma, b, c, tau)
    scale = abs(b) * (1 + abs(c)) + (u_bf - c) ** 2 / tau + 1e-12
    # ours is at least as good as the brute force (up to rounding): it is a global minimum
    assert F(u_ours) <= f_bf + 1e-9 * scale
    # and it is the brute force's point unless two minima tie (then ours has the smaller |alpha|)
    if abs(u_ours - u_bf) > 1e-5 * (1 + abs(u_bf)):
        assert abs(F(u_ours) - F(u_bf)) <= 1e-7 * scale
        assert abs(c - u_ours) <= abs(c - u_bf) + 1e-9


@settings(max_examples=200, deadline=None)
@given(**cases)
def test_arctan_reference_is_the_root_nearest_zero(q, b, zsq, eta, mu):
    d = 1 + eta * mu
    c, tau = q / d, eta * zsq / d
    v_bf, fp = arctan_nearest_root(b, c, tau)
    assume(abs(fp) > 1e-6)  # a (near) double root: which side is "nearest" is ill-posed
    alpha = one(q, b, zsq, eta, mu, "arctan")
    assert alpha == pytest.approx(v_bf / d, rel=1e-9, abs=1e-12)
    # a stationary point of g(alpha) = b atan(c - alpha s) + d s alpha^2 / 2 that is a local minimum
    s = eta * zsq
    g = lambda a: b * math.atan(c - a * s) + d * s * a * a / 2
    h = 1e-5 * (abs(alpha) + 1e-3)
    assert g(alpha) <= g(alpha + h) + 1e-12 and g(alpha) <= g(alpha - h) + 1e-12


@pytest.mark.parametrize("name", ["relu", "arctan", "hardtanh", "smoothstep", "identity", "fitted_tanh"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_lr_is_explicit_backprop(name, dtype):
    """eta -> 0: alpha -> b sigma'(q), with no cancellation blow-up at eta = 1e-8."""
    act = act_of(name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(200, 30, generator=g, dtype=torch.float64) * 2
    if act.knots is not None and act.knots.numel():  # stay off the kinks, where sigma' jumps
        for k in act.knots.tolist():
            q = torch.where((q - k).abs() < 1e-3, q + 2e-3, q)
    b = torch.randn(200, 30, generator=g, dtype=torch.float64)
    zsq = torch.rand(200, generator=g, dtype=torch.float64) * 5 + 1
    q, b, zsq = q.to(dtype), b.to(dtype), zsq.to(dtype)
    alpha = ib_alpha_reference(q, b, zsq, 1e-8, 0.0, act).double()
    eb = b.double() * act.derivative(q.double())
    torch.testing.assert_close(alpha, eb, rtol=1e-6, atol=1e-6 * float(b.abs().max()) * 1e-3)


@pytest.mark.parametrize("name", ["relu", "arctan", "hardtanh", "smoothstep", "identity", "fitted_tanh"])
def test_zero_upstream_gradient_gives_zero(name):
    q = torch.linspace(-5, 5, 101, dtype=torch.float64).reshape(1, -1)
    alpha = ib_alpha_reference(q, torch.zeros_like(q), torch.tensor([2.0], dtype=torch.float64), 3.0, 0.1, act_of(name))
    assert torch.equal(alpha.abs(), torch.zeros_like(alpha))


@pytest.mark.parametrize("name", ["relu", "arctan", "hardtanh", "smoothstep", "identity", "fitted_tanh"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_inputs_stay_finite(name, dtype):
    vals_q = torch.tensor([-1e6, -1e3, -1.0, -1e-7, 0.0, 1e-7, 1.0, 1e3, 1e6], dtype=torch.float64)
    vals_b = torch.tensor([-1e3, -1.0, -1e-6, 0.0, 1e-6, 1.0, 1e3], dtype=torch.float64)
    q, b = torch.meshgrid(vals_q, vals_b, indexing="ij")
    for eta in (1e-10, 1e-3, 1.0, 1e5, 1e10):
        for mu in (0.0, 1e-4, 1.0):
            for zsq in (1.0, 1e4):
                z = torch.full((q.shape[0],), zsq, dtype=dtype)
                a = ib_alpha_reference(q.to(dtype), b.to(dtype), z, eta, mu, act_of(name))
                assert torch.isfinite(a).all(), (eta, mu, zsq)


@pytest.mark.parametrize("name", ["relu", "arctan", "hardtanh", "smoothstep", "identity"])
def test_huge_lr_with_decay_keeps_the_step_bounded(name):
    """eta -> inf with mu > 0 and sigma asymptotically linear: eta * alpha * z stays bounded."""
    q = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(1, -1)
    b = torch.full_like(q, 0.7)
    steps = [float((eta * ib_alpha_reference(q, b, torch.tensor([2.0], dtype=torch.float64), eta, 0.5, name)).abs().max())
             for eta in (1e2, 1e4, 1e6, 1e8, 1e10)]
    assert all(math.isfinite(x) for x in steps)
    assert max(steps) < 10 * max(steps[0], 1e-3)


def test_relu_table_1_cases():
    """docs/design.md#implicit-backprop: the closed form's five cases, at chosen points."""
    eta, mu, zsq = 0.5, 0.2, 2.0
    d, s = 1 + eta * mu, eta * zsq
    f = lambda q, b: one(q, b, zsq, eta, mu, "relu")
    b = 2.0
    T = s * b  # = 2
    assert f(-0.5, b) == 0.0
    assert f(1.0, b) == pytest.approx((1.0 / d) / s)  # 0 < q <= T: lands on the kink
    assert f(3.0, b) == pytest.approx(b / d)
    b = -2.0
    T = s * b  # = -2
    assert f(-1.5, b) == 0.0  # q <= T/2
    assert f(-0.5, b) == pytest.approx(b / d)
    assert f(T / 2, b) == 0.0  # the tie goes to the smaller |alpha|


def test_ties_go_to_the_smaller_alpha_in_the_generic_solver():
    """relu as a generic two-piece cubic, at the b < 0 tie q = T/2, picks alpha = 0 like the closed form."""
    relu_pc = activations.PiecewiseCubic([0.0], [[0, 0, 0, 0], [0, 1, 0, 0]])
    eta, zsq, b = 0.5, 2.0, -2.0
    q = eta * zsq * b / 2
    assert one(q, b, zsq, eta, 0.0, relu_pc) == 0.0
    assert one(q + 1e-6, b, zsq, eta, 0.0, relu_pc) == pytest.approx(b)


def test_nan_only_touches_its_own_elements():
    q = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(4, 5, dtype=torch.float64)
    z = torch.rand(4, dtype=torch.float64) + 1
    q[1, 2] = float("nan")
    b[2, 0] = float("inf")
    z[3] = float("nan")
    for name in ["relu", "arctan", "hardtanh", "smoothstep", "identity"]:
        a = ib_alpha_reference(q, b, z, 0.3, 0.0, name)
        bad = torch.zeros(4, 5, dtype=torch.bool)
        bad[1, 2] = bad[2, 0] = True
        bad[3, :] = True
        assert torch.isnan(a[bad]).all(), name
        assert torch.isfinite(a[~bad]).all(), name
