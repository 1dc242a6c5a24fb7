"""KIP: the loss against a direct float64 numpy formula, its gradient against finite differences, the
learning loop (loss decreases, seeded, labels), the KRR evaluator on digits, and bad options."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from torchopt_ext.condense.kernels import relu_kernels_reference
from torchopt_ext.condense.methods import METHODS
from torchopt_ext.condense.methods.kip import (KIPOptions, centred_one_hot, initial_support, kip, kip_loss,
                                               krr_accuracy)
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError

DT = torch.float64


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits as 1x8x8 images, a seeded 2:1 split, standardised with the training part."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=DT).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:len(y) // 3], perm[len(y) // 3:]
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).float()
    return ImageData("digits", x[train], y[train], x[test], y[test], [str(c) for c in range(10)],
                     [float(mean)], [float(std)])


def tiny(seed=0, m=4, n=7, d=6, k=2):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(m, 1, 2, d // 2, generator=g, dtype=DT)
    x_t = torch.randn(n, 1, 2, d // 2, generator=g, dtype=DT)
    y_s = centred_one_hot(torch.arange(m) % k, k) + 0.1 * torch.randn(m, k, generator=g, dtype=DT)
    y_t = centred_one_hot(torch.randint(0, k, (n,), generator=g), k)
    return x_s, y_s, x_t, y_t


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_loss_equals_direct_numpy_formula(kernel):
    x_s, y_s, x_t, y_t = tiny()
    opts = KIPOptions(kernel=kernel, depth=2, reg=1e-3, w_var=1.5, b_var=0.2)
    which = 0 if kernel == "nngp" else 1
    k_ss = np.array(relu_kernels_reference(x_s, x_s, 2, 1.5, 0.2)[which])
    k_ts = np.array(relu_kernels_reference(x_t, x_s, 2, 1.5, 0.2)[which])
    ridge = 1e-3 * np.trace(k_ss) / len(k_ss)
    pred = k_ts @ np.linalg.solve(k_ss + ridge * np.eye(len(k_ss)), y_s.numpy())
    want = 0.5 * np.mean((y_t.numpy() - pred) ** 2)
    assert float(kip_loss(x_s, y_s, x_t, y_t, opts)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_gradient_equals_finite_differences(kernel):
    x_s, y_s, x_t, y_t = tiny(1)
    opts = KIPOptions(kernel=kernel, depth=2, reg=1e-3)
    xs, ys = x_s.clone().requires_grad_(), y_s.clone().requires_grad_()
    gx, gy = torch.autograd.grad(kip_loss(xs, ys, x_t, y_t, opts), (xs, ys))
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    for _ in range(3):
        u, v = torch.randn(x_s.shape, generator=g, dtype=DT), torch.randn(y_s.shape, generator=g, dtype=DT)
        fd = (kip_loss(x_s + eps * u, y_s + eps * v, x_t, y_t, opts)
              - kip_loss(x_s - eps * u, y_s - eps * v, x_t, y_t, opts)) / (2 * eps)
        assert float((gx * u).sum() + (gy * v).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-10)


def run(data, ipc=1, seed=0, **options):
    cfg = SimpleNamespace(**{"kip_" + k: v for k, v in options.items()})
    return kip(data, ipc, cfg, torch.Generator().manual_seed(seed))


def test_iterations_lower_the_loss(digits):
    syn = run(digits, ipc=1, iterations=30, target_batch=5000)   # whole training set: the same loss each step
    losses = syn.meta["losses"]
    assert syn.meta["loss_steps"][0] == 1 and syn.meta["loss_steps"][-1] == 30
    assert losses[-1] < 0.85 * losses[0]
    assert all(b <= a * (1 + 1e-3) for a, b in zip(losses, losses[1:]))
    assert syn.meta["krr_acc"] > syn.meta["krr_acc_init"] + 0.1
    assert syn.images.shape == (10, 1, 8, 8) and syn.images.dtype == digits.x_train.dtype
    torch.testing.assert_close(syn.labels, torch.eye(10))        # fixed labels: one-hot, class-major
    assert "krr_labels" not in syn.meta


def test_krr_on_all_training_data_is_accurate(digits):
    """A sanity check of the kernel: KRR with the whole training set as support."""
    whole = SyntheticSet(digits.x_train, torch.nn.functional.one_hot(digits.y_train, 10).float())
    for kernel in ("nngp", "ntk"):
        assert krr_accuracy(whole, digits, KIPOptions(kernel=kernel)) > 0.95
    # the regression targets KIP recorded take precedence over the label rows
    whole.meta["krr_labels"] = centred_one_hot((digits.y_train + 1) % 10, 10).tolist()
    assert krr_accuracy(whole, digits) < 0.05


def test_initial_support_is_real_images_of_each_class(digits):
    a = initial_support(digits, 3, "real", torch.Generator().manual_seed(0))
    b = initial_support(digits, 3, "real", torch.Generator().manual_seed(1))
    assert a.shape == (30, 1, 8, 8) and not torch.equal(a, b)
    for row, c in zip(a, torch.arange(10).repeat_interleave(3)):
        assert (digits.class_part(int(c)) == row).flatten(1).all(1).any()
    assert len({tuple(r.flatten().tolist()) for r in a[:3]}) == 3              # without replacement
    noise = initial_support(digits, 2, "noise", torch.Generator().manual_seed(0))
    assert noise.shape == (20, 1, 8, 8) and 0.7 < float(noise.std()) < 1.3


def test_seeded_runs_repeat(digits):
    a = run(digits, ipc=2, seed=3, iterations=5, target_batch=100)
    b = run(digits, ipc=2, seed=3, iterations=5, target_batch=100)
    c = run(digits, ipc=2, seed=4, iterations=5, target_batch=100)
    assert torch.equal(a.images, b.images) and a.meta["losses"] == b.meta["losses"]
    assert not torch.equal(a.images, c.images)


def test_learned_labels(digits):
    syn = run(digits, ipc=1, iterations=10, target_batch=300, learn_labels=True, init="noise", lr=0.05)
    y = torch.tensor(syn.meta["krr_labels"], dtype=DT)
    assert not torch.allclose(y, centred_one_hot(torch.arange(10), 10))    # the targets moved
    torch.testing.assert_close(syn.labels, torch.eye(10))                   # networks get the one-hot class
    assert syn.meta["krr_acc"] == krr_accuracy(syn, digits)                 # scored with the learned targets


def test_registered_and_bad_options(digits):
    assert METHODS["kip"] is kip
    for options, arg in (({"kernel": "rbf"}, "--kip-kernel"), ({"init": "zeros"}, "--kip-init"),
                         ({"iterations": 0}, "--kip-iterations"), ({"lr": float("nan")}, "--kip-lr"),
                         ({"depth": 1.5}, "--kip-depth"), ({"b_var": -1.0}, "--kip-b-var")):
        with pytest.raises(DistillError, match=arg):
            run(digits, **options)
    with pytest.raises(DistillError, match="--ipc"):
        run(digits, ipc=10_000)
