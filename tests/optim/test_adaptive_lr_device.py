"""AdaptiveLRSGD with eta kept on the device (``lr_on_device``): the same run as the float path,
state round trips, override warnings, and on CUDA no host synchronisation in a step."""
import io
import warnings

import pytest
import torch
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD


def _problem(device="cpu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(device, dtype)
    x = torch.randn(32, 8, dtype=dtype).to(device)
    y = torch.randn(32, 1, dtype=dtype).to(device)

    def loss():
        return nn.functional.mse_loss(net(x), y)

    return net, loss


def _run(steps, device="cpu", on_device=None, **kw):
    net, loss = _problem(device)
    opt = AdaptiveLRSGD(net.parameters(), lr=0.05, lr_on_device=on_device, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    return net, opt


@pytest.mark.parametrize("kw", [
    dict(momentum=0.9, weight_decay=1e-3),
    dict(momentum=0.9, weight_decay=1e-3, lr_momentum=0.5, method="newton"),
    dict(relative_eps=True, eps=1e-2),
    dict(method="first_order", meta_lr=0.1),
])
def test_tensor_eta_follows_the_float_path(kw):
    # not bitwise: with a tensor eta the weight step is p + (-eta*d), two roundings, where SGD's
    # fused add makes one, and with relative_eps eta's update runs the reference formula instead of
    # the compiled one; a few ulps a step, which six steps of a changing eta amplify (seen: 6e-13)
    net_f, opt_f = _run(6, on_device=False, **kw)
    net_t, opt_t = _run(6, on_device=True, **kw)
    lr = opt_t.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.dtype == torch.float64
    assert isinstance(opt_f.param_groups[0]["lr"], float)
    assert abs(float(lr) - opt_f.param_groups[0]["lr"]) <= 1e-10 * opt_f.param_groups[0]["lr"]
    for a, b in zip(net_f.parameters(), net_t.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and eta really moved, or the comparison above proves little
    assert abs(float(lr) - 0.05) > 1e-4


def test_tensor_eta_state_dict_round_trip():
    net, loss = _problem()
    opt = AdaptiveLRSGD(net.parameters(), lr=0.05, lr_momentum=0.5, momentum=0.9, lr_on_device=True,
                        method="newton")

    def step(o):
        o.zero_grad()
        loss().backward()
        o.step(loss)

    step(opt)
    step(opt)
    saved_net = {k: v.clone() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through bytes, as a checkpoint would (state_dict holds references)
    step(opt)
    after = [p.detach().clone() for p in net.parameters()]
    eta_after = float(opt.param_groups[0]["lr"])

    net.load_state_dict(saved_net)
    opt2 = AdaptiveLRSGD(net.parameters(), lr=1.0, lr_on_device=True)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loaded eta is the learned one, not an override
        step(opt2)
    assert float(opt2.param_groups[0]["lr"]) == eta_after
    for a, b in zip(after, net.parameters()):
        assert torch.equal(a, b)


def test_tensor_eta_overwritten_by_user_warns():
    net, opt = _run(1, on_device=True)
    _, loss = _problem()
    opt.param_groups[0]["lr"] = 0.01
    opt.zero_grad()
    nn.functional.mse_loss(net(torch.randn(4, 8, dtype=torch.float64)), torch.zeros(4, 1, dtype=torch.float64)).backward()
    with pytest.warns(UserWarning, match="overrides"):
        opt.step(lambda: torch.zeros((), dtype=torch.float64))


@pytest.mark.cuda
def test_cuda_step_never_waits_for_the_device():
    net, opt = _run(1, device="cuda")  # lr_on_device=None: on for CUDA; the first step allocates
    assert opt.param_groups[0]["lr"].is_cuda
    _, loss = _problem("cuda")
    net2, loss2 = _problem("cuda", seed=1)
    opt2 = AdaptiveLRSGD(net2.parameters(), lr=0.05, momentum=0.9, lr_momentum=0.5)
    for _ in range(2):  # warm up: lazily built state and kernels outside the check
        opt2.zero_grad()
        loss2().backward()
        opt2.step(loss2)
    torch.cuda.synchronize()
    opt2.zero_grad()
    loss2().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt2.step(loss2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(opt2.param_groups[0]["lr"]).item()


@pytest.mark.cuda
def test_cuda_run_equals_cpu_run():
    net_c, opt_c = _run(5, momentum=0.9)  # float eta on the CPU
    net_g, opt_g = _run(5, device="cuda", momentum=0.9)  # eta on the device
    torch.testing.assert_close(float(opt_g.param_groups[0]["lr"]), opt_c.param_groups[0]["lr"], rtol=1e-9, atol=0)
    for a, b in zip(net_c.parameters(), net_g.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-12)
