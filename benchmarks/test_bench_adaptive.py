"""Cost of the five-probe step, as ratios measured side by side (these CPUs are shared and noisy).

    python -m pytest benchmarks/test_bench_adaptive.py -q -s

1. width 256: adaptive step vs (SGD step + five no-grad forwards): the probing machinery's overhead;
2. width 64: adaptive step vs copy-and-restore probes (deepcopy model + optimizer state per probe,
   step, evaluate, restore; what public code does);
3. width 64: batched probes (one vmapped forward) vs the closure path (five forwards).
"""
import copy
import os
import statistics
import time

import pytest
import torch
from torch import nn

from torchopt_ext.optim import AdaptiveLRSGD, FunctionalProbe

BATCH = 128


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the two cores are shared, and a second thread turns ratios into noise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(width, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    x, y = torch.randn(BATCH, width), torch.randint(0, 10, (BATCH,))
    return net, x, y, nn.CrossEntropyLoss()


def _ratio(fa, fb, reps=150):
    """time(fa)/time(fb), the two called alternately so both see the same machine load; returns
    (ratio of minima, ratio of medians). The minimum is the least disturbed by other processes."""
    for f in (fa, fb, fa, fb):
        f()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return min(ta) / min(tb), statistics.median(ta) / statistics.median(tb)


def _adaptive_step(width, batched=False):
    net, x, y, lossf = _setup(width)
    opt = AdaptiveLRSGD(net.parameters(), lr=1e-3, batched=batched)
    probe = FunctionalProbe(net, lossf, x, y)

    def step():
        opt.zero_grad()
        lossf(net(x), y).backward()
        opt.step(probe)
        opt.param_groups[0]["lr"] = 1e-3  # keep the run stationary for timing
        opt._eta_set = 1e-3

    return step


def _sgd_plus_forwards(width, forwards=5):
    """An SGD step plus ``forwards`` no-grad forwards: what the five probes cost at the least."""
    net, x, y, lossf = _setup(width)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        lossf(net(x), y).backward()
        with torch.no_grad():
            for _ in range(forwards):
                lossf(net(x), y)
        opt.step()

    return step


def _copy_and_restore(width, eps=1e-2):
    net, x, y, lossf = _setup(width)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        lossf(net(x), y).backward()
        eta = opt.param_groups[0]["lr"]
        f = []
        for j in (-2, -1, 0, 1, 2):
            model_state, opt_state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
            opt.param_groups[0]["lr"] = eta + j * eps
            opt.step()
            with torch.no_grad():
                f.append(lossf(net(x), y).item())
            net.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
        opt.param_groups[0]["lr"] = eta
        opt.step()

    return step


def test_overhead_vs_sgd_plus_five_forwards(benchmark):
    adaptive, base, sgd = _adaptive_step(256), _sgd_plus_forwards(256), _sgd_plus_forwards(256, 0)
    r, rm = _ratio(adaptive, base, reps=400)  # a 1-2 % difference needs more than 150 pairs to show
    s, sm = _ratio(adaptive, sgd)
    print(f"\nwidth 256 batch {BATCH}: adaptive step / (SGD step + 5 forwards) = {r:.3f} (min), {rm:.3f} (median); "
          f"target <= 1.15; adaptive / plain SGD step = {s:.2f} (min), {sm:.2f} (median); load average "
          f"{os.getloadavg()[0]:.2f}")
    benchmark(adaptive)
    assert r < 3.0  # sanity only: timing targets are reported, not asserted on a shared machine


def test_vs_copy_and_restore(benchmark):
    adaptive, naive = _adaptive_step(64), _copy_and_restore(64)
    r, rm = _ratio(naive, adaptive)
    print(f"\nwidth 64: copy-and-restore / adaptive = {r:.2f}x (min), {rm:.2f}x (median); target >= 2")
    benchmark(adaptive)
    assert r > 1.0


def test_batched_vs_closure(benchmark):
    batched, closure = _adaptive_step(64, batched=True), _adaptive_step(64, batched=False)
    r, rm = _ratio(closure, batched)
    print(f"\nwidth 64: closure path / batched path = {r:.2f}x (min), {rm:.2f}x (median); > 1: batched is faster")
    benchmark(batched)
