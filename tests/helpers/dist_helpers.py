"""Shared set-up of the multi-process (gloo on 127.0.0.1) tests."""
import os
import socket

import torch.distributed as dist

from torchopt_ext._distributed import leave_group as close_gloo  # noqa: F401  (the workers' teardown)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Joins this process to a gloo group of ``world`` processes on 127.0.0.1:``port``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)

