"""Writes the comparison's results.md (table + divergence lr) and loss-vs-lr plot."""
from __future__ import annotations

import math
import os
from typing import List


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


def write_markdown(path: str, summary: List[dict], divergence: dict, config: dict) -> None:
    """results.md: final training loss (mean +- std over seeds) per task, method and lr."""
    lines = ["# EB vs IB: final training loss vs learning rate", "",
             "config: " + ", ".join(f"{k}={v}" for k, v in config.items()), ""]
    for task in dict.fromkeys(r["task"] for r in summary):
        lines += [f"## {task}", "", "| lr | EB mean ± std | IB mean ± std |", "|---:|---:|---:|"]
        rows = [r for r in summary if r["task"] == task]
        for lr in dict.fromkeys(r["lr"] for r in rows):
            cell = {}
            for r in rows:
                if r["lr"] == lr:
                    std = "" if not math.isfinite(r["mean"]) else f" ± {r['std']:.2g}"
                    cell[r["method"]] = _fmt(r["mean"]) + std
            lines.append(f"| {lr:g} | {cell.get('eb', '')} | {cell.get('ib', '')} |")
        lines += ["", "divergence lr (smallest lr where a seed's final loss is not finite or above "
                  "its initial loss): " + ", ".join(
                      f"{m.upper()}: {divergence[(task, m)] if divergence[(task, m)] is not None else 'none in grid'}"
                      for m in ("eb", "ib") if (task, m) in divergence), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, summary: List[dict]) -> None:
    """Final training loss vs lr (log-log), mean ± std band per method; diverged lrs marked x
    above the curves (IB's row slightly higher so both stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary if r["task"] == task]
        finite = [r["mean"] for r in rows if math.isfinite(r["mean"])]
        top = max(finite) * 2 if finite else 1.0
        for method, color, lift in (("eb", "tab:red", 1.0), ("ib", "tab:blue", 1.4)):
            mr = [r for r in rows if r["method"] == method]
            ok = [r for r in mr if math.isfinite(r["mean"])]
            if ok:
                lr = [r["lr"] for r in ok]
                mean = [r["mean"] for r in ok]
                lo = [max(r["mean"] - r["std"], 1e-12) for r in ok]
                hi = [r["mean"] + r["std"] for r in ok]
                ax.plot(lr, mean, "o-", color=color, label=method.upper())
                ax.fill_between(lr, lo, hi, color=color, alpha=0.2)
            bad = [r["lr"] for r in mr if not math.isfinite(r["mean"])]
            if bad:
                ax.plot(bad, [top * lift] * len(bad), "x", color=color, label=f"{method.upper()} diverged")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final training loss")
        ax.set_title(task)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ensure_dir(path: str) -> str:
    """Create ``path`` if needed and return it."""
    os.makedirs(path, exist_ok=True)
    return path
