"""Spreading condensation work over the ranks of a torchrun: which rank computes what, and the exchange.

Work is a list of units (a cell to condense; one evaluation net of a cell) in priority order, computed by
:func:`run_queue`: a rank that is free claims the first unit nobody has claimed whose prerequisite is done,
through an atomic counter per unit in the process group's key-value store, and publishes its result there.
So no rank waits for another while work it could do remains, however unequal the units' costs. Each unit runs
with its own seeds (derive_seed of the run's seed and the unit's names), so the numbers do not depend on which
rank computed them. Every rank reads every result; a failure on any rank is published too and raised on all
of them. Outside torchrun the world is one process
and the units run in order.
"""
from __future__ import annotations

import pickle
import time
import uuid
from typing import Callable, Optional, Sequence

from torchopt_ext._distributed import _failure_text, gathered, rank_world

__all__ = ["my_share", "rank_world", "run_queue"]

POLL_S = 0.2   # how often a rank with nothing to claim looks for its peers' results


def my_share(items: Sequence, rank: int = None, world: int = None) -> list:
    """The items this rank computes, round-robin: items[rank], items[rank + world], ... (all of them in
    one process). A method that spreads its own work (per class, per expert trajectory) takes these and
    joins the results with :func:`torchopt_ext._distributed.gathered`."""
    if rank is None or world is None:
        rank, world = rank_world()
    return list(items[rank::world])


def run_queue(units: Sequence, compute: Callable, collect: Callable,
              needs: Optional[Callable] = None) -> None:
    """``compute(unit)`` once per unit, on whichever rank is free first; ``collect(i, result)`` on every rank
    for every unit i, in the order the results arrive. ``needs(i)`` is the index of the unit whose result
    unit i needs collected first (None: none); it must come earlier in ``units``. A failure in ``compute`` or
    ``collect`` on any rank is raised on every rank (the failing one raises its own exception, the others a
    DistillError with its message), each as soon as it finishes the unit in hand."""
    needs = needs or (lambda i: None)
    rank, world = rank_world()
    if world == 1:
        for i, unit in enumerate(units):
            collect(i, compute(unit))
        return
    _Queue(units, compute, collect, needs).run()


class _Queue:
    """One rank's side of :func:`run_queue`. Keys, under a prefix fresh for each queue: ``claim<i>`` (an
    atomic counter: whoever brings it to 1 computes unit i), ``result<i>``, ``done`` (how many results are
    in) and ``order<k>`` (the unit of the k-th result), ``failed`` (the message of a failure)."""

    def __init__(self, units, compute, collect, needs):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        run = gathered(lambda: uuid.uuid4().hex)[0]   # one prefix for all ranks, new for each queue
        # the group's own store (the one torchrun's rendezvous made): no port of our own to open
        self.store = dist.PrefixStore(f"torchopt_ext/queue/{run}/", distributed_c10d._get_default_store())
        self.units, self.compute, self.collect, self.needs = units, compute, collect, needs
        self.rank = rank_world()[0]
        self.collected, self.taken, self.seen = set(), set(), 0
        self.mine = {}   # results this rank computed, collected without reading them back from the store

    def run(self) -> None:
        try:
            while len(self.collected) < len(self.units):
                self._raise_if_failed()
                i = self._claim()
                if i is None:
                    if not self._collect_new():
                        time.sleep(POLL_S)
                    continue
                result = self.mine[i] = self.compute(self.units[i])
                self.store.set(f"result{i}", pickle.dumps(result))
                self.store.set(f"order{self.store.add('done', 1)}", str(i))
                self._collect_new()
        except BaseException as exc:
            from torchopt_ext.distill.config import DistillError
            if not (isinstance(exc, DistillError) and getattr(exc, "from_peer", False)):
                try:
                    self.store.set("failed", _failure_text(exc, self.rank))
                except Exception:
                    pass   # the store went with a peer that left: its own error says why
            raise
        gathered(lambda: None)   # every rank has every result: leave together

    def _claim(self) -> Optional[int]:
        """The first unit not yet taken whose prerequisite is collected, now claimed by this rank; None if
        there is none (all taken, or waiting on a prerequisite)."""
        for i in range(len(self.units)):
            if i in self.taken:
                continue
            need = self.needs(i)
            if need is not None and need not in self.collected:
                continue
            self.taken.add(i)
            if self.store.add(f"claim{i}", 1) == 1:
                return i
        return None

    def _collect_new(self) -> bool:
        """collect() every result published since the last look; whether there was any."""
        done = self.store.add("done", 0)
        new = done > self.seen
        while self.seen < done:
            self.seen += 1
            i = int(self.store.get(f"order{self.seen}"))
            self.taken.add(i)
            result = self.mine.pop(i) if i in self.mine else pickle.loads(self.store.get(f"result{i}"))
            self.collect(i, result)
            self.collected.add(i)
        return new

    def _raise_if_failed(self) -> None:
        if self.store.check(["failed"]):
            from torchopt_ext.distill.config import DistillError
            self._collect_new()   # what the failing rank published before it failed is kept (rank 0 saves it)
            exc = DistillError(self.store.get("failed").decode())
            exc.from_peer = True
            raise exc
