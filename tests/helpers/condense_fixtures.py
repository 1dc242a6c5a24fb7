"""Small image data and nets for the condensation tests: sklearn digits as 1x8x8 ImageData, tiny modules."""
import torch
from torch import nn

from torchopt_ext.condense.types import ImageData


def digits(dtype=torch.float32, test_fraction=0.2, seed=0) -> ImageData:
    """sklearn's 8x8 digits as (N, 1, 8, 8), standardised with the training part's mean and std."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = float(x[train].mean()), float(x[train].std())
    x = ((x - mean) / std).to(dtype)
    return ImageData("digits", x[train], y[train], x[test], y[test], [str(c) for c in range(10)], [mean], [std],
                     split={"seed": seed, "test_fraction": test_fraction})


class ConvNet(nn.Module):
    """depth x (conv3x3 -> GroupNorm(width, width) -> relu -> avgpool2), then a linear head."""

    def __init__(self, shape, n_classes, width=16, depth=2, norm="group"):
        super().__init__()
        C, H, W = shape
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(C, width, 3, padding=1),
                       nn.GroupNorm(width, width) if norm == "group" else nn.BatchNorm2d(width),
                       nn.ReLU(), nn.AvgPool2d(2)]
            C, H, W = width, H // 2, W // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(C * H * W, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    def __init__(self, shape, n_classes, width=16, depth=2):
        super().__init__()
        d = 1
        for n in shape:
            d *= n
        sizes = [d] + [width] * (depth - 1) + [n_classes]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def make_net(name, shape, n_classes, width=128, depth=None):
    """The same signature as condense.nets.make_net, for tests that run before that module exists."""
    if name == "convnet":
        return ConvNet(shape, n_classes, width, depth or 2)
    if name == "convnet_bn":
        return ConvNet(shape, n_classes, width, depth or 2, norm="batch")
    if name == "mlp":
        return MLP(shape, n_classes, width, depth or 2)
    raise ValueError(f"net: unknown {name!r}")


def tiny_digits(per_class: int = 30) -> ImageData:
    """:func:`digits` with only the first ``per_class`` training images of each class; the test part whole."""
    data = digits()
    keep = torch.cat([torch.nonzero(data.y_train == c).flatten()[:per_class] for c in range(10)])
    data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    return data
