"""Activations: tables, derivatives, the C1 fit and its reported error, flops, validation."""
import math

import pytest
import torch

import torchopt_ext
from torchopt_ext import activations
from torchopt_ext.activations import PiecewiseCubic

U = torch.linspace(-4, 4, 8001, dtype=torch.float64)


@pytest.mark.parametrize(
    "name,fn",
    [
        ("relu", torch.relu),
        ("arctan", torch.atan),
        ("hardtanh", lambda u: u.clamp(-1, 1)),
        ("smoothstep", activations.smoothstep),
        ("identity", lambda u: u),
    ],
)
def test_builtin_values_and_derivatives(name, fn):
    act = activations.get(name)
    torch.testing.assert_close(act(U), fn(U))
    h = 1e-6
    fd = (fn(U + h) - fn(U - h)) / (2 * h)
    smooth = torch.ones_like(U, dtype=torch.bool)
    for k in ([] if act.knots is None else act.knots.tolist()):
        smooth &= (U - k).abs() > 1e-3
    torch.testing.assert_close(act.derivative(U)[smooth], fd[smooth], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "hardtanh", "smoothstep", "identity"])
def test_builtin_tables_equal_the_function(name):
    act = activations.get(name)
    generic = PiecewiseCubic(act.knots, act.coefficients)
    torch.testing.assert_close(generic(U), act(U))


@pytest.mark.parametrize(
    "fn,lo,hi,pieces,tol",
    [
        (torch.tanh, -4, 4, 16, 1e-3),
        (torch.sigmoid, -8, 8, 16, 1e-3),
        (torch.nn.functional.gelu, -4, 4, 16, 1e-3),
        (torch.nn.functional.silu, -6, 6, 24, 1e-3),
    ],
)
def test_fit_is_c1_and_reports_its_error(fn, lo, hi, pieces, tol):
    pc = PiecewiseCubic.fit(fn, lo, hi, pieces)
    grid = torch.linspace(lo, hi, 10001, dtype=torch.float64)
    err = float((pc(grid) - fn(grid)).abs().max())
    assert err <= tol
    assert pc.max_error == pytest.approx(err, rel=0.2, abs=1e-7)  # reported error is the real one
    a = pc.coefficients
    for i, k in enumerate(pc.knots.tolist()):  # C1 at every knot
        left = a[i, 0] + k * (a[i, 1] + k * (a[i, 2] + k * a[i, 3]))
        right = a[i + 1, 0] + k * (a[i + 1, 1] + k * (a[i + 1, 2] + k * a[i + 1, 3]))
        dl = a[i, 1] + k * (2 * a[i, 2] + 3 * a[i, 3] * k)
        dr = a[i + 1, 1] + k * (2 * a[i + 1, 2] + 3 * a[i + 1, 3] * k)
        assert float(left) == pytest.approx(float(right), abs=1e-10)
        assert float(dl) == pytest.approx(float(dr), abs=1e-9)
    more = PiecewiseCubic.fit(fn, lo, hi, pieces * 2)
    assert more.max_error < pc.max_error / 8  # Hermite cubics converge as h^4


def test_piecewise_derivative_matches_finite_differences():
    pc = PiecewiseCubic.fit(torch.tanh, -3, 3, 7)
    h = 1e-6
    fd = (pc(U + h) - pc(U - h)) / (2 * h)
    torch.testing.assert_close(pc.derivative(U), fd, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torchopt_ext.extension_available(), reason="flops are counted by the compiled solver")
def test_flops_are_counted():
    f = {n: activations.get(n).flops for n in activations.NAMES}
    assert f["identity"] < f["relu"] < f["arctan"] < 100  # the paper: arctan just under 100
    assert f["hardtanh"] > f["relu"]
    fitted = PiecewiseCubic.fit(torch.tanh, -3, 3, 8)
    assert fitted.flops > f["smoothstep"]  # O(M): more pieces, more work
    # the float32 fast paths, counted the same way: hardtanh/smoothstep are closed forms with
    # fewer operations than the float64 candidate search; arctan's Newton steps and certificate
    # cost about what the float64 solve's cubic does
    f32 = {n: activations.get(n).flops_float32 for n in activations.NAMES}
    assert f32["relu"] is None and f32["identity"] is None and fitted.flops_float32 is None
    assert f32["hardtanh"] < f["hardtanh"] and f32["smoothstep"] < f["smoothstep"]
    assert f["arctan"] <= f32["arctan"] < 2 * f["arctan"]


def test_validation_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseCubic([1.0, 0.0], [[0, 0, 0, 0]] * 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseCubic([0.0, 0.0], [[0, 0, 0, 0]] * 3)
    with pytest.raises(ValueError, match=r"shape \(M, 4\)"):
        PiecewiseCubic([0.0], [[0, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="M-1 = 1 interior knots"):
        PiecewiseCubic([0.0, 1.0], [[0, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="must be linear"):
        PiecewiseCubic([0.0], [[0, 0, 1, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="finite"):
        PiecewiseCubic([math.nan], [[0, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match="lo < hi"):
        PiecewiseCubic.fit(torch.tanh, 1, -1, 4)
    with pytest.raises(ValueError, match="positive integer"):
        PiecewiseCubic.fit(torch.tanh, -1, 1, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        activations.get("swish")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["relu", "hardtanh", "smoothstep", "arctan", "identity"])
def test_eb_signal_is_b_times_the_derivative_with_its_knot_conventions(name, dtype):
    """The layers' fused b*sigma'(u) (aten's threshold/hardtanh backward, a clamp for smoothstep)
    against the activation's derivative in float64: same zeros, knots included (relu'(0) = 0,
    hardtanh'(1) = 1, hardtanh'(-1) = 0), and the numbers to a few ulps of dtype (smoothstep's
    1 - u^2 rounds to an ulp of 1, absolute)."""
    from torchopt_ext.nn.activation_fns import eb_signal

    g = torch.Generator().manual_seed(1)
    knots = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1.5, -1.5], dtype=dtype)
    around = torch.nextafter(knots[:2], torch.tensor([2.0, -2.0], dtype=dtype))
    inside = torch.nextafter(knots[:2], torch.zeros(2, dtype=dtype))
    u = torch.cat([(torch.randn(4000, generator=g, dtype=torch.float64) * 2).to(dtype), knots, around, inside])
    b = torch.randn(u.shape, generator=g, dtype=torch.float64).to(dtype)
    act = activations.get(name)
    fast, ref = eb_signal(act, b, u), b.double() * act.derivative(u.double())
    assert fast.dtype == dtype
    assert torch.equal(fast == 0, ref == 0)
    ulp = torch.finfo(dtype).eps
    err = (fast.double() - ref).abs()
    assert bool((err <= 4 * ulp * ref.abs() + 4 * ulp * b.double().abs()).all()), float(err.max())
