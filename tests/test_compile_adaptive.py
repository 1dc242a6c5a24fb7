"""AdaptiveLRSGD with a torch.compile'd model: the probes run the compiled forward.

Tolerance. Inductor fuses and reorders float32 arithmetic, so a compiled forward's loss differs from
eager's by about one float32 ulp (~1e-7 relative). The learning rate is made of the second difference
f(+2) + f(-2) - 2 f(0) ~ 4 h^2 f'', about 1e-4 of the loss here, so one ulp moves eta by ~1e-3
relative per step; per-sample losses (averaged in float64) keep it there. So a float32 run is held to
eager at 2% in eta and 1e-3 in the weights over 5 steps, and a float64 run (rounding 1e-16) to 1e-9.
"""
import copy

import pytest
import torch
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD


def _run(net, steps, x, y, model=None):
    lossf = nn.CrossEntropyLoss(reduction="none")
    opt = AdaptiveLRSGD(net.parameters(), lr=0.5, model=model)
    etas = []
    for _ in range(steps):
        opt.zero_grad()
        lossf(net(x), y).mean().backward()
        opt.step(lambda: lossf(net(x), y))
        etas.append(opt.param_groups[0]["lr"])
    return etas


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 2e-2, 1e-3), (torch.float64, 1e-9, 1e-10)])
def test_compiled_model_follows_eager(dtype, rtol, atol):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, y = torch.randn(64, 16, dtype=dtype), torch.randint(0, 4, (64,))
    want = _run(eager, 5, x, y)
    got = _run(compiled, 5, x, y)
    assert abs(want[-1] - 0.5) > 1e-2  # eta moved, so the comparison means something
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=rtol)
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)
    assert twin[1].num_batches_tracked.item() == 5  # the probes left batch norm's statistics alone
