"""The two values every condensation method passes along: the real data and the synthetic set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ImageData:
    """A labelled image set, split into a training and a test part, standardised per channel.

    x_*: (N, C, H, W) floating tensors, standardised with the training part's per-channel mean and std
    (then ZCA-whitened when ``zca`` is set); y_*: (N,) class indices (int64).
    """
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list                 # original label of each class index, as strings
    mean: list                    # per channel, from the training part
    std: list
    zca: bool = False
    split: dict = field(default_factory=dict)   # how the split was made (indices or "the files' own split")
    zca_mean: Optional[torch.Tensor] = None     # (C*H*W,) and (C*H*W, C*H*W) when zca: whitened = (x - mean) W
    zca_matrix: Optional[torch.Tensor] = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])

    def class_part(self, c: int) -> torch.Tensor:
        """T_c: the training images of class c."""
        return self.x_train[self.y_train == c]

    def record(self) -> dict:
        """What reproduces the data, written next to results (finite numbers only)."""
        return {"name": self.name, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std), "zca": self.zca, "shape": list(self.shape),
                "n_train": int(self.x_train.shape[0]), "n_test": int(self.x_test.shape[0]), "split": self.split}


@dataclass
class SyntheticSet:
    """What a method returns: S = {(x~_i, y~_i)}, optionally with learned step sizes.

    images: (M, C, H, W) in the same standardised space as ImageData.x_train;
    labels: (M, K) target probabilities (one-hot for hard labels, any rows summing to 1 for soft ones);
    lrs: learned learning rates of the inner steps when the method learns them (DD: one per inner step,
    MTT: one), else None; meta: the method's name, ipc and settings, losses, wall time.
    """
    images: torch.Tensor
    labels: torch.Tensor
    lrs: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def hard_labels(self) -> torch.Tensor:
        return self.labels.argmax(-1)

    def to_state(self) -> dict:
        """Tensors and plain values only: loadable with torch.load(weights_only=True)."""
        return {"images": self.images, "labels": self.labels, "lrs": self.lrs, "meta": dict(self.meta)}

    @classmethod
    def from_state(cls, state: dict) -> "SyntheticSet":
        return cls(state["images"], state["labels"], state.get("lrs"), dict(state.get("meta", {})))
