"""torchopt_ext.nn.grads: the implicit layer's gradient formula against the math, the wrapper's
choice of the compiled op, and the callers that share the formula (a stack of layers, the
benchmark's naive baseline, the distillation nets)."""
import pytest
import torch

import torchopt_ext.nn.grads as grads_mod
from torchopt_ext import activations as A
from torchopt_ext.nn.grads import implicit_grads, linear_backward
from torchopt_ext.ops import ib_alpha_reference

ACTS = ["relu", "arctan", "hardtanh", "smoothstep", "identity",
        A.PiecewiseCubic.fit(torch.tanh, -4, 4, 16, name="tanh")]


def _inputs(batch=(2, 5), n=6, m=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, generator=g, dtype=torch.float64) * 2
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    q = torch.nn.functional.linear(x, w, b)
    return x, w, b, q, torch.randn(q.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: getattr(a, "name", a))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_formula_is_the_implicit_step(act, bias, maximize):
    """The optimizer's step theta -/+ eta * grad (minimize / maximize) is the implicit step on
    +-L: theta/(1+eta mu) - eta sum_i alpha_i z_i, alpha of (+-b, ||z||^2 = ||x||^2 + [bias]) from
    the reference; the input gradient is explicit backprop's (b * sigma'(q)) W."""
    eta, mu = 0.4, 0.05
    x, w, b, q, gy = _inputs(bias=bias)
    act_ = A.get(act)
    gx, gw, gb = implicit_grads(x, w, b, q, gy, eta, mu, maximize, act_, solve=ib_alpha_reference)
    sign = -1.0 if maximize else 1.0
    x2, b2 = x.reshape(-1, 6), gy.reshape(-1, 4)
    zsq = (x2 ** 2).sum(-1) + (1.0 if bias else 0.0)
    a = ib_alpha_reference(q.reshape(-1, 4), sign * b2, zsq, eta, mu, act_)
    d = 1.0 + eta * mu
    torch.testing.assert_close(w - sign * eta * gw, w / d - eta * a.t() @ x2, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(b - sign * eta * gb, b / d - eta * a.sum(0), rtol=1e-12, atol=1e-12)
    else:
        assert gb is None
    torch.testing.assert_close(gx, (gy * act_.derivative(q)) @ w, rtol=1e-12, atol=1e-12)


def test_unneeded_gradients_are_none_and_eta_zero_is_explicit():
    x, w, b, q, gy = _inputs()
    act = A.get("arctan")
    gx, gw, gb = implicit_grads(x, w, b, q, gy, 0.0, 0.0, False, act, need_x=False, need_b=False)
    assert gx is None and gb is None
    eb = (gy * act.derivative(q)).reshape(-1, 4)
    torch.testing.assert_close(gw, eb.t() @ x.reshape(-1, 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_x", [True, False])
@pytest.mark.parametrize("mu, maximize", [(0.0, False), (0.1, True)])
def test_a_stack_of_layers_is_each_layer_alone(shared_x, mu, maximize):
    """k layers as one stack (the distillation's batched nets) give each layer's own gradients."""
    k, N, n, m = 3, 5, 4, 6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*(() if shared_x else (k,)), N, n, generator=g, dtype=torch.float64)
    w = torch.randn(k, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(k, m, generator=g, dtype=torch.float64)
    q = torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)
    gy = torch.randn(k, N, m, generator=g, dtype=torch.float64)
    act = A.get("relu")
    stacked = implicit_grads(x, w, b, q, gy, 0.7, mu, maximize, act)
    for j in range(k):
        xj = x if shared_x else x[j]
        alone = implicit_grads(xj, w[j], b[j], q[j], gy[j], 0.7, mu, maximize, act)
        for s, a in zip(stacked, alone):
            torch.testing.assert_close(s[j], a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "hardtanh", A.PiecewiseCubic.fit(torch.tanh, -4, 4, 8)])
def test_wrapper_runs_the_compiled_op_exactly_where_it_applies(act, monkeypatch):
    """linear_backward: the compiled op for a built-in activation in one float32/float64 dtype,
    the Python formula otherwise (a PiecewiseCubic, mixed dtypes), the same numbers either way."""
    from torchopt_ext._extension import _C

    if _C is None:
        pytest.skip("compiled extension not built")
    calls = []
    monkeypatch.setattr(grads_mod, "implicit_grads", lambda *a, **k: calls.append(1) or implicit_grads(*a, **k))
    x, w, b, q, gy = _inputs()
    act_ = A.get(act)
    hyper = lambda: (0.3, 0.02, False)  # noqa: E731
    got = linear_backward(x, w, b, q, gy, act_, hyper, True, True, True)
    assert len(calls) == (0 if act_.kind != A.KIND_PIECEWISE else 1)
    ref = implicit_grads(x, w, b, q, gy, 0.3, 0.02, False, act_)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    calls.clear()
    linear_backward(x.float(), w, b, q, gy, act_, hyper, True, True, True)  # a mixed dtype
    assert len(calls) == 1


@pytest.mark.parametrize("act", ["relu", "arctan", "smoothstep", "identity"])
def test_bench_naive_baseline_gives_the_layers_gradients(act):
    """The benchmark's naive IB (alpha from plain torch ops) gives ImplicitLinear's gradients at the
    benchmark's lr: the same formula, only the alpha solve differs."""
    from torchopt_ext.bench.layers import LR, _NaiveIB
    from torchopt_ext.nn import ImplicitLinear

    torch.manual_seed(0)
    layer = ImplicitLinear(7, 5, act).double()
    layer.lr, layer.weight_decay = LR, 0.0
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    x = torch.randn(9, 7, dtype=torch.float64) * 3
    g = torch.randn(9, 5, dtype=torch.float64)
    layer(x).backward(g)
    _NaiveIB.apply(x, w, b, A.get(act)).backward(g)
    torch.testing.assert_close(w.grad, layer.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, layer.bias.grad, rtol=1e-12, atol=1e-12)
