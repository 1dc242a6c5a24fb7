"""torch.compile of implicit layers: a whole training step against eager, the forward under
fullgraph, opcheck on the backward ops. Compiling costs seconds on the CPU, so each model is
compiled once (module fixture) and the tests read its trajectory."""
import pytest
import torch
from torch import nn

import torchopt_ext
from torchopt_ext.nn import ImplicitLinear, hyper
from torchopt_ext.optim import ImplicitSGD

pytestmark = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")

STEPS = 5


def _relu_mlp(implicit=True):
    torch.manual_seed(0)
    lin = ImplicitLinear if implicit else (lambda n, m, act: nn.Sequential(nn.Linear(n, m), nn.ReLU()))
    return nn.Sequential(lin(6, 16, "relu"), lin(16, 16, "relu"), nn.Linear(16, 3))


def _arctan_mlp():
    torch.manual_seed(0)
    return nn.Sequential(ImplicitLinear(6, 16, "arctan"), ImplicitLinear(16, 3, "arctan"))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g) * 2, torch.randn(32, 3, generator=g)


# (model, optimizer, scheduler): a float lr halved every step, which the optimizer's compiled step
# recompiles for, and a tensor lr that LambdaLR fills in place
CASES = {
    "relu_float_lr": lambda: _relu_opt(_relu_mlp(), ImplicitSGD),
    "arctan_tensor_lr": lambda: _arctan_opt(_arctan_mlp()),
}


def _relu_opt(model, opt_cls):
    opt = opt_cls(model.parameters(), lr=2.0, weight_decay=0.01)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def _arctan_opt(model):
    opt = ImplicitSGD(model.parameters(), lr=torch.tensor(1.5), momentum=0.5)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))


def _train(model, opt, sched, compiled):
    x, y = _data()

    def step(x, y):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step) if compiled else step
    out = []
    for _ in range(STEPS):
        loss = run(x, y)
        sched.step()
        out.append((loss.detach().clone(), [p.detach().clone() for p in model.parameters()]))
    return out


@pytest.fixture(scope="module")
def trajectories():
    """name -> (eager, compiled, op calls per compiled step) over STEPS steps."""
    torch._dynamo.reset()
    calls = []
    resolve_id = hyper.resolve_id

    def counting(layer_id):  # the compiled layers' backward op looks eta up through this
        calls.append(layer_id)
        return resolve_id(layer_id)

    result = {}
    hyper.resolve_id = counting
    try:
        for name, make in CASES.items():
            eager = _train(*make(), compiled=False)
            assert not calls  # eager runs the C++ node, which holds the resolver it was given
            compiled = _train(*make(), compiled=True)
            result[name] = (eager, compiled, len(calls) / STEPS)
            calls.clear()
    finally:
        hyper.resolve_id = resolve_id
        torch._dynamo.reset()
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_equals_eager_under_a_scheduler(trajectories, name):
    eager, compiled, op_calls = trajectories[name]
    n_implicit = sum(isinstance(m, ImplicitLinear) for m in CASES[name]()[0].modules())
    assert op_calls == n_implicit  # every implicit layer's backward ran as the compiled op, each step
    for k, ((le, pe), (lc, pc)) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-5, msg=f"{name}: loss of step {k}")
        for i, (a, b) in enumerate(zip(pc, pe)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}: param {i} after step {k}")
    # the parameters moved: two runs that did nothing would match trivially
    assert not torch.allclose(eager[-1][1][0], eager[0][1][0], atol=1e-3)


def test_compiled_step_takes_the_implicit_step(trajectories):
    """At lr 2 the implicit and explicit steps differ: the compiled run must follow the implicit one."""
    _, compiled, _ = trajectories["relu_float_lr"]
    explicit = _train(*_relu_opt(_relu_mlp(implicit=False), torch.optim.SGD), compiled=False)
    first_ib, first_eb = compiled[0][1][0], explicit[0][1][0]  # first layer's weight after step 1
    assert (first_ib - first_eb).abs().max() > 1e-2


def test_forward_compiles_fullgraph_and_backward_matches():
    torch._dynamo.reset()
    x, y = _data()
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(ImplicitLinear(6, 8, "relu"), ImplicitLinear(8, 3, "arctan"))
        opt = ImplicitSGD(model.parameters(), lr=0.7, weight_decay=0.05)  # noqa: F841
        xr = x.clone().requires_grad_()
        f = torch.compile(model, fullgraph=True) if compiled else model
        out = f(xr)
        ((out - y) ** 2).mean().backward()
        grads.append([out.detach(), xr.grad] + [p.grad for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _linear_inputs(dtype=torch.float64, bias=True, batch=(7,)):
    torch.manual_seed(0)
    x = torch.randn(*batch, 5, dtype=dtype) * 2
    w = torch.randn(4, 5, dtype=dtype)
    b = torch.randn(4, dtype=dtype) if bias else None
    q = torch.nn.functional.linear(x, w, b)
    return x, w, b, q, torch.randn_like(q)


# (kind, dtype, bias, batch shape, eta, mu, maximize, need_x/w/b): every kind once, with bias or
# none, a 3-D input, decay, maximize, eta = 0 (the explicit limit) and unneeded gradients
OPCHECK_CASES = [
    (0, torch.float64, True, (7,), 0.3, 0.01, False, (True, True, True)),
    (1, torch.float32, False, (2, 3), 1.5, 0.0, True, (True, True, True)),
    (1, torch.float64, True, (6,), 0.0, 0.1, False, (False, True, True)),
    (2, torch.float32, True, (6,), 0.4, 0.05, False, (True, False, True)),
    (3, torch.float64, True, (2, 3), 0.8, 0.0, True, (True, True, False)),
    (4, torch.float32, True, (6,), 0.4, 0.1, False, (True, True, True)),
]


@pytest.mark.parametrize("kind, dtype, bias, batch, eta, mu, maximize, needs", OPCHECK_CASES,
                         ids=["relu", "arctan-nobias-max", "arctan-eta0", "hardtanh", "smoothstep-max", "identity"])
def test_opcheck_implicit_linear_backward(kind, dtype, bias, batch, eta, mu, maximize, needs):
    x, w, b, q, g = _linear_inputs(dtype, bias, batch)
    torch.library.opcheck(torch.ops.torchopt_ext.implicit_linear_backward.default,
                          (x, w, b, q, g, eta, mu, maximize, kind, *needs))


@pytest.mark.parametrize("act", ["relu", "arctan", "identity"])
def test_opcheck_layer_backward(act):
    layer = ImplicitLinear(5, 4, act).double()
    opt = ImplicitSGD(layer.parameters(), lr=0.5, weight_decay=0.02)  # noqa: F841
    x, _, _, _, _ = _linear_inputs()
    w, b = layer.weight.detach(), layer.bias.detach()
    q = torch.nn.functional.linear(x, w, b)
    g = torch.randn_like(q)
    op = torch.ops.torchopt_ext.implicit_linear_layer_backward.default
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(op, (x, w, b, q, g, layer.activation.kind, layer._ib_id, *needs))
    torch.library.opcheck(op, (x, w, None, q, g.t().contiguous().t(), layer.activation.kind, layer._ib_id,
                               True, True, False))
    # the op reads eta from the optimizer when it runs: equal to the eager layer's gradients
    gx, gw, gb = op(x, w, b, q, g, layer.activation.kind, layer._ib_id, True, True, True)
    xr = x.clone().requires_grad_()
    layer(xr).backward(g)
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gw, layer.weight.grad)
    torch.testing.assert_close(gb, layer.bias.grad)
