"""Train every (task, method, lr, seed) and summarise: final training loss, divergence lr."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from torchopt_ext.compare.tasks import Task
from torchopt_ext.optim import ImplicitSGD

LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 50.0)
# chosen from EB alone, as the paper chose its music grids: a one-epoch EB scan put EB's best at
# 0.01-0.03 and its breakdown at 0.1, and 0.003 adds the slow side of the U
JSB_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
METHODS = ("eb", "ib", "eb-clip")


def task_methods(task: Task) -> tuple:
    """The methods run on ``task``: EB and IB, and EB with clipping when the task sets a threshold."""
    return METHODS if task.clip else METHODS[:2]


def full_loss(task: Task, model, x=None, y=None) -> float:
    """Loss over the whole training set, or over (x, y) when given (inf when not finite)."""
    x, y = (task.x, task.y) if x is None else (x, y)
    with torch.no_grad():
        v = float(task.loss(model(x), y))
    return v if math.isfinite(v) else math.inf


def train(task: Task, method: str, lr: float, seed: int, epochs: int) -> Dict[str, float]:
    """SGD (EB and EB-clip: torch.optim.SGD, IB: ImplicitSGD) for ``epochs`` epochs, batch
    ``task.batch``; EB-clip scales the gradient to norm ``task.clip`` when it is longer.

    Returns the initial and final training loss, and the final loss on each of ``task.held_out``;
    a run whose loss stops being finite ends early with every final loss inf."""
    if method == "eb-clip" and not task.clip:
        raise ValueError(f"train: eb-clip needs a clipping threshold, task {task.name} has none")
    torch.manual_seed(seed)
    model = task.build(method)
    opt = (ImplicitSGD if method == "ib" else torch.optim.SGD)(model.parameters(), lr=lr)
    initial = full_loss(task, model)
    diverged = {"initial": initial, "final": math.inf, **{k: math.inf for k in task.held_out}}
    g = torch.Generator().manual_seed(seed)
    n = task.x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, task.batch):
            idx = perm[i:i + task.batch]
            xb, yb = task.x[idx], task.y[idx]
            if task.lengths is not None:
                # padding after a batch's longest sequence only costs time
                longest = int(task.lengths[idx].max())
                xb, yb = xb[:, :longest], yb[:, :longest]
            opt.zero_grad()
            loss = task.loss(model(xb), yb)
            if not torch.isfinite(loss):
                return diverged
            loss.backward()
            if method == "eb-clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
            opt.step()
    out = {"initial": initial, "final": full_loss(task, model)}
    for name, (x, y) in task.held_out.items():
        out[name] = full_loss(task, model, x, y)
    return out


def _mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    ok = bool(torch.isfinite(t).all())
    return (float(t.mean()) if ok else math.inf), (float(t.std(unbiased=False)) if ok else math.nan)


def summarise(runs: List[dict], lrs: Sequence[float]) -> List[dict]:
    """Per (task, method, lr): mean and std of the final loss over seeds (inf if any seed diverged),
    and likewise ``<name>_mean`` / ``<name>_std`` for each held-out set the runs scored."""
    out = []
    keys = sorted({(r["task"], r["method"]) for r in runs}, key=lambda k: (k[0], METHODS.index(k[1])))
    for task, method in keys:
        for lr in lrs:
            group = [r for r in runs if (r["task"], r["method"], r["lr"]) == (task, method, lr)]
            if not group:
                continue
            finals = [r["final"] for r in group]
            mean, std = _mean_std(finals)
            row = {"task": task, "method": method, "lr": lr, "seeds": len(finals), "mean": mean, "std": std,
                   "diverged_seeds": sum(not math.isfinite(v) for v in finals)}
            for name in [k for k in group[0] if k not in ("task", "method", "lr", "seed", "initial", "final")]:
                row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r[name] for r in group])
            out.append(row)
    return out


def divergence_lr(runs: List[dict], task: str, method: str):
    """Smallest lr at which some seed diverged: final loss not finite or above its initial loss.
    None if no lr in the grid diverged."""
    bad = [r["lr"] for r in runs if r["task"] == task and r["method"] == method
           and not (r["final"] <= r["initial"])]
    return min(bad) if bad else None
