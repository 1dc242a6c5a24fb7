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
    c_in, h, w = data.shape
    channels = 3 if c_in == 3 else 1
    # one mosaic with a 1-pixel white gap between images: one imshow instead of a grid of axes
    mosaic = torch.ones(data.n_classes * (h + 1) - 1, cols * (w + 1) - 1, channels, dtype=torch.float64)
    for c, idx in enumerate(rows):
        if len(idx):
            pixels = to_pixels(data, syn.images[idx])[:, :channels].permute(0, 2, 3, 1)
            for j in range(len(idx)):
                mosaic[c * (h + 1):c * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = pixels[j]
    fig, ax = plt.subplots(figsize=(0.5 * cols + 1.2, 0.5 * data.n_classes + 0.4))
    if channels == 3:
        ax.imshow(mosaic.numpy(), interpolation="nearest")
    else:
        ax.imshow(mosaic[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([c * (h + 1) + (h - 1) / 2 for c in range(data.n_classes)], data.classes, fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
