"""The float32 fast paths of hardtanh, smoothstep and arctan (csrc/include/torchopt_ext/ib_alpha_fast32.h):
closed forms in float32 that hand an element on (smoothstep's and arctan's common-case first
pass to their general second pass, and either to the double solver) wherever their own rounding
bound says a decision could go either way. Held to the float64 reference at the float32
tolerance of test_ib_alpha_op.py, where it is hardest: on the discontinuities of alpha (where
the minimiser jumps between candidates), a few float32 ulps either side of them, and on the
edges of the first pass's certificates."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import torchopt_ext
from torchopt_ext import activations
from torchopt_ext.ops import ib_alpha, ib_alpha_reference

pytestmark = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")
FAST = ["hardtanh", "smoothstep", "arctan"]


def _C():
    from torchopt_ext import _C

    return _C


def redone(fn):
    """fn's result and how many elements the fast path gave back to the double solver."""
    _C().cpu_fast_float32_redone(True)
    out = fn()
    return out, _C().cpu_fast_float32_redone(True)


def assert_float32_close(alpha, ref, b):
    # the float32 tolerance of test_ib_alpha_op.assert_matches
    err = (alpha.double() - ref.double()).abs()
    bound = 2e-5 * b.double().abs() + 2e-6 * ref.double().abs() + 1e-30
    worst = int((err / bound).argmax()) if err.numel() else 0
    assert bool((err <= bound).all()), (float((err / bound).max()), worst)


def reference(q, b, z, lr, wd, name):
    return ib_alpha_reference(q.double(), b.double(), z.double(), lr, wd, activations.get(name))


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("lr", [1e-8, 1e-3, 0.03, 0.7, 50.0, 1e4])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_random_inputs_match_reference_and_rarely_fall_back(name, lr, wd):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(512, 256, generator=g) * 3
    b = torch.randn(512, 256, generator=g)
    z = torch.rand(512, generator=g) * 4 + 1
    a, n = redone(lambda: ib_alpha(q, b, z, lr, wd, name))
    assert_float32_close(a, reference(q, b, z, lr, wd, name), b)
    # the fast path does the work: at most 1% of the elements go back to the double solver
    assert n <= 0.01 * q.numel(), n


@pytest.mark.parametrize("name", FAST)
def test_switching_the_fast_path_off_uses_the_double_solver(name):
    g = torch.Generator().manual_seed(3)
    q, b = torch.randn(64, 100, generator=g) * 3, torch.randn(64, 100, generator=g)
    z = torch.rand(64, generator=g) + 1
    was = _C().set_cpu_fast_float32(False)
    try:
        slow, n = redone(lambda: ib_alpha(q, b, z, 0.7, 0.01, name))
    finally:
        _C().set_cpu_fast_float32(was)
    assert n == 0 and was is True
    assert set(_C().cpu_fast_float32_activations()) >= {"hardtanh", "smoothstep"}
    exact = ib_alpha(q.double(), b.double(), z.double(), 0.7, 0.01, name).float()
    assert torch.equal(slow, exact)  # the double solver, rounded once
    fast = ib_alpha(q, b, z, 0.7, 0.01, name)
    assert not torch.equal(fast, exact)  # ... and the default path is another computation
    assert_float32_close(fast, reference(q, b, z, 0.7, 0.01, name), b)


def _bisect_jumps(grid, values, alpha_at, b):
    """The points of ``grid`` where ``values`` (alpha along it) jump by more than 5% of |b|, each
    bisected to float64 precision with ``alpha_at`` (alpha at one grid coordinate)."""
    out = []
    for i in np.nonzero(np.abs(np.diff(np.asarray(values))) > 0.05 * abs(b) + 1e-12)[0]:
        x0, x1, a0 = float(grid[i]), float(grid[i + 1]), float(values[i])
        for _ in range(60):
            mid = 0.5 * (x0 + x1)
            x0, x1 = (x0, mid) if abs(alpha_at(mid) - a0) > 0.025 * abs(b) else (mid, x1)
        out.append(0.5 * (x0 + x1))
    return out


def _jumps(name, b, z, lr, wd, lo=-4.0, hi=12.0, n=4001):
    """q where the reference's alpha jumps (for fixed b, z, lr, wd), located to float64 precision."""
    act = activations.get(name)

    def alpha(qs):
        qt = torch.as_tensor(qs, dtype=torch.float64).reshape(1, -1)
        return ib_alpha_reference(qt, torch.full_like(qt, b), torch.tensor([z], dtype=torch.float64), lr, wd, act)[0]

    qs = torch.linspace(lo, hi, n, dtype=torch.float64)
    return _bisect_jumps(qs.numpy(), alpha(qs).numpy(), lambda v: float(alpha([v])[0]), b)


