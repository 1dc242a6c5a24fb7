"""Layer microbenchmark: an implicit layer's forward+backward+step against explicit backprop.

Three ways to train the same n -> m layer on one batch, timed side by side in one run (interleaved
rounds, fastest round per method, so machine noise hits all three alike):
  eb     nn.Linear + activation (autograd) + torch.optim.SGD
  ib     torchopt_ext.nn.ImplicitLinear + ImplicitSGD (compiled alpha)
  naive  the same implicit gradient (torchopt_ext.nn.grads.implicit_grads) with alpha from plain
         torch ops (ib_alpha_reference), as the paper's own code did
The paper's flop model bounds ib's overhead over eb by (2n + c_sigma m) / (3nm), c_sigma the
activation's counted flops per alpha solve: of the solver that runs, i.e. the float32 fast path's
count for float32 input on a CPU that takes it (activations.Activation.flops_float32).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterable, List, Sequence

import torch
from torch import nn

from torchopt_ext import activations as _act
from torchopt_ext._extension import _C
from torchopt_ext.nn import ImplicitLinear
from torchopt_ext.nn.activation_fns import functions
from torchopt_ext.nn.grads import implicit_grads
from torchopt_ext.ops import ib_alpha_reference
from torchopt_ext.optim import ImplicitSGD

ACTIVATIONS = ("relu", "arctan", "hardtanh", "smoothstep", "identity")
LR = 1e-3


def c_sigma(activation, dtype=torch.float64, device="cpu"):
    """Counted flops per alpha solve of the solver the kernel runs for this dtype and device."""
    act = _act.get(activation)
    if (dtype == torch.float32 and torch.device(device).type == "cpu" and act.flops_float32 is not None
            and act.name in _C.cpu_fast_float32_activations()):
        return act.flops_float32
    return act.flops


def flop_bound(n: int, m: int, activation, dtype=torch.float64, device="cpu") -> float:
    """The paper's bound on IB's relative overhead over EB: (2n + c_sigma m) / (3nm)."""
    c = c_sigma(activation, dtype, device)
    return math.nan if c is None else (2 * n + c * m) / (3 * n * m)


def target(n: int, activation: str, dtype=torch.float64, device="cpu") -> float:
    """The issue's ceiling for IB/EB at n = m: 1.25 at n = 100 (arctan: none there), otherwise
    1 + bound + 0.10 (arctan at n = 300: + 0.25)."""
    bound = flop_bound(n, n, activation, dtype, device)
    if activation == "arctan":
        return math.nan if n < 300 else 1 + bound + (0.25 if n < 1000 else 0.10)
    return 1.25 if n < 300 else 1 + bound + 0.10


class _NaiveIB(torch.autograd.Function):
    """Implicit linear layer whose alpha comes from plain torch ops: deliberately naive (the eager
    baseline the paper's code stands for), through the layers' own formula so that only the alpha
    solve differs from ib."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        q = torch.addmm(bias, x, weight.t())
        ctx.save_for_backward(x, weight, bias, q)
        ctx.act = act
        return functions(act)[0](q)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, q = ctx.saved_tensors
        _, gw, gb = implicit_grads(x, weight, bias, q, grad_y, LR, 0.0, False, ctx.act, need_x=False,
                                   solve=ib_alpha_reference)
        return None, gw, gb, None


def _steppers(n: int, m: int, batch: int, act: str, dtype, device="cpu") -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(batch, n, dtype=dtype, device=device)
    g = torch.randn(batch, m, dtype=dtype, device=device) / batch
    sigma = functions(_act.get(act))[0]

    eb = nn.Linear(n, m, dtype=dtype, device=device)
    eb_opt = torch.optim.SGD(eb.parameters(), lr=LR)
    ib = ImplicitLinear(n, m, act, dtype=dtype, device=device)
    ib_opt = ImplicitSGD(ib.parameters(), lr=LR)
    nv = nn.Linear(n, m, dtype=dtype, device=device)
    nv_opt = torch.optim.SGD(nv.parameters(), lr=LR)

    def step_eb():
        eb_opt.zero_grad()
        sigma(eb(x)).backward(g)
        eb_opt.step()

    def step_ib():
        ib_opt.zero_grad()
        ib(x).backward(g)
        ib_opt.step()

    def step_naive():
        nv_opt.zero_grad()
        _NaiveIB.apply(x, nv.weight, nv.bias, _act.get(act)).backward(g)
        nv_opt.step()

    return {"eb": step_eb, "ib": step_ib, "naive": step_naive}


def _time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()  # CUDA launches are asynchronous: wait for the work before reading the clock
    return (time.perf_counter() - t0) / iters


def run(sizes: Sequence[int] = (100, 300, 1000, 3000), batch: int = 256,
        activations: Iterable[str] = ACTIVATIONS, repeats: int = 9, min_time: float = 0.02,
        dtype=torch.float32, device="cpu", quick: bool = False) -> List[dict]:
    """Time eb, ib and naive for every n = m in ``sizes`` and every activation.

    Each round times every method for the same number of iterations (chosen so one measurement
    takes about ``min_time`` seconds); the fastest of ``repeats`` rounds is reported. Returns one
    dict per (activation, n): seconds per step of each method, ib/eb, naive/ib and the flop bound.
    ``quick``: 3 rounds of about 5 ms, for a smoke run. ``device``: "cpu" or "cuda".
    """
    device = torch.device(device)
    if quick:
        repeats, min_time = 3, 0.005
    rows = []
    for act in activations:
        for n in sizes:
            steps = _steppers(n, n, batch, act, dtype, device)
            for fn in steps.values():  # warm-up (allocations, lazy init)
                fn()
                fn()
            t1 = _time(steps["ib"], 1, device)
            iters = max(1, int(min_time / max(t1, 1e-6)))
            times = {k: [] for k in steps}
            for _ in range(repeats):
                for k, fn in steps.items():
                    times[k].append(_time(fn, iters, device))
            # the minimum over rounds: on a shared machine other jobs only ever add time, so the
            # least-disturbed round is the best estimate of each method's own cost
            med = {k: min(v) for k, v in times.items()}
            rows.append({
                "activation": act, "n": n, "m": n, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                "eb_s": med["eb"], "ib_s": med["ib"], "naive_s": med["naive"],
                "ib_over_eb": med["ib"] / med["eb"], "naive_over_ib": med["naive"] / med["ib"],
                "flop_bound": flop_bound(n, n, act, dtype, device), "target": target(n, act, dtype, device),
                "c_sigma": c_sigma(act, dtype, device),
                "threads": torch.get_num_threads(), "device": str(device),
            })
    return rows


def _target_cell(r: dict) -> str:
    t = r.get("target", math.nan)
    if not math.isfinite(t):
        return "-"
    return f"{t:.3f} {'met' if r['ib_over_eb'] <= t else 'MISSED'}"


def format_table(rows: List[dict]) -> str:
    """Markdown table of ``run``'s rows: times, IB/EB next to 1 + flop bound and the issue's
    target (met / MISSED), naive/IB."""
    head = ("| activation | n = m | EB ms | IB ms | naive IB ms | IB/EB | 1 + flop bound | target IB/EB "
            "| naive/IB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['activation']} | {r['n']} | {1e3 * r['eb_s']:.3f} | {1e3 * r['ib_s']:.3f} | "
            f"{1e3 * r['naive_s']:.3f} | {r['ib_over_eb']:.3f} | {1 + r['flop_bound']:.4f} | "
            f"{_target_cell(r)} | {r['naive_over_ib']:.2f} |"
        )
    return "\n".join(lines)
