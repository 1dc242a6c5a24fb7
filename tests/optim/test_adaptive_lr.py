"""AdaptiveLRSGD: the paper's formulas on a quadratic, exact cancellation of the probes, state,
schedulers, non-finite probe losses, the batched path."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD, FunctionalProbe

D = torch.float64


def _quadratic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D)
    A = m @ m.T + n * torch.eye(n, dtype=D)
    b = torch.randn(n, generator=g, dtype=D)
    w = nn.Parameter(torch.randn(n, generator=g, dtype=D))

    def loss():
        return 0.5 * w @ A @ w - b @ w

    return A, b, w, loss


def _grad_step(w, loss):
    w.grad = None
    loss().backward()
    return w.grad.detach().clone()


def test_newton_step_lands_on_line_search_minimiser():
    A, b, w, loss = _quadratic()
    # delta must sit far below the second difference 4 h^2 g'Ag for eq. 18 to be a Newton step
    opt = AdaptiveLRSGD([w], lr=0.01, eps=1e-3, delta=1e-15, method="newton")
    g = _grad_step(w, loss)
    opt.step(loss)
    exact = (g @ g) / (g @ A @ g)
    assert opt.param_groups[0]["lr"] == pytest.approx(exact.item(), rel=1e-6)


def test_first_order_rule_moves_eta_by_meta_lr_g_dot_g_next():
    A, b, w, loss = _quadratic(seed=1)
    eta, kappa = 0.02, 1e-3
    opt = AdaptiveLRSGD([w], lr=eta, eps=1e-3, delta=1e-12, method="first_order", meta_lr=kappa)
    g = _grad_step(w, loss)
    g_next = A @ (w.detach() - eta * g) - b  # gradient at w - eta*g, the same batch
    opt.step(loss)
    assert opt.param_groups[0]["lr"] - eta == pytest.approx((kappa * g @ g_next).item(), rel=1e-6)


def test_momentum_on_eta_and_delta_clamp_follow_the_formulas():
    A, b, w, loss = _quadratic(seed=2)
    beta, eps, delta = 0.7, 1e-3, 1e-6
    opt = AdaptiveLRSGD([w], lr=0.001, eps=eps, delta=delta, lr_momentum=beta, method="newton")
    v = 0.0
    for _ in range(4):
        eta = opt.param_groups[0]["lr"]
        _grad_step(w, loss)
        opt.step(loss)
        f = opt.last_probe_losses.tolist()
        v = beta * v - 2 * eps * (f[3] - f[1]) / (f[4] + f[0] - 2 * f[2] + delta)
        want = max(delta, eta + v)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        assert opt.param_groups[0]["lr_velocity"] == pytest.approx(v, rel=1e-12)
    # a step that overshoots below zero is clamped to delta
    opt2 = AdaptiveLRSGD([w], lr=0.5, eps=eps, delta=delta, method="newton")  # far past the minimiser: Newton says < 0
    _grad_step(w, loss)
    opt2.step(lambda: 0.5 * w @ A @ w - b @ w + 0.0 * (w @ w))
    assert opt2.param_groups[0]["lr"] >= delta


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_probe_loss_shrinks_eta_and_still_steps(bad):
    A, b, w, loss = _quadratic(seed=3)
    w_ref = w.detach().clone()
    opt = AdaptiveLRSGD([w], lr=0.01, lr_momentum=0.9, method="newton")
    g = _grad_step(w, loss)
    calls = []

    def closure():
        calls.append(1)
        return loss() + (bad if len(calls) == 4 else 0.0)

    opt.step(closure)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # halved
    assert opt.param_groups[0]["lr_velocity"] == 0.0
    assert torch.equal(w.detach(), w_ref - 0.01 * g)  # the weight step is not skipped
    for _ in range(40):  # all probes NaN: eta keeps shrinking down to delta, never below, never NaN
        _grad_step(w, loss)
        opt.step(lambda: loss() * float("nan"))
        eta = opt.param_groups[0]["lr"]
        assert math.isfinite(eta) and eta >= 1e-6
    assert eta == 1e-6


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_exact_cancellation_against_sgd_with_dropout_and_batchnorm():
    torch.manual_seed(0)
    net_a = _Net()
    net_b = copy.deepcopy(net_a)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    lossf = nn.CrossEntropyLoss()
    opt_a = AdaptiveLRSGD(net_a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, model=net_a)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    masks = []
    net_a.body[3].register_forward_hook(lambda m, i, o: masks.append((i[0] != 0, o == 0)))
    for it in range(3):
        for net in (net_a, net_b):
            torch.manual_seed(100 + it)
            net.zero_grad()
            lossf(net(x), y).backward()
        opt_b.param_groups[0]["lr"] = opt_a.param_groups[0]["lr"]  # SGD with the eta the step starts with
        grads = [p.grad.clone() for p in net_a.parameters()]
        masks.clear()
        rng = torch.get_rng_state()
        out = opt_a.step(lambda: lossf(net_a(x), y))
        opt_b.step()
        assert torch.equal(torch.get_rng_state(), rng)  # the training run's random stream is untouched
        # one dropout mask: compared where no probe's relu input is 0 (there a drop is invisible)
        seen = torch.stack([nz for nz, _ in masks]).all(0)
        assert len(masks) == 5 and all(torch.equal(dr & seen, masks[0][1] & seen) for _, dr in masks)
        assert (masks[0][1] & seen).any() and (~masks[0][1] & seen).any()
        assert not out.requires_grad and out.grad_fn is None
        for pa, pb, g in zip(net_a.parameters(), net_b.parameters(), grads):
            assert torch.equal(pa, pb)  # bitwise SGD
            assert torch.equal(pa.grad, g)  # probes left the gradients alone
        for ba, bb in zip(net_a.buffers(), net_b.buffers()):
            assert torch.equal(ba, bb)  # running statistics moved only by the real forward
        assert net_a.training and all(m.training for m in net_a.modules())
    net_a.eval()
    net_a.zero_grad()
    lossf(net_a(x), y).backward()
    opt_a.step(lambda: lossf(net_a(x), y))
    assert not any(m.training for m in net_a.modules())  # eval stays eval


def test_state_dict_round_trips_eta_and_its_momentum():
    A, b, w, loss = _quadratic(seed=4)
    opt = AdaptiveLRSGD([w], lr=0.001, eps=1e-3, lr_momentum=0.9, momentum=0.5, method="newton")
    for _ in range(3):
        _grad_step(w, loss)
        opt.step(loss)
    sd = opt.state_dict()
    w2 = nn.Parameter(w.detach().clone())
    loss2 = lambda: 0.5 * w2 @ A @ w2 - b @ w2  # noqa: E731
    opt2 = AdaptiveLRSGD([w2], lr=1.0, method="newton")
    _grad_step(w2, loss2)
    opt2.step(loss2)  # a stepped optimizer: loading must not read as an outside lr change
    w2.data.copy_(w.detach())
    opt2.load_state_dict(sd)
    g1, g2 = opt.param_groups[0], opt2.param_groups[0]
    assert g2["lr"] == g1["lr"] and g2["lr_velocity"] == g1["lr_velocity"] != 0.0
    assert torch.equal(opt2.state[w2]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _grad_step(w2, loss2)
        opt2.step(loss2)


def test_lr_scheduler_warns():
    A, b, w, loss = _quadratic(seed=5)
    opt = AdaptiveLRSGD([w], lr=0.01)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _grad_step(w, loss)
    with pytest.warns(UserWarning, match="scheduler"):
        opt.step(loss)


def test_errors_name_the_argument():
    A, b, w, loss = _quadratic()
    with pytest.raises(RuntimeError, match="closure"):
        AdaptiveLRSGD([w]).step()
    with pytest.raises(ValueError, match="meta_lr"):
        AdaptiveLRSGD([w], method="first_order")
    with pytest.raises(ValueError, match="method"):
        AdaptiveLRSGD([w], method="adam")
    with pytest.raises(ValueError, match="eps"):
        AdaptiveLRSGD([w], eps=0.0)


def test_validation_closure_is_probed_instead():
    A, b, w, loss = _quadratic(seed=6)
    opt = AdaptiveLRSGD([w], lr=0.01)
    _grad_step(w, loss)
    seen = []
    opt.step(lambda: seen.append("train") or loss(), val_closure=lambda: seen.append("val") or 2 * loss())
    assert seen == ["val"] * 5


def _mlp(dtype):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def test_batched_probes_equal_closure_probes():
    x, y = torch.randn(16, 8, dtype=D), torch.randint(0, 4, (16,))
    lossf = nn.CrossEntropyLoss()
    nets = [_mlp(D), _mlp(D)]
    opts = [AdaptiveLRSGD(n.parameters(), lr=0.1, eps=1e-3, batched=k == 1) for k, n in enumerate(nets)]
    for _ in range(2):
        for net, opt in zip(nets, opts):
            net.zero_grad()
            lossf(net(x), y).backward()
            opt.step(FunctionalProbe(net, lossf, x, y))
        torch.testing.assert_close(opts[0].last_probe_losses, opts[1].last_probe_losses, rtol=1e-9, atol=0)
        assert opts[1].param_groups[0]["lr"] == pytest.approx(opts[0].param_groups[0]["lr"], rel=1e-6)
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)  # eta amplifies float64 rounding


def test_per_sample_losses_are_averaged_in_float64():
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    net = _mlp(torch.float32)
    lossf = nn.CrossEntropyLoss(reduction="none")
    opt = AdaptiveLRSGD(net.parameters(), lr=0.1)
    lossf(net(x), y).mean().backward()
    opt.step(lambda: lossf(net(x), y))
    assert opt.last_probe_losses.dtype == torch.float64 and opt.last_probe_losses.shape == (5,)


def test_tiny_compare_run(tmp_path):
    from torchopt_ext.compare.adaptive import LRS, run

    out = run(str(tmp_path), seeds=1, tiny=True)
    assert (tmp_path / "results.md").exists()
    assert (tmp_path / "loss_eta_logistic.png").exists() and (tmp_path / "loss_eta_mlp.png").exists()
    for name in ("logistic", "mlp"):
        for lr0 in LRS:
            run_ = out["results"][name]["adaptive"][lr0][0]
            assert len(run_["eta"]) == 20 and all(math.isfinite(e) and e >= 1e-6 for e in run_["eta"])


class _Wrapped(nn.Module):  # not a Sequential: the batched path falls back to vmap(functional_call)
    def __init__(self):
        super().__init__()
        self.inner = _mlp(D)

    def forward(self, x):
        return self.inner(x)


def test_batched_vmap_fallback_equals_closure():
    x, y = torch.randn(16, 8, dtype=D), torch.randint(0, 4, (16,))
    lossf = nn.CrossEntropyLoss()
    nets = [_Wrapped(), _Wrapped()]
    opts = [AdaptiveLRSGD(n.parameters(), lr=0.1, eps=1e-3, batched=k == 1) for k, n in enumerate(nets)]
    for net, opt in zip(nets, opts):
        lossf(net(x), y).backward()
        opt.step(FunctionalProbe(net, lossf, x, y))
    torch.testing.assert_close(opts[0].last_probe_losses, opts[1].last_probe_losses, rtol=1e-12, atol=0)


def test_closure_may_return_a_python_float():
    A, b, w, loss = _quadratic(seed=7)
    opt = AdaptiveLRSGD([w], lr=0.01, eps=1e-3, delta=1e-15, method="newton")
    g = _grad_step(w, loss)
    opt.step(lambda: loss().item())
    assert opt.param_groups[0]["lr"] == pytest.approx(((g @ g) / (g @ A @ g)).item(), rel=1e-6)
