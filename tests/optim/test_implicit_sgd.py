"""ImplicitSGD: the lr the backward sees, mixed IB/EB parameters, momentum, clipping, state."""
import copy
import pickle

import pytest
import torch
from torch import nn

from torchopt_ext.nn import ImplicitLinear
from torchopt_ext.ops import ib_alpha_reference
from torchopt_ext.optim import ImplicitSGD


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(ImplicitLinear(4, 6, "arctan"), nn.Linear(6, 6), ImplicitLinear(6, 2, "identity")).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _expected_first_grad(layer, x, eta, mu):
    """Implicit gradient of a single arctan layer under loss sum(y), from the reference alpha."""
    q = x @ layer.weight.detach().t() + layer.bias.detach()
    a = ib_alpha_reference(q, torch.ones_like(q), (x * x).sum(-1) + 1, eta, mu, "arctan")
    return mu * layer.weight.detach() / (1 + eta * mu) + a.t() @ x


def test_backward_follows_scheduler():
    torch.manual_seed(0)
    layer = ImplicitLinear(3, 2, "arctan").double()
    x = torch.randn(5, 3, dtype=torch.float64) * 3
    opt = ImplicitSGD(layer.parameters(), lr=2.0, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    for eta in (2.0, 0.2, 0.02):
        opt.zero_grad()
        layer(x).sum().backward()
        expected = _expected_first_grad(layer, x, eta, 0.1)
        stale = _expected_first_grad(layer, x, 2.0, 0.1)
        assert torch.allclose(layer.weight.grad, expected, atol=1e-12)
        if eta != 2.0:
            assert not torch.allclose(layer.weight.grad, stale, atol=1e-6)  # the test can see staleness
        opt.step()
        sched.step()


def test_backward_follows_load_state_dict_and_add_param_group():
    torch.manual_seed(0)
    layer, other = ImplicitLinear(3, 2, "arctan").double(), ImplicitLinear(3, 2, "arctan").double()
    x = torch.randn(5, 3, dtype=torch.float64) * 3
    opt = ImplicitSGD(layer.parameters(), lr=1.0)
    saved = ImplicitSGD(layer.parameters(), lr=0.05, weight_decay=0.2).state_dict()
    opt.load_state_dict(saved)
    layer(x).sum().backward()
    assert torch.allclose(layer.weight.grad, _expected_first_grad(layer, x, 0.05, 0.2), atol=1e-12)
    opt.add_param_group({"params": other.parameters(), "lr": 3.0, "weight_decay": 0.0})
    other(x).sum().backward()
    assert torch.allclose(other.weight.grad, _expected_first_grad(other, x, 3.0, 0.0), atol=1e-12)
    opt.param_groups[1]["lr"] = 0.7  # a per-group change is seen at the next backward
    other.weight.grad = None
    other(x).sum().backward()
    assert torch.allclose(other.weight.grad, _expected_first_grad(other, x, 0.7, 0.0), atol=1e-12)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_mixed_params_and_momentum_match_sgd_on_implicit_grads(momentum, nesterov):
    eta, mu = 0.2, 0.05
    a, b = _model(), _model()
    opt_a = ImplicitSGD(a.parameters(), lr=eta, momentum=momentum, weight_decay=mu, nesterov=nesterov)
    # b: the same implicit gradients (lr set on the layers), stepped by torch's SGD; decay only on EB
    for layer in (b[0], b[2]):
        layer.lr, layer.weight_decay = eta, mu
    ib = [p for i in (0, 2) for p in b[i].parameters()]
    opt_b = torch.optim.SGD([{"params": ib, "weight_decay": 0.0}, {"params": b[1].parameters()}],
                            lr=eta, momentum=momentum, weight_decay=mu, nesterov=nesterov)
    x, y = _data()
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-12)


def test_clip_grad_norm_clips_implicit_gradient():
    model = _model()
    opt = ImplicitSGD(model.parameters(), lr=5.0, weight_decay=0.01)
    x, y = _data()
    _loss(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    before = [p.detach().clone() for p in model.parameters()]
    reported = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
    assert torch.allclose(reported, total)
    opt.step()
    scale = 0.1 / (total + 1e-6)
    for p, p0, g, (i, _) in zip(model.parameters(), before, grads, enumerate(grads)):
        decay = 0.0 if i < 2 or i > 3 else 0.01 * p0  # the EB Linear (params 2, 3) decays in the step
        assert torch.allclose(p, p0 - 5.0 * (g * scale + decay), atol=1e-10)


def test_closure_hooks_and_maximize():
    model = _model()
    opt = ImplicitSGD(model.parameters(), lr=0.1)
    x, y = _data()
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor) and calls == ["pre", "post"]
    # maximize L == minimize -L
    a, b = _model(), _model()
    oa, ob = ImplicitSGD(a.parameters(), lr=0.3, weight_decay=0.1, maximize=True), ImplicitSGD(b.parameters(), lr=0.3, weight_decay=0.1)
    (-_loss(a, x, y)).backward()
    _loss(b, x, y).backward()
    oa.step()
    ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-12)


def test_state_dict_deepcopy_and_pickle():
    model = _model()
    opt = ImplicitSGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    _loss(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    opt2 = ImplicitSGD(model.parameters(), lr=1.0, momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert all(torch.equal(opt2.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in sd["state"].items())
    # model and optimizer copied together: the copy's optimizer owns the copy's layers
    both = copy.deepcopy({"model": model, "opt": opt})
    both["opt"].param_groups[0]["lr"] = 0.05
    both["opt"].zero_grad()
    both["model"][0](x).sum().backward()
    assert torch.allclose(both["model"][0].weight.grad, _expected_first_grad(both["model"][0], x, 0.05, 0.0), atol=1e-12)
    both = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    _loss(both["model"], x, y).backward()
    both["opt"].step()
    # copies keep the implicit tag on the layers' parameters (no double decay for a new optimizer)
    from torchopt_ext.nn.hyper import is_implicit

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [is_implicit(p) for p in clone.parameters()] == [True, True, False, False, True, True]
    # a pickled model alone has no optimizer: its backward says so
    alone = pickle.loads(pickle.dumps(model))
    with pytest.raises(RuntimeError, match="ImplicitSGD"):
        _loss(alone, x, y).backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        ImplicitSGD(_model().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        ImplicitSGD(_model().parameters(), lr=0.1, nesterov=True)
