"""Image sets from files on disk (no download): sklearn digits, MNIST / Fashion-MNIST IDX files, CIFAR-10 pickles.

Every loader returns uint8-or-small-int pixels and labels; :func:`load_images` scales them to [0, 1],
standardises per channel with the training part's mean and std and, with ``zca=True``, whitens them
(docs/CONDENSE.md, "Data").
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Optional

import numpy as np
import torch

from torchopt_ext.condense.config import DATASETS, CondenseError
from torchopt_ext.condense.types import ImageData

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ZCA_REG = 0.1  # added eigenvalue, as a share of the mean eigenvalue (KIP's and MTT's 0.1)


class ImageDataError(CondenseError):
    """Missing, unreadable or corrupt image data, or a bad data option."""


# ---------------------------------------------------------------------------------------------- IDX
def _read_maybe_gz(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImageDataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def read_idx(path: str, magic: int) -> np.ndarray:
    """One IDX file (optionally .gz) as a uint8 array; the magic number and the sizes are checked.

    IDX: a big-endian 32-bit magic 0x000008nn (unsigned bytes, nn dimensions), nn big-endian 32-bit sizes,
    then the bytes.
    """
    raw = _read_maybe_gz(path)
    if len(raw) < 4:
        raise ImageDataError(f"{path}: truncated (only {len(raw)} bytes); expected an IDX file")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ImageDataError(f"{path}: magic number 0x{got:08x}, expected 0x{magic:08x} "
                             f"({'images' if magic == IDX_IMAGES else 'labels'} IDX file)")
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ImageDataError(f"{path}: truncated in the header ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = head + int(np.prod(dims, dtype=np.int64))
    if len(raw) != need:
        what = "truncated" if len(raw) < need else "longer than its header says"
        raise ImageDataError(f"{path}: {what}: {len(raw)} bytes, expected {need} for sizes {dims}")
    return np.frombuffer(bytearray(raw[head:]), dtype=np.uint8).reshape(dims)   # writable, for torch


def _find(root: str, names, dataset: str):
    """The first existing ``root/name`` or ``root/name.gz`` for each name (or torchvision's raw/ layout)."""
    sub = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}.get(dataset, "")
    folders = [root, os.path.join(root, sub, "raw")] if sub else [root]
    found = []
    for name in names:
        for cand in (os.path.join(d, name + ext) for d in folders for ext in ("", ".gz")):
            if os.path.isfile(cand):
                found.append(cand)
                break
        else:
            raise ImageDataError(f"--data-root: {root} has no {name} (or {name}.gz) for --dataset {dataset}; "
                                 f"expected the four IDX files {', '.join(n for p in IDX_FILES.values() for n in p)}")
    return found


def _load_idx_pair(root: str, part: str, dataset: str):
    img_path, lab_path = _find(root, IDX_FILES[part], dataset)
    images = read_idx(img_path, IDX_IMAGES)
    labels = read_idx(lab_path, IDX_LABELS)
    if labels.shape[0] != images.shape[0]:
        raise ImageDataError(f"{lab_path}: {labels.shape[0]} labels for the {images.shape[0]} images of "
                             f"{img_path}; expected one label per image")
    if labels.size and labels.max() > 9:
        raise ImageDataError(f"{lab_path}: label {int(labels.max())}, expected classes 0-9")
    return images[:, None], labels.astype(np.int64)   # (N, 1, H, W)


