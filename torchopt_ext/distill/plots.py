"""Figures like the tabular paper's: decision boundaries, synthetic points (Fig. 7), rates (Fig. 8), curves."""
import os

import torch

from torchopt_ext._atomic import atomic_open
from torchopt_ext.distill import models


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: runs on machines without a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    try:
        with atomic_open(path, "wb") as fh:  # a crash mid-write leaves no truncated PNG behind
            fig.savefig(fh, format="png", dpi=100)
    finally:
        _plt().close(fig)


def default_steps(s):
    """The paper's Fig. 7 shows steps 1, 14, 27 and the last."""
    return sorted({k for k in (0, 13, 26, s - 1) if k < s})


def synthetic_points(ds, split, path, steps=None):
    plt = _plt()
    steps = default_steps(ds.steps) if not steps else [k for k in steps if 0 <= k < ds.steps]
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.2), squeeze=False)
    for ax, k in zip(axes[0], steps):
        ax.scatter(split.x_train[:, 0], split.x_train[:, 1], c=split.y_train, s=3, alpha=0.15, cmap="coolwarm")
        ax.scatter(ds.points[k, :, 0], ds.points[k, :, 1], c=ds.labels[k].argmax(-1), s=40, marker="*",
                   edgecolors="k", cmap="coolwarm")
        ax.set_title(f"step {k + 1} (lr {float(ds.lrs[k]):.3g})")
    fig.tight_layout()
    _save(fig, path)


def learned_rates(sets, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    rates = torch.stack([ds.lrs for ds in sets])
    for r in rates:
        ax.plot(r.numpy(), color="0.7", lw=0.7)
    ax.plot(rates.mean(0).numpy(), color="C0", lw=1.5, label=f"mean of {len(sets)} restart(s)")
    ax.set_xlabel("inner step")
    ax.set_ylabel("learned learning rate")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def decision_boundaries(trained, split, ds, path):
    """trained: {title: params of a batch of models}; the first model of each batch is drawn."""
    plt = _plt()
    x = torch.cat([split.x_train, split.x_test])
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 150), torch.linspace(lo[1], hi[1], 150), indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(x.dtype)
    fig, axes = plt.subplots(1, len(trained), figsize=(3.4 * len(trained), 3.2), squeeze=False)
    for ax, (title, params) in zip(axes[0], trained.items()):
        with torch.no_grad():
            pred = models.predict([p[:1] for p in params], grid)[0].reshape(gx.shape)
        ax.contourf(gx, gy, pred, alpha=0.3, cmap="coolwarm")
        ax.scatter(split.x_test[:, 0], split.x_test[:, 1], c=split.y_test, s=3, cmap="coolwarm")
        if ds is not None:
            pts = ds.points.reshape(-1, ds.points.shape[-1])
            ax.scatter(pts[:, 0], pts[:, 1], c=ds.labels.reshape(-1, ds.labels.shape[-1]).argmax(-1), s=12,
                       marker="*", edgecolors="k", linewidths=0.3, cmap="coolwarm")
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def training_curves(result, path):
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (strategy, layers), curve in sorted(result["curves"].items()):
        if not curve:
            continue
        t, acc, loss = zip(*curve)
        lab = f"strategy {strategy}, {layers}-layer"
        # colour = strategy, line style = test architecture: 12 curves stay tellable apart
        style = {"color": f"C{strategy}", "ls": {1: ":", 2: "-", 4: "--"}.get(layers, "-.")}
        a1.plot(t, acc, label=lab, **style)
        a2.plot(t, loss, label=lab, **style)
    a1.set_xlabel("training step")
    a1.set_ylabel("test accuracy")
    a2.set_xlabel("training step")
    a2.set_ylabel("test log loss")
    a2.set_yscale("log")
    a1.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def file_names(n_features):
    """The figures ``all_plots`` writes for data with ``n_features`` features."""
    names = ["learned_rates.png", "training_curves.png"]
    return names + (["synthetic_points.png", "decision_boundaries.png"] if n_features == 2 else [])


def all_plots(sets, split, result, trained, out_dir, steps=None):
    """Writes the figures (``file_names(split.n_features)``) into out_dir; returns their paths."""
    paths = {key: os.path.join(out_dir, name)
             for key, name in zip(("rates", "curves", "points", "boundaries"), file_names(split.n_features))}
    learned_rates(sets, paths["rates"])
    training_curves(result, paths["curves"])
    if "points" in paths:
        synthetic_points(sets[0], split, paths["points"], steps)
        decision_boundaries(trained, split, sets[0], paths["boundaries"])
    return paths
