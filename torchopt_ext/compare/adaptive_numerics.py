"""How often the five-probe second difference is rounding noise in float32, measured.

Along a real AdaptiveLRSGD run on digits (float32, probe losses averaged per sample in float64), each
step's denominator ``f(+2) + f(-2) - 2 f(0)`` is recomputed at the same probe points by a float64
copy of the model. A step counts as *noise* when the float32 value is off by more than half of the
float64 one (sign flips included), and as *delta-dominated* when |den64| < delta, where eq. 18's
smoothing, not the curvature, sets the step.

    python -m torchopt_ext.compare.adaptive_numerics [--steps 100]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from torchopt_ext.compare.data import MODELS, digits
from torchopt_ext.optim import AdaptiveLRSGD

SETTINGS = [  # (eps, relative_eps)
    (1e-5, False), (1e-4, False), (1e-3, False), (1e-2, False), (1e-2, True), (1e-1, True),
]


def _den(f):
    return f[4] + f[0] - 2 * f[2]


def measure(model_name: str, eps: float, relative: bool, steps: int = 100, lr: float = 0.1, batch: int = 64,
            delta: float = 1e-6, seed: int = 0) -> dict:
    x, y, _, _ = digits()
    net = MODELS[model_name](seed)
    lossf = nn.CrossEntropyLoss(reduction="none")
    opt = AdaptiveLRSGD(net.parameters(), lr=lr, eps=eps, delta=delta, relative_eps=relative)
    g = torch.Generator().manual_seed(seed)
    noise = dominated = 0
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        lossf(net(xb), yb).mean().backward()
        eta = float(opt.param_groups[0]["lr"])
        h = eps * eta if relative else eps
        net64 = copy.deepcopy(net).double()
        f64 = []
        with torch.no_grad():
            w64 = [p.detach().clone() for p in net64.parameters()]  # not aliases: p moves below
            d64 = [p.grad.double() for p in net.parameters()]
            for j in (-2, -1, 0, 1, 2):
                for p, w, d in zip(net64.parameters(), w64, d64):
                    p.copy_(w - (eta + j * h) * d)
                f64.append(lossf(net64(xb.double()), yb).mean().item())
        opt.step(lambda: lossf(net(xb), yb))
        den32, den64 = _den(opt.last_probe_losses.tolist()), _den(f64)
        noise += abs(den32 - den64) > 0.5 * abs(den64)
        dominated += abs(den64) < delta
    return {"model": model_name, "eps": eps, "relative": relative, "noise": noise / steps,
            "delta_dominated": dominated / steps, "final_eta": float(opt.param_groups[0]["lr"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | spacing h | denominator is noise (float32) | |den| < delta | eta after run |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        for eps, rel in SETTINGS:
            r = measure(name, eps, rel, steps=args.steps)
            spacing = f"{eps:g} * eta" if rel else f"{eps:g}"
            print(f"| {name} | {spacing} | {100 * r['noise']:.0f}% | {100 * r['delta_dominated']:.0f}% | "
                  f"{r['final_eta']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