# ---------------------------------------------------------------------------------------------- CIFAR
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct   # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 python batch and nothing else: a batch is a dict of bytes keys to numpy arrays,
    lists, ints and bytes, so the only globals it may name are numpy's array reconstruction
    (``numpy.core.multiarray._reconstruct`` or ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray``
    and ``numpy.dtype``; any other global (``os.system``, ``builtins.eval``, ...) is refused before it is
    looked up, so a malicious file runs nothing."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def read_cifar_batch(path: str):
    """(images (n, 3, 32, 32) uint8, labels (n,) int64) of one CIFAR-10 python batch, checked."""
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise ImageDataError(f"{path}: cannot read ({exc.strerror})") from None
    except Exception as exc:   # any unpickling failure, including a refused global, is a corrupt file
        raise ImageDataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ImageDataError(f"{path}: expected a dict with b'data' and b'labels', got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ImageDataError(f"{path}: b'data' is {desc}, expected a uint8 array of shape (n, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ImageDataError(f"{path}: b'labels' is not a list of integers") from None
    if labels.shape[0] != data.shape[0]:
        raise ImageDataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ImageDataError(f"{path}: labels outside 0-9")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(root: str):
    folder = root
    if not os.path.isfile(os.path.join(root, CIFAR_TEST)) and os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        folder = os.path.join(root, "cifar-10-batches-py")
    missing = [n for n in CIFAR_TRAIN + (CIFAR_TEST,) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ImageDataError(f"--data-root: {root} lacks {', '.join(missing)} for --dataset cifar10; expected "
                             "data_batch_1..5 and test_batch there or in cifar-10-batches-py/")
    train = [read_cifar_batch(os.path.join(folder, n)) for n in CIFAR_TRAIN]
    test = read_cifar_batch(os.path.join(folder, CIFAR_TEST))
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])), test


# ---------------------------------------------------------------------------------------------- digits
def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """Sorted (train, test) index arrays: in each class a seeded share ``test_fraction`` goes to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1, 8, 8)
    y = np.asarray(y, dtype=np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    split = {"kind": "seeded stratified", "seed": seed, "test_fraction": test_fraction,
             "train_index": train.tolist(), "test_index": test.tolist()}
    return (x[train], y[train]), (x[test], y[test]), split


# ---------------------------------------------------------------------------------------------- pipeline
def zca_fit(x: torch.Tensor, reg: float = ZCA_REG, chunk: int = 8192):
    """(mean (D,), W (D, D)) of ZCA whitening fitted on x (N, D), in float64: with U S U^T the covariance,
    W = U (S + reg * mean(S))^-1/2 U^T and whitened = (x - mean) W (the covariance summed over row chunks)."""
    mean = x.sum(0, dtype=torch.float64) / x.shape[0]
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].to(torch.float64) - mean
        cov += xc.T @ xc
    s, u = torch.linalg.eigh(cov / x.shape[0])
    s = s.clamp_min(0)
    return mean, (u * (s + reg * s.mean()).rsqrt()) @ u.T


def _standardise(x_tr: torch.Tensor, x_te: torch.Tensor):
    """Both parts standardised per channel with the training part's mean and population std (float64 sums)."""
    n = x_tr.shape[0] * x_tr.shape[2] * x_tr.shape[3]
    mean = x_tr.sum((0, 2, 3), dtype=torch.float64) / n
    var = ((x_tr - mean.to(x_tr.dtype)[:, None, None]) ** 2).sum((0, 2, 3), dtype=torch.float64) / n
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))   # a constant channel stays constant, not NaN
    m, s = mean.to(x_tr.dtype)[:, None, None], std.to(x_tr.dtype)[:, None, None]
    return (x_tr - m) / s, (x_te - m) / s, mean.tolist(), std.tolist()


