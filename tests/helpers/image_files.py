"""Tiny image files in the formats the condense pipeline reads: IDX (plain or .gz) and CIFAR-10 pickles."""
import gzip
import os
import pickle

import numpy as np


def idx_bytes(arr: np.ndarray, magic=None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def write_idx_set(root, n_train=12, n_test=6, side=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    parts = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        y = (np.arange(n) % 3).astype(np.uint8)
        parts[part] = (x, y)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            path = os.path.join(root, f"{part}-{kind}")
            if gz:
                with gzip.open(path + ".gz", "wb") as fh:
                    fh.write(idx_bytes(arr))
            else:
                with open(path, "wb") as fh:
                    fh.write(idx_bytes(arr))
    return parts


def cifar_batch(n, seed=0, override=None):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"tiny", b"labels": [int(v) for v in np.arange(n) % 10],
             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"filenames": [f"im{i}.png".encode() for i in range(n)]}
    batch.update(override or {})
    return batch


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes as Python 2 str opcodes (BINSTRING), as CIFAR's own cPickle files are written."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little"))
                   + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def dump(obj, fh, protocol):
    """protocol "py2": the Python 2 layout of the real files; an int: Python 3's pickle of that protocol."""
    if protocol == "py2":
        _Py2Pickler(fh, protocol=2).dump(obj)
    else:
        pickle.dump(obj, fh, protocol=protocol)


def write_cifar(folder, n=10, protocol="py2"):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(os.path.join(folder, name), "wb") as fh:
            dump(cifar_batch(n, seed=i), fh, protocol)
