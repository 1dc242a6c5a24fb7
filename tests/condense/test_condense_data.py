"""Image data: digits split, IDX and CIFAR readers on tiny files (good, gz, truncated, malicious), ZCA, errors."""
import os

import numpy as np
import pytest
import torch

from torchopt_ext.condense.config import CondenseError
from torchopt_ext.condense.data import (ImageDataError, check_ipc, load_images, read_cifar_batch, read_idx,
                                        to_pixels, zca_fit)
from torchopt_ext.distill.config import DistillError

from tests.helpers.image_files import cifar_batch, dump, idx_bytes, write_cifar, write_idx_set


# ------------------------------------------------------------------------------------------ digits
def test_digits_split_is_seeded_stratified_and_recorded():
    d = load_images("digits")
    assert d.shape == (1, 8, 8) and d.n_classes == 10 and d.classes == [str(c) for c in range(10)]
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797 and d.x_test.shape[0] == 599
    tr, te = d.split["train_index"], d.split["test_index"]
    assert sorted(tr + te) == list(range(1797)) and not set(tr) & set(te)
    counts_tr, counts_te = torch.bincount(d.y_train), torch.bincount(d.y_test)
    assert ((counts_te.double() / (counts_tr + counts_te) - 1 / 3).abs() < 0.01).all()   # stratified
    assert load_images("digits", seed=1).split["test_index"] != te
    assert load_images("digits").split["test_index"] == te


def test_digits_standardised_with_training_statistics():
    from sklearn.datasets import load_digits
    d = load_images("digits", dtype=torch.float64)
    raw = torch.as_tensor(load_digits().data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16
    x_tr = raw[d.split["train_index"]]
    assert d.mean[0] == pytest.approx(float(x_tr.mean()), rel=1e-12)
    assert d.std[0] == pytest.approx(float(x_tr.std(unbiased=False)), rel=1e-12)
    torch.testing.assert_close(d.x_train, (x_tr - d.mean[0]) / d.std[0])
    torch.testing.assert_close(d.x_test, (raw[d.split["test_index"]] - d.mean[0]) / d.std[0])
    torch.testing.assert_close(to_pixels(d, d.x_test), raw[d.split["test_index"]])
    assert d.y_train.dtype == torch.int64 and d.x_train.dtype == torch.float64


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_load_with_their_own_split(tmp_path, gz, name):
    parts = write_idx_set(str(tmp_path), gz=gz)
    d = load_images(name, root=str(tmp_path), dtype=torch.float64)
    x = torch.as_tensor(parts["train"][0], dtype=torch.float64)[:, None] / 255
    assert d.shape == (1, 4, 4) and d.x_train.shape[0] == 12 and d.x_test.shape[0] == 6
    torch.testing.assert_close(d.x_train, (x - x.mean()) / x.std(unbiased=False))
    assert d.y_train.tolist() == (np.arange(12) % 3).tolist()
    assert d.n_classes == 3   # only the classes present
    assert d.classes == (["0", "1", "2"] if name == "mnist" else ["T-shirt/top", "Trouser", "Pullover"])
    assert "own" in d.split["kind"]


def test_idx_reader_checks_magic_sizes_and_counts(tmp_path):
    p = tmp_path / "a"
    arr = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    p.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(str(p), 0x803), arr)
    with pytest.raises(ImageDataError, match=r"magic number 0x00000803, expected 0x00000801"):
        read_idx(str(p), 0x801)
    p.write_bytes(idx_bytes(arr)[:-5])
    with pytest.raises(ImageDataError, match=rf"{p}: truncated: .* expected 1584"):
        read_idx(str(p), 0x803)
    p.write_bytes(idx_bytes(arr) + b"\0")
    with pytest.raises(ImageDataError, match="longer than its header"):
        read_idx(str(p), 0x803)
    p.write_bytes(b"\0\0")
    with pytest.raises(ImageDataError, match="truncated"):
        read_idx(str(p), 0x803)


def test_truncated_gz_and_bad_files_are_errors_naming_the_file(tmp_path):
    root = str(tmp_path)
    write_idx_set(root, gz=True)
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    with open(path, "rb") as fh:
        blob = fh.read()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    with pytest.raises(ImageDataError, match="train-images-idx3-ubyte.gz"):
        load_images("mnist", root=root)


def test_label_count_mismatch_and_missing_file(tmp_path):
    root = str(tmp_path)
    write_idx_set(root)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(ImageDataError, match="5 labels for the 6 images"):
        load_images("mnist", root=root)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ImageDataError, match="--data-root: .* no t10k-labels-idx1-ubyte"):
        load_images("mnist", root=root)


