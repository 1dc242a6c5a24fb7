"""torch.compile of implicit layers: a whole training step against eager, the forward under
fullgraph (opcheck on the backward ops: test_op_samples.py). Compiling costs seconds on the CPU,
so each model is compiled once (module fixture) and the tests read its trajectory."""
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


