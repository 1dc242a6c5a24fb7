"""The paper's experiments on built-in data: adaptive (five-probe Newton) vs plain SGD.

Logistic regression and a small MLP on sklearn's digits, from initial learning rates 1e-4 ... 1;
plots of training loss and of eta vs iteration, and ``results.md``: the eta each run settles at
(the paper: it reaches the same zone whatever the start). Entry point: ``run(out_dir, seeds, tiny)``.
"""
from __future__ import annotations

import os
import statistics
from typing import Dict, List

import torch
from torch import nn

from torchopt_ext.compare.data import MODELS, digits
from torchopt_ext.optim import AdaptiveLRSGD

LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _train(model_name: str, lr0: float, seed: int, adaptive: bool, iters: int, batch: int, data) -> dict:
    x, y, xt, yt = data
    net = MODELS[model_name](seed)
    lossf = nn.CrossEntropyLoss(reduction="none")
    opt = AdaptiveLRSGD(net.parameters(), lr=lr0) if adaptive else torch.optim.SGD(net.parameters(), lr=lr0)
    g = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    etas: List[float] = []
    for _ in range(iters):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        etas.append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad()
        loss = lossf(net(xb), yb).mean()
        loss.backward()
        losses.append(loss.item())
        if adaptive:
            opt.step(lambda: lossf(net(xb), yb))
        else:
            opt.step()
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).double().mean().item()
    tail = etas[-max(1, iters // 5):]  # the zone it settles in: median over the last fifth
    return {"loss": losses, "eta": etas, "settled_eta": statistics.median(tail), "test_acc": acc,
            "final_loss": statistics.mean(losses[-max(1, iters // 10):])}


def _plot(results: dict, model_name: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for k, lr0 in enumerate(LRS):
        color = f"C{k}"
        for kind, style in (("adaptive", "-"), ("sgd", "--")):
            run = results[model_name][kind][lr0][0]
            ax_l.plot(run["loss"], style, color=color, lw=1, label=f"{kind} lr0={lr0:g}")
        ax_e.plot(results[model_name]["adaptive"][lr0][0]["eta"], color=color, label=f"lr0={lr0:g}")
    ax_l.set(yscale="log", xlabel="iteration", ylabel="training loss (batch)", title=f"{model_name}: loss")
    ax_e.set(yscale="log", xlabel="iteration", ylabel="eta", title=f"{model_name}: adaptive eta")
    ax_l.legend(fontsize=6, ncol=2)
    ax_e.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict) -> str:
    lines = ["| model | initial lr | settled eta (median of last 20%, mean ± std over seeds) | final train loss "
             "adaptive | final train loss SGD | test acc adaptive | test acc SGD |", "|---|---|---|---|---|---|---|"]

    def ms(v):
        return f"{statistics.mean(v):.3g} ± {statistics.pstdev(v):.2g}" if len(v) > 1 else f"{v[0]:.3g}"

    for name, per in results.items():
        for lr0 in LRS:
            a, s = per["adaptive"][lr0], per["sgd"][lr0]
            lines.append(f"| {name} | {lr0:g} | {ms([r['settled_eta'] for r in a])} | "
                         f"{ms([r['final_loss'] for r in a])} | {ms([r['final_loss'] for r in s])} | "
                         f"{ms([r['test_acc'] for r in a])} | {ms([r['test_acc'] for r in s])} |")
    return "\n".join(lines) + "\n"


def run(out_dir: str, seeds: int = 3, tiny: bool = False) -> Dict:
    """Runs both models x 5 initial learning rates x ``seeds`` for adaptive and plain SGD.

    Writes ``loss_eta_<model>.png`` and ``results.md`` into ``out_dir``; returns
    ``{"results": {model: {"adaptive"|"sgd": {lr0: [per-seed dict]}}}, "table": str, "files": [...]}``.
    ``tiny=True``: 20 iterations, one seed (a smoke run for tests).
    """
    if seeds < 1:
        raise ValueError(f"run: seeds must be >= 1, got {seeds}")
    os.makedirs(out_dir, exist_ok=True)
    iters, seeds = (20, 1) if tiny else (300, seeds)
    data = digits()
    results: Dict = {}
    for name in MODELS:
        results[name] = {kind: {lr0: [_train(name, lr0, s, kind == "adaptive", iters, 64, data) for s in range(seeds)]
                                for lr0 in LRS} for kind in ("adaptive", "sgd")}
    files = []
    for name in MODELS:
        path = os.path.join(out_dir, f"loss_eta_{name}.png")
        _plot(results, name, path)
        files.append(path)
    table = _table(results)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as fh:
        fh.write(f"# Five-probe adaptive LR vs SGD on digits ({iters} iterations, batch 64, {seeds} seed(s))\n\n")
        fh.write(table)
    files.append(md)
    return {"results": results, "table": table, "files": files}
