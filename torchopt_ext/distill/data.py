"""Datasets: built-in generators and sklearn tables, or the user's CSV; standardised, split by a seed."""
from dataclasses import dataclass

import numpy as np
import torch

from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.csvread import read_csv


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor   # class indices (long)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list           # original label of each class index
    feature_names: list
    mean: list              # standardisation, from the training part only
    std: list
    train_index: list       # rows of the source table: the recorded split
    test_index: list

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    def record(self) -> dict:
        """What is needed to reproduce the split, stored next to the results."""
        return {"classes": [str(c) for c in self.classes], "feature_names": self.feature_names,
                "mean": self.mean, "std": self.std, "train_index": self.train_index,
                "test_index": self.test_index}


def _builtin(name, n_samples, noise, seed):
    from sklearn import datasets as skd
    if name == "moons":
        return skd.make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    if name == "circles":
        return skd.make_circles(n_samples=n_samples, noise=noise, factor=0.5, random_state=seed)
    if name == "blobs":
        return skd.make_blobs(n_samples=n_samples, centers=3, n_features=2, random_state=seed)
    loader = {"iris": skd.load_iris, "wine": skd.load_wine, "breast_cancer": skd.load_breast_cancer,
              "digits": skd.load_digits}[name]
    return loader(return_X_y=True)


def _class_indices(y):
    # numeric labels sort numerically, others as strings, so class 0/1 keep their meaning
    raw = [str(v) for v in y]
    try:
        classes = sorted(set(raw), key=float)
    except ValueError:
        classes = sorted(set(raw))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.asarray([lookup[v] for v in raw], dtype=np.int64), classes


def load_split(config, dtype=torch.float32) -> Split:
    if config.csv is not None:
        x, y, features = read_csv(config.csv, config.target)
        source = f"--csv {config.csv}"
    else:
        x, y = _builtin(config.dataset, config.n_samples, config.noise, config.seed)
        x = np.asarray(x, dtype=np.float64)
        features = [f"x{i}" for i in range(x.shape[1])]
        source = f"--dataset {config.dataset}"
    y, classes = _class_indices(y)
    if len(classes) < 2:
        raise DistillError(f"{source}: the target has a single class ({classes}); expected at least 2")
    n_test = int(round(len(y) * config.test_fraction))
    if len(y) - n_test < 2 or n_test < 1:
        raise DistillError(f"{source}: {len(y)} rows are too few to split with test fraction "
                           f"{config.test_fraction:.3f}")
    # seeded permutation: the split is a function of --seed and is written to split.json
    perm = np.random.default_rng(config.seed).permutation(len(y))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    n_syn = config.steps * config.per_class * len(classes)
    if len(train_idx) < n_syn:
        raise DistillError(f"{source}: {len(train_idx)} training rows are fewer than the {n_syn} synthetic "
                           f"points requested (--steps {config.steps} x --per-class {config.per_class} x "
                           f"{len(classes)} classes); lower --steps or --per-class")
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0)
    std[std == 0] = 1.0  # constant columns stay constant (zero) instead of dividing by zero
    z = (x - mean) / std

    def t(a, idx):
        return torch.as_tensor(a[idx], dtype=dtype)

    return Split(t(z, train_idx), torch.as_tensor(y[train_idx]), t(z, test_idx), torch.as_tensor(y[test_idx]),
                 classes, features, mean.tolist(), std.tolist(), train_idx.tolist(), test_idx.tolist())
