"""What a method holds in one outer iteration, counted the same way by every method that counts it.

The count is of tensor bytes (numel x element size, no allocator slack): the tensors a step keeps on purpose
plus every distinct storage autograd saves for backward. It is deterministic, unlike the process's resident
size, which in a long grid mostly shows what earlier cells left in the allocator's free lists.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Held:
    """Peak bytes of the tensors one step holds: ``fixed`` ones plus every distinct storage autograd saves for
    backward inside :meth:`step` (counted as unroll.py counts its thetas: numel x element size, no allocator
    overhead); a storage freed and reused within a step is counted once. The context yields ``hold(tensors)``,
    which adds tensors the step keeps outside autograd (a detached gradient)."""

    def __init__(self):
        self.peak = 0

    @contextlib.contextmanager
    def step(self, fixed: Iterable[torch.Tensor]):
        seen = {}
        for t in fixed:
            seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()

        def pack(t):
            try:
                s = t.untyped_storage()
                seen.setdefault(s.data_ptr(), s.nbytes())
            except (RuntimeError, NotImplementedError):   # a tensor without a plain storage
                seen.setdefault(id(t), t.numel() * t.element_size())
            return t

        def hold(tensors: Iterable[torch.Tensor]):
            for t in tensors:
                seen.setdefault(t.untyped_storage().data_ptr(), t.numel() * t.element_size())

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield hold
        self.peak = max(self.peak, sum(seen.values()))

    def take(self) -> int:
        """The peak since the last take, and start a new count."""
        peak, self.peak = self.peak, 0
        return peak
