"""Side-by-side timing: the candidates run interleaved, round after round, so that a noisy,
shared machine slows them alike and their ratio stays meaningful."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_median(fns: Dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 2,
                       device: str = "cpu", min_time: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin.

    Each round runs every function ``reps`` times in a row (``reps`` chosen so one batch takes at
    least ``min_time``), in the same order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    reps = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, int(min_time / dt))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}