def load_images(name: str, root: Optional[str] = None, seed: int = 0, test_fraction: float = 1 / 3,
                zca: bool = False, dtype: torch.dtype = torch.float32) -> ImageData:
    """Read ``name`` (digits, mnist, fashion_mnist, cifar10) into a standardised :class:`ImageData`.

    digits: scikit-learn's 8x8 digits (1797 images, 1 channel, pixels /16), split by ``seed`` into a
    stratified ``1 - test_fraction`` : ``test_fraction`` (index lists in ``split``). mnist, fashion_mnist:
    the four IDX files in ``root`` (plain or .gz; also ``root/MNIST/raw``, ``root/FashionMNIST/raw``), cifar10:
    ``data_batch_1..5`` and ``test_batch`` in ``root`` or ``root/cifar-10-batches-py``; these use the files' own
    train/test split (``seed`` and ``test_fraction`` unused). Pixels are scaled to [0, 1] (digits /16, the others
    /255), then each channel
    standardised with the training part's mean and std; with ``zca``, ZCA whitening (:func:`zca_fit`,
    regulariser ``ZCA_REG`` times the mean eigenvalue) fitted on the training part is applied to both parts.
    """
    if name not in DATASETS:
        raise ImageDataError(f"--dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    if name == "digits":
        if not 0 < test_fraction < 1:
            raise ImageDataError(f"--test-fraction: expected a number in (0, 1), got {test_fraction!r}")
        (x_tr, y_tr), (x_te, y_te), split = _load_digits(seed, test_fraction)
        class_names = [str(c) for c in range(10)]
        scale = 16.0   # digits' pixels are 0..16
    else:
        if root is None:
            raise ImageDataError(f"--data-root: --dataset {name} reads its files from a folder; none given")
        if not os.path.isdir(root):
            raise ImageDataError(f"--data-root: {root} is not a folder")
        if name == "cifar10":
            (x_tr, y_tr), (x_te, y_te) = _load_cifar(root)
            class_names = list(CIFAR_CLASSES)
        else:
            x_tr, y_tr = _load_idx_pair(root, "train", name)
            x_te, y_te = _load_idx_pair(root, "test", name)
            class_names = list(FASHION_CLASSES) if name == "fashion_mnist" else [str(c) for c in range(10)]
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ImageDataError(f"--data-root: {root}: training images {x_tr.shape[1:]} and test images "
                                 f"{x_te.shape[1:]} differ in shape")
        split = {"kind": "the files' own train/test split"}
        scale = 255.0
    if len(y_tr) == 0 or len(y_te) == 0:
        raise ImageDataError(f"--dataset {name}: the training or the test part is empty")
    present = np.unique(y_tr)
    if not np.isin(y_te, present).all():
        raise ImageDataError(f"--dataset {name}: the test part has classes the training part lacks")
    lookup = np.full(10, -1, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    x_tr, x_te, mean, std = _standardise(torch.as_tensor(x_tr).to(dtype) / scale,
                                         torch.as_tensor(x_te).to(dtype) / scale)
    zca_mean = zca_matrix = None
    if zca:
        zca_mean, zca_matrix = zca_fit(x_tr.flatten(1))
        zca_mean, zca_matrix = zca_mean.to(dtype), zca_matrix.to(dtype)
        x_tr = ((x_tr.flatten(1) - zca_mean) @ zca_matrix).reshape(x_tr.shape)
        x_te = ((x_te.flatten(1) - zca_mean) @ zca_matrix).reshape(x_te.shape)
    return ImageData(name, x_tr, torch.as_tensor(lookup[y_tr]), x_te, torch.as_tensor(lookup[y_te]),
                     [class_names[c] for c in present], mean, std, zca, split,
                     zca_mean=zca_mean, zca_matrix=zca_matrix)


def to_pixels(data: ImageData, images: torch.Tensor) -> torch.Tensor:
    """Standardised (and whitened) images (N, C, H, W) back to display pixels in [0, 1]."""
    x = images.detach().to(torch.float64)
    if data.zca_matrix is not None:
        w = data.zca_matrix.to(torch.float64)
        x = (torch.linalg.solve(w, x.flatten(1).T).T + data.zca_mean.to(torch.float64)).reshape(x.shape)
    mean = torch.tensor(data.mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(data.std, dtype=torch.float64)[:, None, None]
    return (x * std + mean).clamp(0, 1)


def check_ipc(data: ImageData, ipc: int) -> None:
    """An error naming --ipc when a class has fewer than ``ipc`` training images."""
    counts = torch.bincount(data.y_train, minlength=data.n_classes)
    c = int(counts.argmin())
    if not isinstance(ipc, int) or ipc < 1 or ipc > int(counts[c]):
        raise CondenseError(f"--ipc: expected images per class between 1 and {int(counts[c])} (class "
                            f"{data.classes[c]!r} of --dataset {data.name} has {int(counts[c])} training images), "
                            f"got {ipc!r}")
