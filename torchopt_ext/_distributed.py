"""The process group of a command run under torchrun: who this rank is, sections every rank agrees on,
and leaving the group without crashing or stranding a rank on the way out.

A rank that fails alone and simply leaves makes its peers' next collective fail at once (gloo sees the
closed connection); a rank that waits in a *different* collective than its peers waits until the group's
timeout (30 minutes by default). So work that can fail on one rank runs inside :func:`everywhere`,
:func:`on_rank0` or :func:`gathered`, which end in one all-gather of every rank's outcome: a failure
anywhere is raised on every rank, and all of them leave together.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, List, Optional, Tuple

# how long a failing rank waits for its peers before it leaves anyway: they may be computing, not failing
FAILED_BARRIER_S = 10.0


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of this process in the default group; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_group() -> None:
    """Barrier, then ``destroy_process_group``: a rank that tears down its gloo connections while
    another still reads from them, or exits with its group open, can abort (SIGABRT, "terminate
    called without an active exception"; seen in about one run in eight of our 2-process tests)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:  # on gloo the barrier a failing rank also uses (leave_group_after_failure), so the two meet
            if dist.get_backend() == "gloo":
                dist.monitored_barrier()
            else:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def leave_group_after_failure(timeout_s: Optional[float] = None) -> None:
    """:func:`leave_group` for a rank that is failing: the barrier waits at most ``timeout_s`` (default
    FAILED_BARRIER_S), since a peer that has not failed is in another collective or still computing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    wait = datetime.timedelta(seconds=FAILED_BARRIER_S if timeout_s is None else timeout_s)
    try:  # process_group opens gloo groups only, which have this barrier
        dist.monitored_barrier(timeout=wait)
    except RuntimeError:
        pass  # a peer left or is elsewhere: closing the connections below tells it
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group():
    """Under torchrun (WORLD_SIZE > 1) with no group yet: a gloo group for the block, left on exit (on a
    failure without waiting for peers that are elsewhere); yields (rank, world size)."""
    import torch.distributed as dist

    opened = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
        opened = True
    ok = False
    try:
        yield rank_world()
        ok = True
    finally:
        if opened:
            if ok:
                leave_group()
            else:
                leave_group_after_failure()


def _failure_text(exc: BaseException, rank: int) -> str:
    from torchopt_ext.distill.config import DistillError  # the CLIs' user-facing error

    if isinstance(exc, DistillError):
        return str(exc)
    return f"rank {rank} failed ({type(exc).__name__}: {exc})"


def _agreed(fn: Callable, here: bool, share: bool) -> list:
    """fn() where ``here``; then one all-gather of every rank's (failure, value if ``share``)."""
    rank, world = rank_world()
    value, failure = None, None
    try:
        if here:
            value = fn()
    except BaseException as exc:
        failure = exc
        if world == 1:
            raise
    if world == 1:
        return [value]
    import torch.distributed as dist
    from torchopt_ext.distill.config import DistillError

    sent = (None if failure is None else _failure_text(failure, rank), value if share and failure is None else None)
    box: List = [None] * world
    dist.all_gather_object(box, sent)
    if failure is not None:
        raise failure
    for text, _ in box:
        if text is not None:
            raise DistillError(text)
    return [v for _, v in box] if share else [value]


def everywhere(fn: Callable):
    """fn() on every rank; its value on this rank. A failure on any rank is raised on every rank (the
    failing one raises its own exception, the others a DistillError with its message)."""
    return _agreed(fn, True, False)[0]


def on_rank0(fn: Callable):
    """fn() on rank 0 only; its value there, None elsewhere; a failure there is raised on every rank."""
    return _agreed(fn, rank_world()[0] == 0, False)[0]


def gathered(fn: Callable) -> list:
    """fn() on every rank; every rank's value, in rank order, on every rank (values are pickled);
    a failure on any rank is raised on every rank."""
    return _agreed(fn, True, True)
