"""Writes the comparison's results.md (table + divergence lr) and loss-vs-lr plot."""
from __future__ import annotations

import math
import os
from typing import List, Optional


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


LABELS = {"eb": "EB", "ib": "IB", "eb-clip": "EB-clip"}
STYLE = {"eb": ("tab:red", 1.0), "ib": ("tab:blue", 1.4), "eb-clip": ("tab:orange", 1.96)}


def _table(rows: List[dict], methods: List[str], key: str, labels: dict) -> List[str]:
    lines = ["| lr | " + " | ".join(f"{labels[m]} mean ± std" for m in methods) + " |",
             "|---:|" + "---:|" * len(methods)]
    for lr in dict.fromkeys(r["lr"] for r in rows):
        cell = {}
        for r in rows:
            if r["lr"] == lr:
                mean, std = r[f"{key}mean"], r[f"{key}std"]
                cell[r["method"]] = _fmt(mean) + ("" if not math.isfinite(mean) else f" ± {std:.2g}")
        lines.append(f"| {lr:g} | " + " | ".join(cell.get(m, "") for m in methods) + " |")
    return lines


def write_markdown(path: str, summary: List[dict], divergence: dict, config: dict,
                   tasks_config: Optional[dict] = None) -> None:
    """results.md: final training loss (mean +- std over seeds) per task, method and lr, then the
    same for each held-out set a task scored."""
    lines = ["# EB vs IB: final training loss vs learning rate", "",
             "config: " + ", ".join(f"{k}={v}" for k, v in config.items()), ""]
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = [r for r in summary if r["task"] == task]
        methods = [m for m in LABELS if any(r["method"] == m for r in rows)]
        tcfg = (tasks_config or {}).get(task, {})
        labels = dict(LABELS)
        if tcfg.get("clip"):
            labels["eb-clip"] = f"EB-clip ({tcfg['clip']:g})"
        lines += [f"## {task}", ""]
        if tcfg:
            lines += ["task config: " + ", ".join(f"{k}={v}" for k, v in tcfg.items() if k != "lrs"), ""]
        lines += _table(rows, methods, "", labels)
        lines += ["", "divergence lr (smallest lr where a seed's final loss is not finite or above "
                  "its initial loss): " + ", ".join(
                      f"{labels[m]}: {divergence[(task, m)] if divergence[(task, m)] is not None else 'none in grid'}"
                      for m in methods if (task, m) in divergence), ""]
        for name in [k[:-5] for k in rows[0] if k.endswith("_mean")]:
            lines += [f"{name} loss after training:", ""] + _table(rows, methods, f"{name}_", labels) + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, summary: List[dict], tasks_config: Optional[dict] = None) -> None:
    """Final training loss vs lr (log-log), mean ± std band per method; diverged lrs marked x
    above the curves (one row per method, so all stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary if r["task"] == task]
        clip = (tasks_config or {}).get(task, {}).get("clip")
        labels = {**LABELS, "eb-clip": f"EB-clip ({clip:g})"} if clip else LABELS
        finite = [r["mean"] for r in rows if math.isfinite(r["mean"])]
        top = max(finite) * 2 if finite else 1.0
        for method, (color, lift) in STYLE.items():
            mr = [r for r in rows if r["method"] == method]
            if not mr:
                continue
            ok = [r for r in mr if math.isfinite(r["mean"])]
            if ok:
                lr = [r["lr"] for r in ok]
                mean = [r["mean"] for r in ok]
                lo = [max(r["mean"] - r["std"], 1e-12) for r in ok]
                hi = [r["mean"] + r["std"] for r in ok]
                ax.plot(lr, mean, "o-", color=color, label=labels[method])
                ax.fill_between(lr, lo, hi, color=color, alpha=0.2)
            bad = [r["lr"] for r in mr if not math.isfinite(r["mean"])]
            if bad:
                ax.plot(bad, [top * lift] * len(bad), "x", color=color, label=f"{labels[method]} diverged")
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
