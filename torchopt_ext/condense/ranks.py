"""Spreading condensation work over the ranks of a torchrun: which rank computes what, and the exchange.

Work is a list of units (a cell to condense; one evaluation net of a cell), dealt round-robin: in round k,
rank r computes unit k * world + r with the unit's own seeds (derive_seed of the run's seed and the unit's
names), so the numbers do not depend on which rank computed them. Each round ends in one all-gather of the
results (torchopt_ext._distributed.gathered): every rank then holds every result, a failure on any rank is
raised on all of them, and rank 0 can write after every round. Outside torchrun the world is one process
and a round is one unit.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

from torchopt_ext._distributed import gathered, rank_world

__all__ = ["in_rounds", "my_share", "rank_world"]


def my_share(items: Sequence, rank: int = None, world: int = None) -> list:
    """The items this rank computes, round-robin: items[rank], items[rank + world], ... (all of them in
    one process). A method that spreads its own work (per class, per expert trajectory) takes these and
    joins the results with :func:`torchopt_ext._distributed.gathered`."""
    if rank is None or world is None:
        rank, world = rank_world()
    return list(items[rank::world])


def in_rounds(units: Sequence, compute: Callable) -> Iterator[Tuple[list, List]]:
    """(the round's units, their results) for consecutive rounds of one unit per rank: rank r runs
    ``compute(unit)`` on the round's r-th unit (ranks past the end run nothing), then the results are
    exchanged, so that every rank sees all of them in unit order."""
    rank, world = rank_world()
    for start in range(0, len(units), world):
        group = list(units[start:start + world])
        mine = my_share(group, rank, world)
        results = gathered(lambda: compute(mine[0]) if mine else None)
        yield group, results[:len(group)]
