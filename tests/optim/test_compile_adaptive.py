"""AdaptiveLRSGD with a torch.compile'd model: the probes run the compiled forward.

Tolerance. Inductor fuses and reorders float32 arithmetic, so a compiled forward's loss differs from
eager's by about one float32 ulp (~1e-7 relative). eta is made of the second difference
f(+2) + f(-2) - 2 f(0) ~ 4 h^2 f'', here 1e-5..1e-4 of the loss, so from one and the same state a
compiled step's eta is within ~1e-2 relative of eager's (per-sample losses, averaged in float64,
keep it there). What one step guarantees does not carry over a run: a float32 run's eta is itself
chaotic in its rounding (eager float32 and float64 runs of this model part by 40% in 4 steps), so
float32 is held to eager step by step, from eager's state, and float64 over a whole run to 1e-9.
"""
import copy

import pytest
import torch
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)


def _step(net, opt, x, y):
    lossf = nn.CrossEntropyLoss(reduction="none")
    opt.zero_grad()
    lossf(net(x), y).mean().backward()
    opt.step(lambda: lossf(net(x), y))
    return opt.param_groups[0]["lr"]


def test_compiled_float64_run_follows_eager():
    eager = _model(torch.float64)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    opt_e = AdaptiveLRSGD(eager.parameters(), lr=0.5)
    opt_c = AdaptiveLRSGD(twin.parameters(), lr=0.5)
    for _ in range(5):
        assert _step(compiled, opt_c, x, y) == pytest.approx(_step(eager, opt_e, x, y), rel=1e-9)
    assert abs(opt_e.param_groups[0]["lr"] - 0.5) > 1e-2  # eta moved, so the comparison means something
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=name)
    assert twin[1].num_batches_tracked.item() == 5  # the probes left batch norm's statistics alone


def test_compiled_float32_step_follows_eager_from_the_same_state():
    eager = _model(torch.float32)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt_e = AdaptiveLRSGD(eager.parameters(), lr=0.5)
    opt_c = AdaptiveLRSGD(twin.parameters(), lr=0.5)
    for _ in range(5):
        twin.load_state_dict(eager.state_dict())
        opt_c.load_state_dict(opt_e.state_dict())
        eta_c, eta_e = _step(compiled, opt_c, x, y), _step(eager, opt_e, x, y)
        torch.testing.assert_close(opt_c.last_probe_losses, opt_e.last_probe_losses, rtol=1e-6, atol=0)
        assert eta_c == pytest.approx(eta_e, rel=1e-2)
        for a, b in zip(eager.parameters(), twin.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert abs(opt_e.param_groups[0]["lr"] - 0.5) > 1e-2
