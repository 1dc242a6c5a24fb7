"""ib_alpha at its edges: inputs that require grad (alpha is not differentiable, the result never
requires grad), learning rates and weight decays beyond float32's range (the compiled kernel
finite and accurate wherever the float64 reference is), and meta or fake (FakeTensorMode) inputs
(shape, dtype and device through the op's fake kernel, no value read)."""
import importlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

import torchopt_ext
from tests.ops.test_ib_alpha_op import NAMES, act_of, assert_matches, inputs
from torchopt_ext import activations
from torchopt_ext.ops import ib_alpha, ib_alpha_reference

needs_ext = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")


def raw_op(q, b, z, lr, wd, act):
    knots, coef = act.tables(q.device)
    return torch.ops.torchopt_ext.ib_alpha(q, b, z, lr, wd, act.kind, knots, coef)


# ---------------------------------------------------------------------------------------------
# inputs that require grad


@pytest.mark.parametrize("fn", [ib_alpha, ib_alpha_reference, pytest.param(raw_op, marks=needs_ext)])
@pytest.mark.parametrize("name", ["relu", "arctan", "fitted_sigmoid"])
def test_result_does_not_require_grad(fn, name):
    q, b, z = inputs(shape=(6, 5))
    want = fn(q, b, z, 0.3, 0.01, act_of(name))
    qg, bg, zg = (t.clone().requires_grad_() for t in (q, b, z))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered"
        a = fn(qg, bg, zg, 0.3, 0.01, act_of(name))
    assert not a.requires_grad and a.grad_fn is None
    torch.testing.assert_close(a, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not require grad"):
        a.sum().backward()  # loudly, rather than leaving every .grad None


@needs_ext
def test_alpha_is_a_constant_in_a_larger_graph_eager_and_compiled():
    def f(q, b, z):
        return (ib_alpha(q, b, z, 0.3, 0.0, "arctan") * q).sum()

    q, b, z = (t.float() for t in inputs(shape=(8, 4)))
    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        qg = q.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fn(qg, b, z).backward()
        grads.append(qg.grad)
    alpha = ib_alpha(q, b, z, 0.3, 0.0, "arctan")
    torch.testing.assert_close(grads[0], alpha, rtol=0, atol=0)  # d(alpha*q)/dq = alpha: alpha held fixed
    torch.testing.assert_close(grads[1], alpha)


# ---------------------------------------------------------------------------------------------
# learning rates and weight decays beyond float32's range

EXTREME_LR = [1e30, 1e38, 1e39, 1e300]
EXTREME_WD = [0.0, 1e-300, 1e-30, 1e-3, 1e30, 1e300]


def extreme_inputs(dtype):
    """Ordinary values and extremes (none on a jump of alpha), every (q, b) pair, in rows of
    z_sqnorm from 1 (a bias's 1 alone) to 1e20; |b| <= 1e30, so that no alpha leaves float32's
    range (|alpha| <= 1.5 |b|)."""
    vq = torch.tensor([-3e38, -1e30, -2.7, -1e-30, 0.0, 1e-30, 0.7, 3.0, 1e10, 1e30, 3e38], dtype=torch.float64)
    vb = torch.tensor([-1e30, -1e10, -2.5, -1e-30, 0.0, 1e-30, 0.7, 3.0, 1e10, 1e30], dtype=torch.float64)
    q, b = torch.meshgrid(vq, vb, indexing="ij")
    q, b = q.reshape(1, -1).expand(4, -1), b.reshape(1, -1).expand(4, -1)
    z = torch.tensor([1.0, 5.0, 1e10, 1e20], dtype=torch.float64)
    return q.contiguous().to(dtype), b.contiguous().to(dtype), z.to(dtype)


@needs_ext
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_lr_and_weight_decay_match_the_reference(name, dtype):
    q, b, z = extreme_inputs(dtype)
    act = act_of(name)
    for lr in EXTREME_LR:
        for wd in EXTREME_WD:
            a = ib_alpha(q, b, z, lr, wd, act)
            ref = ib_alpha_reference(q.double(), b.double(), z.double(), lr, wd, act)
            finite = torch.isfinite(ref)
            where = f"{name} {dtype} lr={lr:g} wd={wd:g}"
            assert torch.equal(torch.isfinite(a), finite), where
            assert_matches(a[finite], ref[finite].to(dtype), b[finite], dtype)


@needs_ext
@pytest.mark.parametrize("name", ["relu", "identity"])
@pytest.mark.parametrize("lr", [1e-3, 3.0] + EXTREME_LR)
@pytest.mark.parametrize("wd", [0.0, 0.1, 1e30])
def test_float32_relu_and_identity_are_exact_to_a_few_ulps(name, lr, wd):
    """The closed forms run in float32 on row constants computed in double (and in double for a
    row whose constants leave float32's normal range): a few roundings from the float64 result,
    relative, down to float32's smallest normal number."""
    q, b, z = extreme_inputs(torch.float32)
    g = torch.Generator().manual_seed(1)
    q = torch.cat([q, (torch.randn(4, 300, generator=g) * 3).float()], 1)
    b = torch.cat([b, torch.randn(4, 300, generator=g).float()], 1)
    a = ib_alpha(q, b, z, lr, wd, name).double()
    ref = ib_alpha_reference(q.double(), b.double(), z.double(), lr, wd, name)
    err = (a - ref).abs()
    bound = 4 * 2.0**-24 * ref.abs() + 2 * 1.1754943508222875e-38
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("fn", [pytest.param(ib_alpha, marks=needs_ext), ib_alpha_reference])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_arctan_far_from_the_origin_takes_its_one_real_root(fn, dtype):
    """With b and q of opposite signs (c <= 0 after the flip to b >= 0) the cubic has exactly one
    real root; beyond |q| ~ 1e8 its discriminant is rounding noise, whose sign must not send the
    solve to the three-root form. Checked on the equation itself: alpha (1 + (q - tau alpha)^2) = b."""
    if fn is ib_alpha_reference and dtype == torch.float32:
        pytest.skip("the reference computes in float64 whatever the dtype")
    g = torch.Generator().manual_seed(5)
    n = 2000
    b = 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 8 - 4)
    b = torch.where(torch.rand(n, 1, generator=g) < 0.5, -b, b)
    q = -torch.sign(b) * 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 + 8)  # 1e8 to 1e12
    z = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1
    q, b, z = q.to(dtype), b.to(dtype), z.to(dtype)
    for lr in (1e-3, 1.0, 1e4, 1e9, 1e12, 1e30):
        a = fn(q, b, z, lr, 0.0, "arctan").double()
        tau = lr * z.double().unsqueeze(1)
        residual = a * (1 + (q.double() - tau * a) ** 2) - b.double()
        tol = 1e-9 if dtype == torch.float64 else 1e-6
        assert bool((residual.abs() <= tol * b.double().abs()).all()), (lr, float((residual / b.double()).abs().max()))


