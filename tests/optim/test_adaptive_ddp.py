"""Two processes on gloo: the five probe losses are averaged across ranks, so every rank ends with
the same eta (and, under DistributedDataParallel, the same weights)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD
from tests.helpers.dist_helpers import close_gloo, free_port, init_gloo


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)  # one initialisation on all ranks
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
        ddp = nn.parallel.DistributedDataParallel(net)
        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
        lossf = nn.CrossEntropyLoss()
        opt = AdaptiveLRSGD(ddp.parameters(), lr=0.05, eps=1e-3, model=ddp)
        for _ in range(5):
            x, y = torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g)
            opt.zero_grad()
            lossf(ddp(x), y).backward()
            opt.step(lambda: lossf(ddp(x), y))
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        torch.save({"eta": opt.param_groups[0]["lr"], "w": flat, "f": opt.last_probe_losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_gloo()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_ranks_agree_on_eta(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["eta"] == r1["eta"] != 0.05
    assert torch.equal(r0["f"], r1["f"])
    assert torch.equal(r0["w"], r1["w"])
