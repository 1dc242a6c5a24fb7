"""The probe kernels against their pure-PyTorch references (opcheck and torch.compile: test_op_samples.py)."""
import math

import pytest
import torch

from torchopt_ext import extension_available
from torchopt_ext.ops.probe import (
    guarded_lr,
    guarded_lr_host,
    guarded_lr_reference,
    newton_lr,
    newton_lr_host,
    newton_lr_reference,
    probe_move_,
    probe_move_reference_,
)

needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")


def _lists(dtype, contiguous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (0,)]
    saved = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    dirs = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if not contiguous:
        saved = [torch.randn(s[::-1], generator=g, dtype=dtype).T if len(s) == 2 else x for s, x in zip(shapes, saved)]
    params = [torch.zeros_like(s) for s in saved]
    return params, saved, dirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_probe_move_equals_reference(dtype, contiguous):
    params, saved, dirs = _lists(dtype, contiguous)
    ref = [p.clone() for p in params]
    step = torch.tensor(0.0123 + 2e-5, dtype=torch.float64)
    probe_move_(params, saved, dirs, step)
    probe_move_reference_(ref, saved, dirs, step)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_host_step_mover_equals_the_op(dtype, contiguous):
    """The CPU step's mover (a float step, no dispatcher) writes the op's bits, compiled or not."""
    from torchopt_ext.ops.probe import probe_mover
    params, saved, dirs = _lists(dtype, contiguous)
    ref, host = [p.clone() for p in params], [p.clone() for p in params]
    step = 0.0123 + 2e-5
    probe_move_reference_(ref, saved, dirs, torch.tensor(step, dtype=torch.float64))
    probe_mover(torch.device("cpu"), host_step=True)(host, saved, dirs, step)
    for p, r in zip(host, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


@needs_ext
def test_host_step_mover_checks_the_lists():
    from torchopt_ext.ops.probe import probe_mover
    params, saved, dirs = _lists(torch.float32)
    move = probe_mover(torch.device("cpu"), host_step=True)
    with pytest.raises(RuntimeError, match="one length"):
        move(params, saved[:-1], dirs, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        move(params, saved[::-1], dirs, 1.0)


def test_probe_move_resolves_eps_steps_in_float64():
    # probe points eps = 1e-5 apart must differ by exactly eps*d (to float64 rounding)
    params, saved, dirs = _lists(torch.float64)
    a = [p.clone() for p in params]
    probe_move_(params, saved, dirs, torch.tensor(0.5 + 1e-5, dtype=torch.float64))
    probe_move_(a, saved, dirs, torch.tensor(0.5, dtype=torch.float64))
    for p, q, d in zip(params, a, dirs):
        torch.testing.assert_close(q - p, 1e-5 * d, rtol=1e-9, atol=1e-15)


def test_probe_move_errors_name_the_argument():
    params, saved, dirs = _lists(torch.float32)
    with pytest.raises(ValueError, match="one length"):
        probe_move_(params, saved[:-1], dirs, torch.tensor(1.0))
    with pytest.raises(ValueError, match="step"):
        probe_move_(params, saved, dirs, torch.ones(2))


def _random_losses(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3
    return base + 1e-3 * torch.randn(n, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_newton_lr_equals_reference(beta):
    losses = _random_losses(200)
    losses[3, 2] = float("nan")
    losses[4, 0] = float("inf")
    losses[5] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # den = delta exactly
    for k, f in enumerate(losses):
        eta = torch.tensor(0.01 * (k % 7 + 1), dtype=torch.float64)
        v = torch.tensor(1e-3 * (k % 3 - 1), dtype=torch.float64)
        got = newton_lr(f, eta, v, 1e-3, 1e-6, beta)
        want = newton_lr_reference(f, eta, v, 1e-3, 1e-6, beta)
        for x, y in zip(got, want):
            assert x.dtype == torch.float64 and x.dim() == 0
            torch.testing.assert_close(x, y, rtol=1e-15, atol=0)
        assert got[0].item() >= 1e-6 and math.isfinite(got[0].item())


def test_newton_lr_formula_and_safeguards():
    eta, v0 = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64)
    f = torch.tensor([1.3, 1.1, 1.0, 0.95, 0.97], dtype=torch.float64)
    eps, delta, beta = 1e-2, 1e-6, 0.5
    inc = 2 * eps * (f[3] - f[1]) / (f[4] + f[0] - 2 * f[2] + delta)
    e, v = newton_lr(f, eta, v0, eps, delta, beta)
    assert v.item() == pytest.approx((beta * v0 - inc).item(), rel=1e-14)
    assert e.item() == pytest.approx((eta + beta * v0 - inc).item(), rel=1e-14)
    # positivity clamp: a big positive Newton increment drives eta below delta -> delta
    f_up = torch.tensor([0.9, 1.0, 1.1, 1.2, 1.31], dtype=torch.float64)
    assert newton_lr(f_up, eta, torch.zeros((), dtype=torch.float64), eps, delta, 0.0)[0].item() == delta
    # non-finite probe: eta halves, momentum resets
    for bad in (float("nan"), float("inf"), -float("inf")):
        fb = f.clone()
        fb[4] = bad
        e, v = newton_lr(fb, eta, v0, eps, delta, beta)
        assert e.item() == pytest.approx(0.05) and v.item() == 0.0
    # halving never goes below delta, and a NaN eta lands on delta
    fb = f.clone()
    fb[0] = float("nan")
    assert newton_lr(fb, torch.tensor(1.5e-6, dtype=torch.float64), v0, eps, delta, 0.0)[0].item() == delta
    assert newton_lr(f, torch.tensor(float("nan"), dtype=torch.float64), v0, eps, delta, 0.0)[0].item() == delta


def _line(eta, s, c, eps, f0=1.0):
    """The five probes f(eta + j*eps) of the quadratic line f0 + s*t + c*t^2/2 (t = offset from eta)."""
    return torch.tensor([f0 + s * j * eps + 0.5 * c * (j * eps) ** 2 for j in (-2, -1, 0, 1, 2)], dtype=torch.float64)


# (eta, slope, curvature, what the guarded rule must give), eps = 1e-2, growth 2, fraction 1/2, shrink 10
_GUARDED_CASES = [
    (0.3, -1.0, 4.0, 0.5 * (0.3 + 1.0 / 4.0)),  # inside the trust region: half the line's minimiser
    (0.01, -1.0, 4.0, 0.02),  # the minimiser is far: grow by at most 2x
    (1.0, 1.0, 0.1, 0.1),  # minimiser behind 0: the largest cut, by shrink
    (1.0, 3.0, 4.0, 0.125),  # minimiser 0.25: half of it, a cut of 8x is within shrink
    (1.0, 39.0, 40.0, 0.1),  # minimiser 0.025, half of it 0.0125: cut by at most shrink
    (0.4, -1.0, -3.0, 0.4),  # concave, falling: hold
    (0.4, 1.0, -3.0, 0.2),  # concave, rising: cut by growth
    (0.4, -1.0, 0.0, 0.4),  # flat curvature, falling: hold
    (1.5e-6, 1.0, 1.0, 1e-6),  # shrinking never goes below delta
]


@pytest.mark.parametrize("eta, s, c, want", _GUARDED_CASES)
def test_guarded_lr_formula(eta, s, c, want):
    f = _line(eta, s, c, 1e-2)
    got = guarded_lr(f, torch.tensor(eta, dtype=torch.float64), 1e-2, 1e-6, shrink=10.0)
    assert got.item() == pytest.approx(want, rel=1e-9)
    ref = guarded_lr_reference(f, torch.tensor(eta, dtype=torch.float64), 1e-2, 1e-6, shrink=10.0)
    assert ref.item() == pytest.approx(want, rel=1e-9)


def test_guarded_lr_equals_reference_and_handles_non_finite():
    for f in _random_losses(200):
        for eta in (1e-6, 0.01, 0.3, 5.0):
            e = torch.tensor(eta, dtype=torch.float64)
            for growth, fraction, shrink in ((2.0, 0.5, 100.0), (1.5, 1.0, 3.0)):
                got = guarded_lr(f, e, 1e-3, 1e-6, growth, fraction, shrink)
                want = guarded_lr_reference(f, e, 1e-3, 1e-6, growth, fraction, shrink)
                assert got.dtype == torch.float64 and got.dim() == 0
                torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    e = torch.tensor(0.4, dtype=torch.float64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        f = _line(0.4, -1.0, 4.0, 1e-2)
        f[3] = bad
        assert guarded_lr(f, e, 1e-2, 1e-6).item() == 0.2  # shrink by growth
        assert guarded_lr_reference(f, e, 1e-2, 1e-6).item() == 0.2
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    assert guarded_lr(_line(0.4, -1.0, 4.0, 1e-2), nan, 1e-2, 1e-6).item() == 1e-6
    assert guarded_lr_reference(_line(0.4, -1.0, 4.0, 1e-2), nan, 1e-2, 1e-6).item() == 1e-6


def test_guarded_lr_errors_name_the_argument():
    f, e = _line(0.4, -1.0, 4.0, 1e-2), torch.tensor(0.4, dtype=torch.float64)
    for kw, name in ((dict(growth=1.0), "growth"), (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
                     (dict(shrink=1.0), "shrink"), (dict(shrink=float("inf")), "shrink")):
        for fn in (guarded_lr, guarded_lr_reference):
            with pytest.raises((ValueError, RuntimeError), match=name):
                fn(f, e, 1e-2, 1e-6, **kw)
    with pytest.raises((ValueError, RuntimeError), match="5 probe losses"):
        guarded_lr(f[:4], e, 1e-2, 1e-6)


def _same_float(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "reference"])
def test_host_rules_equal_the_ops_bitwise(compiled, monkeypatch):
    """The float entry points the CPU step uses give the ops' numbers, from the extension and without it."""
    from torchopt_ext.ops import probe
    if compiled and probe._C is None:
        pytest.skip("compiled extension not built")
    if not compiled:
        monkeypatch.setattr(probe, "_C", None)
    losses = _random_losses(100)
    losses[3, 2], losses[4, 0] = float("nan"), float("inf")
    for k, f in enumerate(losses):
        eta, v = 0.01 * (k % 7 + 1), 1e-3 * (k % 3 - 1)
        e, vt = torch.tensor(eta, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
        fl = f.tolist()
        for growth, fraction, shrink in ((2.0, 0.5, 100.0), (1.5, 1.0, 3.0)):
            want = guarded_lr_reference(f, e, 1e-3, 1e-6, growth, fraction, shrink).item()
            assert _same_float(guarded_lr_host(fl, eta, 1e-3, 1e-6, growth, fraction, shrink), want)
        got = newton_lr_host(fl, eta, v, 1e-3, 1e-6, 0.9)
        want = [x.item() for x in newton_lr_reference(f, e, vt, 1e-3, 1e-6, 0.9)]
        assert all(_same_float(a, b) for a, b in zip(got, want)), (got, want)


@needs_ext
def test_host_rules_check_their_arguments():
    f = _line(0.4, -1.0, 4.0, 1e-2).tolist()
    with pytest.raises(RuntimeError, match="growth"):
        guarded_lr_host(f, 0.4, 1e-2, 1e-6, growth=1.0)
    with pytest.raises(RuntimeError, match="5 probe losses"):
        guarded_lr_host(f[:4], 0.4, 1e-2, 1e-6)
    with pytest.raises(RuntimeError, match="5 probe losses"):
        newton_lr_host(f[:4], 0.4, 0.0, 1e-2, 1e-6)


@pytest.mark.cuda
def test_cuda_equals_cpu():
    params, saved, dirs = _lists(torch.float32)
    step = torch.tensor(0.25, dtype=torch.float64)
    cuda = [p.cuda() for p in params]
    probe_move_(cuda, [s.cuda() for s in saved], [d.cuda() for d in dirs], step.cuda())
    probe_move_(params, saved, dirs, step)
    for c, p in zip(cuda, params):
        torch.testing.assert_close(c.cpu(), p, rtol=0, atol=0)
    losses = _random_losses(50).cuda()
    for f in losses:
        e = torch.tensor(0.1, dtype=torch.float64)
        z = torch.zeros((), dtype=torch.float64)
        got = newton_lr(f, e.cuda(), z.cuda(), 1e-3, 1e-6, 0.9)
        want = newton_lr(f.cpu(), e, z, 1e-3, 1e-6, 0.9)
        for x, y in zip(got, want):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-15, atol=0)
        torch.testing.assert_close(guarded_lr(f, e.cuda(), 1e-3, 1e-6).cpu(), guarded_lr(f.cpu(), e, 1e-3, 1e-6),
                                   rtol=1e-15, atol=0)
