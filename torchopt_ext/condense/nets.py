"""The field's networks for image condensation: ConvNet (instance norm), ConvNet-BN, MLP, LeNet.

Each net is ``head(features(x))``: ``features`` maps (N, C, H, W) images to (N, F) vectors (psi_theta of
docs/design.md#condensation-methods), ``head`` is one Linear to the class logits. No module changes a
parameter in place, so ``torch.func.functional_call(net, params, x)`` works (with batch norm: also with
buffers, in train mode).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from torchopt_ext.condense.config import CondenseError

NETS = ("convnet", "convnet_bn", "mlp", "lenet")
LENET_MIN = 4   # smallest side LeNet takes: two 2x2 poolings must leave at least one pixel


class ImageNet(nn.Module):
    """``head(features(x))``; ``features`` ends in a flatten."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def default_depth(shape: Sequence[int]) -> int:
    """ConvNet blocks for (C, H, W) images: min(3, floor(log2(min(H, W))) - 1), so 8x8 -> 2, 28 or 32 -> 3."""
    return min(3, int(math.floor(math.log2(min(shape[1], shape[2])))) - 1)


def _check_shape(name, shape, arg):
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise CondenseError(f"{arg} {name}: expected images of shape (C, H, W), got {tuple(shape)}")


def _convnet(shape, n_classes, width, depth, batch_norm, arg):
    name = "convnet_bn" if batch_norm else "convnet"
    c, h, w = shape
    if depth is None:
        depth = default_depth(shape)
    if depth < 1 or min(h, w) < 2 ** depth:
        raise CondenseError(f"{arg} {name}: images of shape {tuple(shape)} are too small for {max(depth, 1)} "
                            f"conv blocks (each halves the side; need H, W >= {2 ** max(depth, 1)})")
    layers = []
    for _ in range(depth):
        norm = nn.BatchNorm2d(width) if batch_norm else nn.GroupNorm(width, width, affine=True)  # instance norm
        layers += [nn.Conv2d(c, width, 3, padding=1), norm, nn.ReLU(), nn.AvgPool2d(2)]
        c, h, w = width, h // 2, w // 2
    return ImageNet(nn.Sequential(*layers, nn.Flatten()), nn.Linear(width * h * w, n_classes))


def _mlp(shape, n_classes, width, depth):
    d = shape[0] * shape[1] * shape[2]
    layers = [nn.Flatten()]
    for _ in range(2 if depth is None else depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return ImageNet(nn.Sequential(*layers), nn.Linear(d, n_classes))


def _lenet(shape, n_classes, arg):
    c, h, w = shape
    if min(h, w) < LENET_MIN:
        raise CondenseError(f"{arg} lenet: images of shape {tuple(shape)} are too small; expected H, W >= "
                            f"{LENET_MIN}")
    # LeNet-5 takes 32x32 unpadded; smaller images are padded by 2 (MNIST's 28 -> 32, as in the paper)
    pad1 = 0 if min(h, w) >= 32 else 2
    h1, w1 = (h + 2 * pad1 - 4) // 2, (w + 2 * pad1 - 4) // 2
    # the classic 5x5 valid conv where the map allows (>= 10: 28/32 -> 5x5), else 'same' (8x8 -> 2x2)
    pad2 = 0 if min(h1, w1) >= 10 else 2
    h2, w2 = (h1 + 2 * pad2 - 4) // 2, (w1 + 2 * pad2 - 4) // 2
    features = nn.Sequential(nn.Conv2d(c, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(16 * h2 * w2, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    return ImageNet(features, nn.Linear(84, n_classes))


def make_net(name: str, shape: Sequence[int], n_classes: int, width: int = 128, depth: Optional[int] = None,
             arg: str = "--net") -> ImageNet:
    """A freshly initialised net (torch's default init, from the global random stream) for (C, H, W) images.

    convnet: ``depth`` blocks of [conv3x3 pad 1 (width) -> instance norm (GroupNorm(width, width), affine)
    -> relu -> avgpool 2x2], flatten, linear head; depth default :func:`default_depth`. convnet_bn: the same
    with BatchNorm2d. mlp: flatten, ``depth`` (default 2) hidden layers of ``width`` relu units, linear head.
    lenet: conv5x5 (6) -> relu -> maxpool2 -> conv5x5 (16) -> relu -> maxpool2 -> fc 120 -> relu -> fc 84
    -> relu, linear head; padding as in :func:`_lenet`; ``width`` and ``depth`` do not apply.
    Errors name ``arg``, the option that chose the net (``--net`` or ``--eval-nets``).
    """
    if name not in NETS:
        raise CondenseError(f"{arg}: expected one of {', '.join(NETS)}, got {name!r}")
    shape = tuple(int(s) for s in shape)
    _check_shape(name, shape, arg)
    if name in ("convnet", "convnet_bn"):
        return _convnet(shape, n_classes, width, depth, name == "convnet_bn", arg)
    if name == "mlp":
        return _mlp(shape, n_classes, width, depth)
    return _lenet(shape, n_classes, arg)


def seeded_net(name: str, shape: Sequence[int], n_classes: int, seed: int, width: int = 128,
               depth: Optional[int] = None, dtype: torch.dtype = torch.float32) -> ImageNet:
    """:func:`make_net` initialised from ``seed`` without touching the global random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_net(name, shape, n_classes, width, depth).to(dtype)


def net_features(net: ImageNet, x: torch.Tensor) -> torch.Tensor:
    """psi_theta(x): the net without its head, (N, C, H, W) -> (N, F)."""
    return net.features(x)