def _ulps_around(x, k=12):
    x32 = np.float32(x)
    pts = [x32]
    up = down = x32
    for _ in range(k):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        pts += [up, down]
    return np.array(pts, dtype=np.float32)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(FAST),
    b=st.floats(0.05, 20.0).map(lambda v: float(np.float32(v))),
    z=st.floats(1.0, 6.0).map(lambda v: float(np.float32(v))),
    log_lr=st.floats(-2.0, 2.0),
    wd=st.sampled_from([0.0, 0.05]),
    neg=st.booleans(),
)
def test_matches_reference_on_the_jumps_of_alpha(name, b, z, log_lr, wd, neg):
    """A float32 q within 12 ulps of each discontinuity: the fast path must pick the reference's
    side or hand the element back; it cannot just round to whichever side is nearer."""
    lr = 10.0**log_lr
    sg = -1.0 if neg else 1.0
    jumps = _jumps(name, sg * b, z, lr, wd)
    if not jumps:
        return
    q = torch.from_numpy(np.concatenate([_ulps_around(x) for x in jumps])).reshape(1, -1)
    bt = torch.full_like(q, sg * b)
    zt = torch.tensor([z], dtype=torch.float32)
    a = ib_alpha(q, bt, zt, lr, wd, name)
    assert_float32_close(a, reference(q, bt, zt, lr, wd, name), bt)


def _lr_jumps(name, q, b, z, wd, lo=-2.0, hi=2.5, n=400):
    """learning rates where the reference's alpha jumps (fixed float32 q, b, z), to float64 precision."""
    act = activations.get(name)
    qt = torch.tensor([[q]], dtype=torch.float64)
    bt, zt = torch.full_like(qt, b), torch.tensor([z], dtype=torch.float64)

    def alpha(lr):
        return float(ib_alpha_reference(qt, bt, zt, lr, wd, act)[0, 0])

    lrs = np.logspace(lo, hi, n)
    return _bisect_jumps(lrs, [alpha(v) for v in lrs], alpha, b)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(FAST),
    q=st.floats(0.5, 8.0).map(lambda v: float(np.float32(v))),
    b=st.floats(0.05, 10.0).map(lambda v: float(np.float32(v))),
    z=st.floats(1.0, 4.0).map(lambda v: float(np.float32(v))),
    wd=st.sampled_from([0.0, 0.05]),
)
def test_matches_reference_on_the_jumps_of_alpha_in_lr(name, q, b, z, wd):
    """The learning rate is a double and the fast path rounds tau = lr*z/d to float32, so near a
    jump in lr (relative distance 1e-11 .. 1e-6) its own numbers cannot tell the sides apart: it
    must hand those elements back. Float32 q cannot probe this: one ulp of q moves the jump's
    deciding quantity (arctan's discriminant, say) by far more than float32 rounding. (Not at
    the jump itself: there the double solver and the reference may round to either side.)"""
    for lr in _lr_jumps(name, q, b, z, wd):
        off = np.logspace(-11, -6, 11)
        lrs = lr * (1 + np.concatenate([-off, off]))
        qt, bt, zt = torch.tensor([[q]]), torch.tensor([[b]]), torch.tensor([z])
        for v in lrs:
            assert_float32_close(ib_alpha(qt, bt, zt, float(v), wd, name), reference(qt, bt, zt, float(v), wd, name), bt)


def test_exact_ties_are_handed_back_and_match():
    """hardtanh's middle step ties with staying at q = 1 + tau*b/2 (b > 0, no decay): exactly
    representable here, so the float32 decision cannot be certain and must go to the double solver."""
    lr, z = 0.5, 2.0  # tau = 1
    b = torch.tensor([[0.5, 1.0, 1.5, 2.0, 3.0]])
    q = 1 + b / 2
    a, n = redone(lambda: ib_alpha(q, b, torch.tensor([z]), lr, 0.0, "hardtanh"))
    assert n == b.numel()
    assert torch.equal(a, reference(q, b, torch.tensor([z]), lr, 0.0, "hardtanh").float())
    assert (a == 0).all()  # ties go to the smaller |alpha|: stay


@pytest.mark.parametrize("name", FAST)
def test_out_of_range_rows_and_elements_take_the_double_solver(name):
    """Inputs outside the range the float32 bounds hold for: huge |q| or |b|, subnormal-scale b,
    lr so large or small that tau leaves [1e-12, 1e8], non-finite values."""
    if name not in _C().cpu_fast_float32_activations():
        pytest.skip(f"{name} has no fast path on this CPU/build")
    q = torch.tensor([[2e4, -3e5, 0.5, 0.5, 0.5, float("nan"), 0.5, 1.5]])
    b = torch.tensor([[0.3, 1.0, 2e9, 1e-25, -1e-30, 1.0, float("inf"), 0.7]])
    z = torch.tensor([2.0])
    for lr in (0.3, 1e-14, 1e9):
        a, n = redone(lambda: ib_alpha(q, b, z, lr, 0.0, name))
        r = reference(q, b, z, lr, 0.0, name)
        finite = torch.isfinite(r)
        assert_float32_close(a[finite], r[finite], b[finite])
        assert torch.isnan(a[~finite]).all()
        assert n >= (7 if 1e-12 <= lr * 2 <= 1e8 else 0)
        if not 1e-12 <= lr * 2 <= 1e8:
            assert n == 0  # the whole row took the double solver (not counted per element)