@needs_ext
def test_extreme_lr_keeps_nan_to_its_own_elements():
    q, b, z = inputs(shape=(4, 6), dtype=torch.float32)
    q[1, 2] = float("nan")
    z[3] = float("nan")
    bad = torch.zeros(4, 6, dtype=torch.bool)
    bad[1, 2] = True
    bad[3] = True
    for name in NAMES:
        for lr in (1e39, 1e300):
            a = ib_alpha(q, b, z, lr, 0.0, act_of(name))
            assert torch.isnan(a[bad]).all() and torch.isfinite(a[~bad]).all(), (name, lr)


# ---------------------------------------------------------------------------------------------
# meta and fake inputs


def meta_inputs(shape, dtype):
    return (torch.empty(shape, dtype=dtype, device="meta"), torch.empty(shape, dtype=dtype, device="meta"),
            torch.empty(shape[:-1], dtype=dtype, device="meta"))


@pytest.mark.parametrize("fn", [ib_alpha, ib_alpha_reference])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_meta_inputs_give_a_meta_result(fn, name, dtype):
    q, b, z = meta_inputs((3, 7, 5), dtype)
    for lr in (0.1, torch.tensor(0.1, device="meta")):
        a = fn(q, b, z, lr, 0.01, act_of(name))
        assert a.is_meta and a.shape == (3, 7, 5) and a.dtype == dtype and a.is_contiguous()
    # a non-contiguous view, inputs that require grad: still a contiguous meta result, no grad
    qt, bt = q.transpose(0, 1).requires_grad_(), b.transpose(0, 1)
    a = fn(qt, bt, z.t(), 0.1, 0.0, act_of(name))
    assert a.is_meta and a.shape == (7, 3, 5) and a.is_contiguous() and not a.requires_grad


