"""Train every (task, method, lr, seed) and summarise: final training loss, divergence lr."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from torchopt_ext.compare.tasks import Task
from torchopt_ext.optim import ImplicitSGD

LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 50.0)
METHODS = ("eb", "ib")


def full_loss(task: Task, model) -> float:
    """Training loss over the whole training set (inf when not finite)."""
    with torch.no_grad():
        v = float(task.loss(model(task.x), task.y))
    return v if math.isfinite(v) else math.inf


def train(task: Task, method: str, lr: float, seed: int, epochs: int) -> Dict[str, float]:
    """SGD (EB: torch.optim.SGD, IB: ImplicitSGD) for ``epochs`` epochs, batch ``task.batch``.

    Returns the initial and final training loss; a run whose loss stops being finite ends early
    with final loss inf."""
    torch.manual_seed(seed)
    model = task.build(method)
    opt = (ImplicitSGD if method == "ib" else torch.optim.SGD)(model.parameters(), lr=lr)
    initial = full_loss(task, model)
    g = torch.Generator().manual_seed(seed)
    n = task.x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, task.batch):
            idx = perm[i:i + task.batch]
            opt.zero_grad()
            loss = task.loss(model(task.x[idx]), task.y[idx])
            if not torch.isfinite(loss):
                return {"initial": initial, "final": math.inf}
            loss.backward()
            opt.step()
    return {"initial": initial, "final": full_loss(task, model)}


def summarise(runs: List[dict], lrs: Sequence[float]) -> List[dict]:
    """Per (task, method, lr): mean and std of the final loss over seeds (inf if any seed diverged)."""
    out = []
    keys = sorted({(r["task"], r["method"]) for r in runs}, key=lambda k: (k[0], METHODS.index(k[1])))
    for task, method in keys:
        for lr in lrs:
            finals = [r["final"] for r in runs if (r["task"], r["method"], r["lr"]) == (task, method, lr)]
            if not finals:
                continue
            t = torch.tensor(finals, dtype=torch.float64)
            ok = bool(torch.isfinite(t).all())
            out.append({
                "task": task, "method": method, "lr": lr, "seeds": len(finals),
                "mean": float(t.mean()) if ok else math.inf,
                "std": float(t.std(unbiased=False)) if ok else math.nan,
                "diverged_seeds": int((~torch.isfinite(t)).sum()),
            })
    return out


def divergence_lr(runs: List[dict], task: str, method: str):
    """Smallest lr at which some seed diverged: final loss not finite or above its initial loss.
    None if no lr in the grid diverged."""
    bad = [r["lr"] for r in runs if r["task"] == task and r["method"] == method
           and not (r["final"] <= r["initial"])]
    return min(bad) if bad else None
