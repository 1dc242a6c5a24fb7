"""The reference rows of every table: ``random`` and ``herding`` real images per class, and ``whole`` (all of T).

random: ipc training images per class, drawn without replacement with the run's generator.
herding (Welling 2009, as the DC paper's baseline): per class, greedily add the image whose feature vector
brings the running mean of the chosen features closest to the class mean (:func:`herding_select`). The
feature space is ``config.herding_space``: "features" (default) is psi_theta of a randomly initialised
``config.net`` (seeded from the generator; no training, so no labels leak in), "pixels" the standardised
pixels. whole: the whole training part, one-hot labels; ipc is ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torchopt_ext.condense.data import check_ipc
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.nets import net_features, seeded_net
from torchopt_ext.condense.types import ImageData, SyntheticSet


def _subset(data: ImageData, index: torch.Tensor, meta: dict) -> SyntheticSet:
    """The training images at ``index`` with one-hot labels; the indices go into meta."""
    labels = F.one_hot(data.y_train[index], data.n_classes).to(data.x_train.dtype)
    return SyntheticSet(data.x_train[index].clone(), labels, None, dict(meta, train_index=index.tolist()))


def _class_index(data: ImageData, c: int) -> torch.Tensor:
    return torch.nonzero(data.y_train == c).flatten()


@register("random")
def random_images(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False):
    """ipc random training images of each class, class after class."""
    check_ipc(data, ipc)
    index = [idx[torch.randperm(len(idx), generator=generator)[:ipc]]
             for idx in (_class_index(data, c) for c in range(data.n_classes))]
    return _subset(data, torch.cat(index), {"method": "random", "ipc": ipc})


def herding_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """k row indices of ``features`` (n, F), greedily: at step t pick the unchosen row i minimising
    ||mu - (sum of the t-1 chosen + phi_i) / t||, mu the mean of all rows (ties: the lowest index)."""
    phi = features.to(torch.float64)
    mu = phi.mean(0)
    total = torch.zeros_like(mu)
    free = torch.ones(phi.shape[0], dtype=torch.bool)
    chosen = []
    for t in range(1, k + 1):
        dist = ((mu - (total + phi) / t) ** 2).sum(1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total += phi[i]
    return torch.tensor(chosen, dtype=torch.long)


def _feature_map(data: ImageData, config, generator: torch.Generator):
    if getattr(config, "herding_space", "features") == "pixels":
        return lambda x: x.flatten(1)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    net = seeded_net(config.net, data.shape, data.n_classes, seed, getattr(config, "width", 128),
                     getattr(config, "depth", None), data.x_train.dtype).eval()

    def psi(x):
        with torch.no_grad():
            return torch.cat([net_features(net, x[i:i + 1024]) for i in range(0, x.shape[0], 1024)])
    return psi


@register("herding")
def herding(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False):
    """ipc training images per class chosen by :func:`herding_select`, class after class."""
    check_ipc(data, ipc)
    psi = _feature_map(data, config, generator)
    index = []
    for c in range(data.n_classes):
        idx = _class_index(data, c)
        index.append(idx[herding_select(psi(data.x_train[idx]), ipc)])
    return _subset(data, torch.cat(index), {"method": "herding", "ipc": ipc,
                                            "space": getattr(config, "herding_space", "features")})


@register("whole")
def whole(data: ImageData, ipc, config, generator: torch.Generator, progress: bool = False):
    """All training images with one-hot labels (``ipc`` ignored); meta marks it so files need not copy T."""
    labels = F.one_hot(data.y_train, data.n_classes).to(data.x_train.dtype)
    return SyntheticSet(data.x_train, labels, None, {"method": "whole", "ipc": None, "whole": True,
                                                     "n_train": int(data.x_train.shape[0])})
