"""Datasets: built-in generators and sklearn tables, or the user's CSV; standardised, split by a seed."""
from dataclasses import dataclass

import numpy as np
import torch

from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.csvread import read_csv

STATS_BLOCK_BYTES = 1 << 23  # the training statistics copy this much of the table at a time


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
    mean, std = _train_stats(x, train_idx)
    z = _standardised(x, mean, std, features, source, dtype)
    del x  # the float64 table; only the run's dtype is kept
    train, test = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Split(z[train], torch.as_tensor(y[train_idx]), z[test], torch.as_tensor(y[test_idx]),
                 classes, features, mean.tolist(), std.tolist(), train_idx.tolist(), test_idx.tolist())


def _train_stats(x, train_idx):
    """Mean and (population) standard deviation (d,) of the rows train_idx of x (n, d) float64, finite for every
    finite x; a constant column gets its value and std 1, so that it standardises to exactly zero."""
    mean, std = np.empty(x.shape[1]), np.empty(x.shape[1])
    step = max(1, STATS_BLOCK_BYTES // (8 * len(train_idx)))  # columns per block
    for j in range(0, x.shape[1], step):
        mean[j:j + step], std[j:j + step] = _block_stats(x[train_idx, j:j + step])
    return mean, std


def _block_stats(xt):
    """_train_stats of the columns of xt (m, k), which it overwrites."""
    lo, hi = xt.min(0), xt.max(0)
    # scaling each column by a power of two is exact and keeps squares of values near 1e300 finite
    _, e = np.frexp(np.maximum(np.abs(lo), np.abs(hi)))
    np.ldexp(xt, -e, out=xt)
    mean = xt.mean(0)
    xt -= mean
    std = np.sqrt(np.square(xt, out=xt).mean(0))
    mean, std = np.ldexp(mean, e), np.ldexp(std, e)
    const = lo == hi
    mean[const], std[const] = lo[const], 1.0
    return mean, std


def _standardised(x, mean, std, features, source, dtype):
    """(x - mean) / std as a tensor of dtype (x is overwritten); refuses a column whose values do not fit dtype."""
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    if bad.any():  # split.json must hold finite numbers only
        raise DistillError(f"{source}: column {features[int(bad.nonzero()[0][0])]!r} has a mean or standard "
                           "deviation beyond float64 over the training rows; expected values that can be "
                           "standardised (rescale the column)")
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x -= mean
        x /= std
    z = torch.from_numpy(x).to(dtype)
    bad = ~np.isfinite(z.numpy()).all(0)  # numpy's test needs no temporaries the size of the table
    if bad.any():
        j = int(bad.nonzero()[0][0])
        worst = float(np.nanmax(np.abs(x[:, j])))
        raise DistillError(f"{source}: column {features[j]!r} does not fit {str(dtype).replace('torch.', '')} "
                           f"once standardised: a row lies {worst:.3g} training standard deviations from the "
                           "training mean; expected values within range (rescale or clip the column, or run "
                           "with --dtype float64)")
    return z
