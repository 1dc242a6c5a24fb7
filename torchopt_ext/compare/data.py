"""Built-in data and models for the adaptive-LR experiments: sklearn's digits (8x8 images, 10 classes)."""
from __future__ import annotations

import torch
from torch import nn


def digits(dtype=torch.float32):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a fixed 2:1 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = (2 * len(y)) // 3
    return x[:cut], y[:cut], x[cut:], y[cut:]


def logistic(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


def mlp(seed: int, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


MODELS = {"logistic": logistic, "mlp": mlp}
