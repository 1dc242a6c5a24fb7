"""Two gloo processes on 127.0.0.1 share the internal models and all-reduce: same result as one process,
for one restart and for a batch of two."""

import torch
import torch.multiprocessing as mp

from torchopt_ext.distill import DistillConfig, distill
from torchopt_ext.distill.distill import distill_batch
from tests.helpers.dist_helpers import close_gloo, free_port, init_gloo


def config():
    return DistillConfig(steps=3, epochs=2, per_class=2, outer_epochs=1, batch_size=250, models=3,
                         arch=[1, 2], dtype="float64", seed=5)


def worker(rank, world, port, path):
    init_gloo(rank, world, port)
    try:
        ds = distill(config(), progress=False)
        pair = distill_batch(config(), [0, 1], progress=False)
        if rank == 0:
            torch.save([{"points": d.points, "lrs": d.lrs, "losses": torch.tensor(d.meta["losses"])}
                        for d in [ds] + pair], path)
    finally:
        close_gloo()


def test_two_processes_match_one(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), path), nprocs=2, join=True)
    ranks = torch.load(path, weights_only=True)
    for two, one in zip(ranks, [distill(config(), progress=False)] + distill_batch(config(), [0, 1], progress=False)):
        torch.testing.assert_close(two["points"], one.points, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two["lrs"], one.lrs, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two["losses"], torch.tensor(one.meta["losses"], dtype=two["losses"].dtype))
    assert not torch.allclose(ranks[1]["points"], ranks[2]["points"])
