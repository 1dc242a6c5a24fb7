"""ImplicitLinear / ImplicitRNN / implicit(): the implicit step against independent computations."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

import torchopt_ext.nn.alpha as alpha_mod
import torchopt_ext.nn.functional as functional_mod
import torchopt_ext.nn.grads as grads_mod
from torchopt_ext import activations as A
from torchopt_ext.nn import Arctan, ImplicitLinear, ImplicitRNN, Smoothstep, implicit
from torchopt_ext.nn.activation_fns import functions
from torchopt_ext.ops import ib_alpha_reference

ACTS = ["relu", "arctan", "hardtanh", "smoothstep", "identity"]
TANH = A.PiecewiseCubic.fit(torch.tanh, -4, 4, 16, name="tanh")


def _layer(n, m, act, eta, mu, seed=0):
    torch.manual_seed(seed)
    layer = ImplicitLinear(n, m, act).double()
    layer.lr, layer.weight_decay = eta, mu
    return layer


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("b", [0.8, -0.6])
def test_single_sample_step_is_exact_proximal_step(act, b):
    # theta+ = argmin_t b*sigma(t.z) + mu/2 |t|^2 + |t - theta|^2/(2 eta); the minimiser lies on
    # theta/(1+eta mu) - eta*a*z, so the scalar a is found by minimize_scalar (grid + refine).
    eta, mu = 0.7, 0.05
    for seed in range(3):
        layer = _layer(3, 1, act, eta, mu, seed)
        x = torch.randn(1, 3, dtype=torch.float64)
        theta = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()]).numpy()
        z = np.concatenate([x[0].numpy(), [1.0]])
        sig = functions(A.get(act))[0]

        def full(t):
            return (b * float(sig(torch.tensor(t @ z))) + 0.5 * mu * t @ t
                    + ((t - theta) ** 2).sum() / (2 * eta))

        def along(a):
            return full(theta / (1 + eta * mu) - eta * a * z)

        grid = np.linspace(-3, 3, 6001)
        a0 = grid[np.argmin([along(a) for a in grid])]
        res = minimize_scalar(along, bounds=(a0 - 2e-3, a0 + 2e-3), method="bounded",
                              options={"xatol": 1e-12})
        expected = theta / (1 + eta * mu) - eta * res.x * z
        (layer(x) * b).sum().backward()
        got = theta - eta * torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad]).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("act", ACTS + [TANH])
@pytest.mark.parametrize("mu", [0.0, 0.01])
def test_small_lr_gives_explicit_gradient(act, mu):
    layer = _layer(5, 4, act, 1e-10, mu)
    eb = nn.Linear(5, 4).double()
    eb.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(2, 3, 5, dtype=torch.float64)  # (*, in_features)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(2, 3, 4, dtype=torch.float64)
    ((layer(x1) - target) ** 2).mean().backward()
    sig = functions(A.get(act))[0]
    ((sig(eb(x2)) - target) ** 2).mean().backward()
    for got, ref, p in ((layer.weight.grad, eb.weight.grad, eb.weight), (layer.bias.grad, eb.bias.grad, eb.bias)):
        ref = ref + mu * p.detach()
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-12 * ref.abs().max())
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act", ACTS + [TANH])
def test_step_matches_reference_alpha_with_weight_decay(act):
    eta, mu = 0.3, 0.1
    layer = _layer(6, 5, act, eta, mu)
    x = torch.randn(8, 6, dtype=torch.float64)
    W, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    q = x @ W.t() + bias
    y = layer(x)
    y.retain_grad()
    loss = ((y - torch.randn(8, 5, dtype=torch.float64)) ** 2).mean()
    loss.backward()
    a = ib_alpha_reference(q, y.grad, (x * x).sum(-1) + 1, eta, mu, act)
    W_new = W / (1 + eta * mu) - eta * a.t() @ x
    b_new = bias / (1 + eta * mu) - eta * a.sum(0)
    assert torch.allclose(W - eta * layer.weight.grad, W_new, atol=1e-12)
    assert torch.allclose(bias - eta * layer.bias.grad, b_new, atol=1e-12)


def test_reference_fallback_matches_compiled(monkeypatch):
    """With no compiled kernel for the device the layer runs the Python formula on the reference
    alpha: the gradients of the compiled node."""
    layer = _layer(4, 3, "arctan", 0.5, 0.01)
    x = torch.randn(7, 4, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    assert type(layer(x).grad_fn).__name__ != "ImplicitLinearFunctionBackward"  # the C++ node ran
    g, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.weight.grad = layer.bias.grad = None
    for mod in (alpha_mod, grads_mod, functional_mod):
        monkeypatch.setattr(mod, "_compiled_for", lambda device: False)
    monkeypatch.setattr(functional_mod, "_C", None)
    calls = []
    monkeypatch.setattr(alpha_mod, "ib_alpha_reference", lambda *a: calls.append(1) or ib_alpha_reference(*a))
    y = layer(x)
    assert type(y.grad_fn).__name__ == "ImplicitLinearFunctionBackward"
    y.pow(2).sum().backward()
    assert calls, "the reference alpha did not run"
    assert torch.allclose(layer.weight.grad, g, atol=1e-12)
    assert torch.allclose(layer.bias.grad, gb, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "arctan", "hardtanh", "smoothstep", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_layer_paths_equal_the_python_backward(act, dtype, monkeypatch):
    """Three ways through ImplicitLinear for the built-in activations: the C++ autograd node
    (_C.implicit_linear, eta from hyper.resolve_id at backward time), the Python autograd.Function
    with its backward as one op (csrc/implicit_linear.cpp), and the Python backward they replace.
    Same outputs and gradients: bias or not, decay, maximize, eta = 0, 3-D input."""
    from torchopt_ext.optim import ImplicitSGD

    torch.manual_seed(1)
    x = (torch.randn(3, 5, 6, dtype=dtype) * 2).requires_grad_()
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-5}
    for bias in (True, False):
        for lr, wd, maximize in ((0.3, 0.0, False), (0.7, 0.05, True), (0.0, 0.1, False)):
            layer = ImplicitLinear(6, 4, act, bias=bias).to(dtype)
            opt = ImplicitSGD(layer.parameters(), lr=lr, weight_decay=wd, maximize=maximize)  # noqa: F841
            results = []
            for path in ("node", "one_op", "python"):
                if path == "one_op":
                    monkeypatch.setattr(functional_mod, "_node_runs", lambda *a: False)
                if path == "python":
                    monkeypatch.setattr(grads_mod, "_op_applies", lambda *a: False)
                layer.zero_grad()
                x.grad = None
                y = layer(x)
                assert (type(y.grad_fn).__name__ == "ImplicitLinearFunctionBackward") == (path != "node")
                (y * torch.linspace(-2, 2, 4, dtype=dtype)).sum().backward()
                results.append([y.detach()] + [t.grad.clone() for t in (x, *layer.parameters())])
            monkeypatch.undo()
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    torch.testing.assert_close(a, b, **tol)


def test_compiled_layer_reports_a_deleted_layer_and_an_unmanaged_one():
    x = torch.randn(4, 3)
    layer = ImplicitLinear(3, 2, "relu")
    with pytest.raises(RuntimeError, match="no torchopt_ext.optim.ImplicitSGD manages"):
        layer(x).sum().backward()
    y = layer(x).sum()
    del layer
    with pytest.raises(RuntimeError, match="deleted before its backward"):
        y.backward()


def test_float32_and_no_bias():
    torch.manual_seed(0)
    layer = ImplicitLinear(4, 3, "relu", bias=False)
    layer.lr = 0.1
    x = torch.randn(5, 4)
    layer(x).sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias is None


def test_rnn_gradient_sums_per_step_alphas():
    eta, mu = 0.4, 0.05
    torch.manual_seed(0)
    rnn = ImplicitRNN(3, 4, "arctan").double()
    rnn.lr, rnn.weight_decay = eta, mu
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = rnn(x)
    out.pow(2).mean().backward()
    # independent explicit replica to read b_t = dL/dh_t
    Wih, Whh, bias = (p.detach().clone().requires_grad_() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_l0))
    h = torch.zeros(2, 4, dtype=torch.float64)
    hs, qs, zs = [], [], []
    for t in range(5):
        q = x[t] @ Wih.t() + h @ Whh.t() + bias
        zs.append(torch.cat([x[t], h.detach(), torch.ones(2, 1, dtype=torch.float64)], 1))
        h = torch.atan(q)
        h.retain_grad()
        hs.append(h)
        qs.append(q.detach())
    torch.stack(hs).pow(2).mean().backward()
    theta = torch.cat([Wih, Whh, bias[:, None]], 1).detach()
    grad = mu * theta / (1 + eta * mu)
    for q, z, h in zip(qs, zs, hs):
        a = ib_alpha_reference(q, h.grad, (z * z).sum(-1), eta, mu, "arctan")
        grad = grad + a.t() @ z
    got = torch.cat([rnn.weight_ih_l0.grad, rnn.weight_hh_l0.grad, rnn.bias_l0.grad[:, None]], 1)
    assert torch.allclose(got, grad, atol=1e-12)


def test_rnn_small_lr_matches_torch_rnn():
    torch.manual_seed(1)
    rnn = ImplicitRNN(3, 4, "relu", num_layers=2, batch_first=True).double()
    rnn.lr = 1e-10
    ref = nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=True).double()
    with torch.no_grad():
        for k in range(2):
            getattr(ref, f"weight_ih_l{k}").copy_(getattr(rnn, f"weight_ih_l{k}"))
            getattr(ref, f"weight_hh_l{k}").copy_(getattr(rnn, f"weight_hh_l{k}"))
            getattr(ref, f"bias_ih_l{k}").copy_(getattr(rnn, f"bias_l{k}"))
            getattr(ref, f"bias_hh_l{k}").zero_()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    o1, h1 = rnn(x)
    o2, h2 = ref(x)
    assert torch.allclose(o1, o2) and torch.allclose(h1, h2)
    o1.sum().backward()
    o2.sum().backward()
    for k in range(2):
        for a, b in ((f"weight_ih_l{k}", f"weight_ih_l{k}"), (f"weight_hh_l{k}", f"weight_hh_l{k}"), (f"bias_l{k}", f"bias_ih_l{k}")):
            assert torch.allclose(getattr(rnn, a).grad, getattr(ref, b).grad, rtol=1e-5, atol=1e-10)


def test_implicit_keeps_outputs_and_reports():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), Arctan(), nn.Linear(8, 8),
                          nn.Hardtanh(), nn.Linear(8, 8), Smoothstep(), nn.LayerNorm(8),
                          nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(10, 6)
    conv, report = implicit(model)
    assert conv is not model and isinstance(model[0], nn.Linear)  # a copy by default
    assert torch.equal(conv(x), model(x))
    assert len(report.converted) == 4
    assert any("LayerNorm" in e for e in report.explicit) and len(report.explicit) == 3
    fitted, rep2 = implicit(model, fit=["tanh"])
    assert len(rep2.converted) == 5 and 0 < rep2.max_fit_error < 1e-3
    assert torch.allclose(fitted(x), model(x), atol=1e-3)
    w0 = model[0].weight
    same, _ = implicit(model, inplace=True)
    assert same is model and isinstance(model[0], ImplicitLinear) and model[0].weight is w0


def test_bad_inputs_raise_clear_errors():
    layer = ImplicitLinear(4, 3)
    with pytest.raises(ValueError, match="in_features=4"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        ImplicitLinear(4, 3, activation="swish")
    with pytest.raises(ValueError, match="in_features"):
        ImplicitLinear(0, 3)
    with pytest.raises(RuntimeError, match="no torchopt_ext.optim.ImplicitSGD manages"):
        layer(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="input_size=3"):
        ImplicitRNN(3, 4)(torch.randn(5, 2, 2))
    with pytest.raises(ValueError, match="fit must"):
        implicit(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), fit=["swish"])


def test_rnn_shapes_and_optimizer_owned_lr():
    from torchopt_ext.optim import ImplicitSGD

    torch.manual_seed(0)
    rnn = ImplicitRNN(3, 4, "smoothstep", num_layers=2, batch_first=True)
    opt = ImplicitSGD(rnn.parameters(), lr=0.1, weight_decay=0.01)
    x = torch.randn(5, 7, 3)
    out, h_n = rnn(x)
    assert out.shape == (5, 7, 4) and h_n.shape == (2, 5, 4)
    assert torch.equal(out[:, -1], h_n[-1])
    out.pow(2).mean().backward()
    opt.step()
    out1, h1 = rnn(torch.randn(7, 3))  # unbatched
    assert out1.shape == (7, 4) and h1.shape == (2, 4)
    with pytest.raises(ValueError, match="h0 must have shape"):
        rnn(x, torch.zeros(1, 5, 4))


def test_autocast_bfloat16_runs_and_stays_close():
    torch.manual_seed(0)
    layer = ImplicitLinear(8, 6, "arctan")
    layer.lr, layer.weight_decay = 0.1, 0.01
    x = torch.randn(16, 8, requires_grad=True)
    layer(x).pow(2).mean().backward()
    ref_w, ref_x = layer.weight.grad.clone(), x.grad.clone()
    layer.weight.grad = layer.bias.grad = x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).mean().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.allclose(layer.weight.grad, ref_w, atol=0.05 * ref_w.abs().max())
    assert torch.allclose(x.grad, ref_x, atol=0.05 * ref_x.abs().max())


def test_compiled_layer_ops_reject_bad_arguments():
    """The raw ops behind ImplicitLinear's compiled paths name what is wrong (the layer never
    passes these, a direct caller might)."""
    from torchopt_ext._extension import _C

    if _C is None:
        pytest.skip("compiled extension not built")
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    q = x @ w.t()
    g = torch.ones_like(q)
    op = torch.ops.torchopt_ext.implicit_linear_backward
    with pytest.raises(RuntimeError, match="kind must be a built-in activation"):
        op(x, w, None, q, g, 0.1, 0.0, False, 5, True, True, True)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        op(x, w[0], None, q, g, 0.1, 0.0, False, 0, True, True, True)
    with pytest.raises(RuntimeError, match="kind must be a built-in activation"):
        _C.implicit_linear(x, w, None, 9, 1)
    with pytest.raises(TypeError):
        _C.set_cpu_fast_float32("yes")
