"""The PNG of a synthetic set: one row per class, up to ``per_class`` of its images, in display pixels."""
from __future__ import annotations

import torch

from torchopt_ext._atomic import atomic_open
from torchopt_ext.condense.data import to_pixels
from torchopt_ext.condense.types import ImageData, SyntheticSet


def image_grid(syn: SyntheticSet, data: ImageData, path: str, per_class: int = 10, title: str = "") -> str:
    """Write ``path`` (PNG): row c holds the first ``per_class`` images whose hard label is c, unstandardised
    (and un-whitened) to [0, 1]; one channel in grayscale, three as RGB, others by their first channel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hard = syn.hard_labels
    rows = [torch.nonzero(hard == c).flatten()[:per_class] for c in range(data.n_classes)]
    cols = max(1, max(len(r) for r in rows))
    fig, axes = plt.subplots(data.n_classes, cols, figsize=(0.8 * cols + 1.2, 0.8 * data.n_classes + 0.4),
                             squeeze=False)
    for c, idx in enumerate(rows):
        pixels = to_pixels(data, syn.images[idx]) if len(idx) else None
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j == 0:
                ax.set_ylabel(data.classes[c], rotation=0, ha="right", va="center", fontsize=8)
            if pixels is None or j >= len(idx):
                continue
            img = pixels[j]
            if img.shape[0] == 3:
                ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
