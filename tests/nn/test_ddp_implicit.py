"""ImplicitSGD + implicit layers under DistributedDataParallel (2 processes, gloo).

The rule (also in torchopt_ext/nn/grads.py): each rank r computes its loss as the mean over
its own B_r samples, so sample i's upstream gradient is b_i = (1/B_r) dl_i/dy; the layer solves
alpha_i(b_i) and writes mu theta/(1+eta mu) + sum_{i on r} alpha_i z_i; DDP averages the R ranks'
gradients, so every rank steps on
    mu theta/(1+eta mu) + (1/R) sum_r sum_{i on r} alpha_i(b_i) z_i.
Because alpha is nonlinear in b this is NOT the single-process step on the mean over all R*B_r
samples (that would use b_i/R inside alpha). The reference below follows the rule: per rank chunk a
mean-reduced backward, gradients summed, then divided by R.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchopt_ext.nn import ImplicitLinear
from torchopt_ext.optim import ImplicitSGD
from tests.helpers.dist_helpers import close_gloo, free_port, init_gloo

R, B, STEPS = 2, 6, 3
ETA, MU, MOMENTUM = 0.5, 0.02, 0.5


def _model():
    torch.manual_seed(0)
    return nn.Sequential(ImplicitLinear(4, 5, "arctan"), nn.Linear(5, 5), ImplicitLinear(5, 2, "relu")).double()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(R * B, 4, generator=g, dtype=torch.float64), torch.randn(R * B, 2, generator=g, dtype=torch.float64)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    init_gloo(rank, R, port)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = ImplicitSGD(model.parameters(), lr=ETA, momentum=MOMENTUM, weight_decay=MU)
        for step in range(STEPS):
            x, y = _batch(step)
            sl = slice(rank * B, (rank + 1) * B)
            opt.zero_grad()
            ((model(x[sl]) - y[sl]) ** 2).mean().backward()
            opt.step()
        torch.save([p.detach() for p in model.module.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_gloo()


def _reference():
    model = _model()
    opt = ImplicitSGD(model.parameters(), lr=ETA, momentum=MOMENTUM, weight_decay=MU)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        for r in range(R):
            sl = slice(r * B, (r + 1) * B)
            ((model(x[sl]) - y[sl]) ** 2).mean().backward()  # grads of the R chunks add up
        for p in model.parameters():
            p.grad /= R  # DDP's average
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_ranks_agree_and_follow_documented_rule(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=R, join=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(R))
    ref = _reference()
    for a, b, c in zip(p0, p1, ref):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-12)
    # the rule differs from the naive full-batch mean (alpha is nonlinear in b): make sure the
    # test can tell them apart
    naive = _model()
    opt = ImplicitSGD(naive.parameters(), lr=ETA, momentum=MOMENTUM, weight_decay=MU)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        ((naive(x) - y) ** 2).mean().backward()
        opt.step()
    assert not all(torch.allclose(a, n.detach(), atol=1e-9) for a, n in zip(p0, naive.parameters()))