def passes(fn):
    """fn's result, how many elements the first pass left to the second, and how many went to
    the double solver."""
    _C().cpu_fast_float32_second_pass(True)
    out, n_double = redone(fn)
    return out, _C().cpu_fast_float32_second_pass(True), n_double


@pytest.mark.parametrize("name", ["smoothstep", "arctan"])
def test_first_pass_takes_small_steps_and_leaves_large_ones(name):
    """Small steps (tau |b| << 1, the benchmark's inputs) are the first pass's: at most 1% goes
    on. Large ones mostly go on to the second pass; both match the reference."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(256, 512, generator=g) * 2
    b = torch.randn(256, 512, generator=g)
    z = torch.rand(256, generator=g) * 100 + 1
    for scale, lr, most_second in ((1e-2, 0.1, False), (1.0, 1.0, True)):
        bs = b * scale
        a, n2, _ = passes(lambda: ib_alpha(q, bs, z, lr, 1e-4, name))
        assert_float32_close(a, reference(q, bs, z, lr, 1e-4, name), bs)
        if most_second:
            assert n2 >= 0.2 * q.numel(), n2
        else:
            assert n2 <= 0.01 * q.numel(), n2


def _first_pass_edges(name):
    """(q, b) float32 pairs on and around the edges of the first pass's certificates, for
    tau = 1 (lr = 0.5, z = 2, no decay), each with the sign of b flipped too."""
    qs, bs = [], []

    def add(q, b):
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        qs.append(q)
        bs.append(np.full_like(q, b))

    around = lambda x: _ulps_around(x, 6).astype(np.float64)  # noqa: E731
    if name == "smoothstep":
        # K2 = 3 b: 1/2 (middle), 0.99 (above); e^2 = 4 K2 / 3 (above, large steps); the kinks
        for K2 in (0.3, 0.5, 0.5 * (1 + 1e-6), 0.7, 0.99, 1.0, 1.5, 3.0, 30.0, 300.0, 3000.0):
            b = K2 / 3
            add(np.linspace(-1.5, 3 + 2.5 * np.sqrt(b), 3001), b)
            add(around(-1.0), b)
            add(around(1.0), b)
            add(around(0.5 / K2), b)  # K2 c = 1/2
            add(around(1 + np.sqrt(4 * K2 / 3)), b)  # e^2 = 4 K2 / 3
            add(np.concatenate([around(x) for x in _jumps(name, b, 2.0, 0.5, 0.0, -1.5, 3 + 2.5 * np.sqrt(b))] or [[]]), b)
    else:
        # c^2 = 3, 3 tau b = c; three-root cases (large tau b, c > sqrt 3) next to one-root ones
        for b in (0.01, 0.3, 0.5, 0.58, 1.0, 2.0, 5.0, 20.0):
            add(np.linspace(-3.0, 4.0 + 3 * b, 3001), b)
            add(around(np.sqrt(3.0)), b)
            add(around(3 * b), b)
            add(np.concatenate([around(x) for x in _jumps(name, b, 2.0, 0.5, 0.0, 0.0, 4.0 + 3 * b)] or [[]]), b)
    q = np.concatenate(qs)
    b = np.concatenate(bs)
    return np.concatenate([q, -q]), np.concatenate([b, -b])


@pytest.mark.parametrize("name", ["smoothstep", "arctan"])
def test_first_pass_edges_match_reference(name):
    """On each bound the first pass certifies itself with (and on alpha's jumps beyond them),
    float32 ulps either side: what it keeps is right, what it leaves the second pass gets right."""
    q, b = _first_pass_edges(name)
    qt = torch.from_numpy(q).float().reshape(1, -1)
    bt = torch.from_numpy(b).float().reshape(1, -1)
    zt = torch.tensor([2.0])
    a, n2, _ = passes(lambda: ib_alpha(qt, bt, zt, 0.5, 0.0, name))
    assert 0 < n2 < qt.numel()  # both passes were exercised
    assert_float32_close(a, reference(qt, bt, zt, 0.5, 0.0, name), bt)


def test_counters_reject_a_non_bool_reset():
    for counter in (_C().cpu_fast_float32_second_pass, _C().cpu_fast_float32_redone):
        with pytest.raises(TypeError):
            counter("yes")
    assert _C().cpu_fast_float32_second_pass(reset=False) >= 0