def test_torchvision_raw_layout_is_found(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_set(str(raw))
    assert load_images("fashion_mnist", root=str(tmp_path)).x_train.shape == (12, 1, 4, 4)


# ------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("nested,protocol", [(False, "py2"), (True, "py2"), (False, 4)])
def test_cifar_batches_load(tmp_path, nested, protocol):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    write_cifar(str(folder), protocol=protocol)
    d = load_images("cifar10", root=str(tmp_path), dtype=torch.float64)
    assert d.shape == (3, 32, 32) and d.x_train.shape[0] == 50 and d.x_test.shape[0] == 10 and d.n_classes == 10
    assert d.classes[0] == "airplane" and len(d.mean) == 3
    # channel-major rows: the first 1024 bytes are red (CIFAR's layout), standardised per channel
    raw = torch.as_tensor(cifar_batch(10, seed=0)[b"data"], dtype=torch.float64).reshape(10, 3, 32, 32) / 255
    torch.testing.assert_close(to_pixels(d, d.x_train[:10]), raw)
    torch.testing.assert_close(d.x_train.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_cifar_wrong_shape_and_labels(tmp_path):
    p = tmp_path / "b"
    for override, match in [({b"data": np.zeros((4, 3000), np.uint8)}, r"shape \(n, 3072\)"),
                            ({b"data": np.zeros((4, 3072), np.float32)}, "uint8"),
                            ({b"labels": [0, 1]}, "2 labels for 4 images"),
                            ({b"labels": [0, 1, 2, 11]}, "outside 0-9")]:
        batch = cifar_batch(4, override=override)
        with open(p, "wb") as fh:
            dump(batch, fh, "py2")
        with pytest.raises(ImageDataError, match=match):
            read_cifar_batch(str(p))
    with open(p, "wb") as fh:
        dump([1, 2], fh, "py2")
    with pytest.raises(ImageDataError, match="expected a dict"):
        read_cifar_batch(str(p))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", ["py2", 2, 4])
def test_cifar_pickle_with_a_malicious_global_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "ran"
    p = tmp_path / "data_batch_1"
    with open(p, "wb") as fh:
        dump(cifar_batch(2, override={b"labels": _Evil(str(marker))}), fh, protocol)
    # Python 3's protocol 2 writes bytes through _codecs.encode, refused first (CIFAR's files do not need it)
    name = r"_codecs\.encode" if protocol == 2 else r"(posix|os|nt)\.system"
    with pytest.raises(ImageDataError, match=rf"not a CIFAR-10 python batch .*global {name} is not allowed"):
        read_cifar_batch(str(p))
    assert not marker.exists()
    with open(p, "wb") as fh:   # builtins are refused too
        dump(cifar_batch(2, override={b"labels": eval}), fh, protocol)
    with pytest.raises(ImageDataError, match=r"(__builtin__|builtins|_codecs)\.(eval|encode) is not allowed"):
        read_cifar_batch(str(p))


def test_cifar_missing_batches(tmp_path):
    write_cifar(str(tmp_path))
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(ImageDataError, match="--data-root: .* lacks data_batch_3"):
        load_images("cifar10", root=str(tmp_path))


# ------------------------------------------------------------------------------------------ ZCA
def test_zca_matches_the_kip_formula_and_whitens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    mean, w = zca_fit(x, reg=0.0)
    xc = (x - mean)
    torch.testing.assert_close(((xc @ w).T @ (xc @ w)) / 200, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(w, w.T)
    # KIP's recipe: svd of cov + reg * tr(cov)/D * I, W = U diag(s^-1/2) U^T
    mean, w = zca_fit(x, reg=0.1, chunk=7)
    cov = (xc.T @ xc / 200).numpy()
    u, s, _ = np.linalg.svd(cov + 0.1 * np.trace(cov) / 6 * np.eye(6))
    np.testing.assert_allclose(w.numpy(), (u * s ** -0.5) @ u.T, rtol=1e-10)


def test_zca_images_round_trip_to_pixels():
    d = load_images("digits", zca=True, dtype=torch.float64)
    plain = load_images("digits", dtype=torch.float64)
    assert d.zca and d.zca_matrix.shape == (64, 64) and d.record()["zca"]
    assert not torch.allclose(d.x_train, plain.x_train)
    torch.testing.assert_close(to_pixels(d, d.x_test), to_pixels(plain, plain.x_test))
    # whitened covariance in closed form: U diag(S / (S + 0.1 mean S)) U^T, S, U of the standardised covariance
    x = plain.x_train.flatten(1) - plain.x_train.flatten(1).mean(0)
    s, u = torch.linalg.eigh(x.T @ x / x.shape[0])
    s = s.clamp_min(0)
    z = d.x_train.flatten(1)
    torch.testing.assert_close(z.T @ z / z.shape[0], (u * (s / (s + 0.1 * s.mean()))) @ u.T)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,match", [
    (dict(name="imagenet"), "--dataset: expected one of"),
    (dict(name="mnist"), "--data-root: --dataset mnist reads its files"),
    (dict(name="cifar10", root="/nonexistent/dir"), "--data-root: /nonexistent/dir is not a folder"),
    (dict(name="digits", test_fraction=1.5), "--test-fraction"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ImageDataError, match=match) as info:
        load_images(**kw)
    assert isinstance(info.value, CondenseError) and isinstance(info.value, DistillError)


def test_check_ipc_names_the_smallest_class():
    d = load_images("digits")
    check_ipc(d, 116)
    with pytest.raises(CondenseError, match=r"--ipc: expected images per class between 1 and 116 \(class '8'"):
        check_ipc(d, 117)
