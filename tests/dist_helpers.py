"""Shared set-up of the multi-process (gloo on 127.0.0.1) tests."""
import os
import socket

import torch.distributed as dist


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


def close_gloo() -> None:
    """Leaves the group: a barrier first, so that no rank tears its connections down while the other
    still reads from them (seen: "terminate called without an active exception", SIGABRT, in about
    one run in eight without it)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