@needs_ext
def test_meta_inputs_go_through_the_fake_kernel(monkeypatch):
    module = importlib.import_module("torchopt_ext.ops.ib_alpha")  # (the package's ib_alpha is the function)
    seen = []
    monkeypatch.setattr(module, "_alpha_like", lambda pre: seen.append(pre.shape) or torch.empty_like(pre))
    a = ib_alpha(*meta_inputs((4, 3), torch.float32), 0.1, 0.0, act_of("fitted_sigmoid"))
    assert a.is_meta and seen == [(4, 3)]


@pytest.mark.parametrize("fn", [ib_alpha, ib_alpha_reference])
def test_meta_inputs_still_have_their_shapes_and_numbers_checked(fn):
    q, b, z = meta_inputs((4, 3), torch.float32)
    with pytest.raises(ValueError, match="grad_out must have pre's shape"):
        fn(q, b[:, :2], z, 0.1)
    with pytest.raises(ValueError, match="z_sqnorm must have shape"):
        fn(q, b, z[:2], 0.1)
    with pytest.raises(TypeError, match="share one dtype"):
        fn(q, b.double(), z, 0.1)
    with pytest.raises(ValueError, match="lr must be finite and > 0"):
        fn(q, b, z, -1.0)
    with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
        fn(q, b, z, 0.1, float("inf"))
    with pytest.raises(ValueError, match="one device"):
        fn(q, b, torch.ones(4), 0.1)


@pytest.mark.parametrize("fn", [ib_alpha, ib_alpha_reference])
def test_a_tensor_lr_without_a_value_is_refused_for_real_inputs(fn):
    q, b, z = inputs(shape=(4, 3))
    with pytest.raises(ValueError, match="lr must be a number or a tensor with a value"):
        fn(q, b, z, torch.tensor(0.1, device="meta"))


@pytest.mark.parametrize("fn", [ib_alpha, ib_alpha_reference])
@pytest.mark.parametrize("name", NAMES)
def test_fake_tensor_mode(fn, name):
    act = activations.PiecewiseCubic.fit(torch.tanh, -3, 3, 6) if name == "fitted_sigmoid" else act_of(name)
    real_lr = torch.tensor(0.2)
    with FakeTensorMode():
        q, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
        z = torch.rand(6, dtype=torch.float64) + 1
        for lr in (0.2, real_lr, torch.tensor(0.2)):
            a = fn(q, b, z, lr, 0.01, act)
            assert is_fake(a) and a.shape == (6, 4) and a.dtype == torch.float64 and a.device.type == "cpu"
    # nothing fake was left in the activation's cache of tables: the real call still works
    assert not any(is_fake(t) for tables in act._tables.values() for t in tables)
    q, b, z = inputs(shape=(6, 4))
    torch.testing.assert_close(fn(q, b, z, 0.2, 0.01, act), ib_alpha_reference(q, b, z, 0.2, 0.01, act))
