"""Two gloo processes on 127.0.0.1 share the internal models and all-reduce: same result as one process."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchopt_ext.distill import DistillConfig, distill
from dist_helpers import close_gloo, free_port, init_gloo


def config():
    return DistillConfig(steps=3, epochs=2, per_class=2, outer_epochs=1, batch_size=250, models=3,
                         arch=[1, 2], dtype="float64", seed=5)


def worker(rank, world, port, path):
    init_gloo(rank, world, port)
    try:
        ds = distill(config(), progress=False)
        if rank == 0:
            torch.save({"points": ds.points, "lrs": ds.lrs, "losses": torch.tensor(ds.meta["losses"])}, path)
    finally:
        close_gloo()


def test_two_processes_match_one(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), path), nprocs=2, join=True)
    two = torch.load(path, weights_only=True)
    one = distill(config(), progress=False)
    torch.testing.assert_close(two["points"], one.points, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two["lrs"], one.lrs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two["losses"], torch.tensor(one.meta["losses"], dtype=two["losses"].dtype))
