"""ib_alpha at its edges: inputs that require grad (alpha is not differentiable, the result never
requires grad), learning rates and weight decays beyond float32's range (the compiled kernel
finite and accurate wherever the float64 reference is), and meta or fake (FakeTensorMode) inputs
(shape, dtype and device through the op's fake kernel, no value read)."""
import warnings

import pytest
import torch

import torchopt_ext
from test_ib_alpha_op import NAMES, act_of, assert_matches, inputs
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


@needs_ext
@pytest.mark.parametrize("name", ["relu", "fitted_sigmoid"])
def test_opcheck_with_inputs_that_require_grad(name):
    """With an input that requires grad, opcheck also tests the autograd registration."""
    act = act_of(name)
    q, b, z = inputs(shape=(8, 5))
    knots, coef = act.tables("cpu")
    torch.library.opcheck(torch.ops.torchopt_ext.ib_alpha.default,
                          (q.requires_grad_(), b, z, 0.1, 0.01, act.kind, knots, coef))


