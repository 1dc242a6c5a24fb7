"""The unroll methods dd, ld, gtn on tiny digits: shapes, seeding, a falling outer loss, the chain into phi."""
import types

import pytest
import torch

from tests.helpers import condense_fixtures as F
from torchopt_ext.condense import unroll as U
from torchopt_ext.condense.methods import METHODS
from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import dd, gtn, ld  # noqa: F401  (registers them)
from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.models import one_thread


@pytest.fixture(autouse=True)
def small_nets(monkeypatch):
    """The fixtures' nets (condense.nets may not exist yet) on one thread (tiny ops, shared cores)."""
    monkeypatch.setattr(B, "build_net", lambda config, data, width=None: F.make_net(
        getattr(config, "net", "convnet"), data.shape, data.n_classes, width or getattr(config, "width", 16)
    ).to(data.x_train.dtype))
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
    """30 training images per class, the test part untouched."""
    return F.tiny_digits()


def config(method, **opts):
    """The inner net is the config's (width 8) unless ``width`` is given."""
    opts = {"width": None, **opts}
    return types.SimpleNamespace(net="convnet", width=8, **{f"{method}_{k}": v for k, v in opts.items()})


def run(method, data, ipc=1, seed=0, **opts):
    return METHODS[method](data, ipc, config(method, **opts), torch.Generator().manual_seed(seed), False)


@pytest.mark.parametrize("method", ["dd", "ld", "gtn"])
def test_shapes_meta_and_seeding(method, tiny):
    opts = dict(outer_iters=3, steps=2, epochs=2)
    a = run(method, tiny, ipc=2, **opts)
    M = 2 * 2 * 10
    assert a.images.shape == (M, 1, 8, 8) and a.labels.shape == (M, 10)
    torch.testing.assert_close(a.labels.sum(1), torch.ones(M))
    assert torch.equal(a.hard_labels, torch.arange(10).repeat_interleave(2).repeat(2))
    if method == "ld":
        assert a.lrs is None
    else:
        assert a.lrs.shape == (4,) and bool((a.lrs > 0).all())
    assert a.meta["method"] == method and a.meta["steps"] == 2 and a.meta["n_inner"] == 4
    assert a.meta["per_step"] == 20 and len(a.meta["losses"]) == 3
    b = run(method, tiny, ipc=2, **opts)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.meta["losses"] == b.meta["losses"]
    c = run(method, tiny, ipc=2, seed=1, **opts)
    assert not torch.equal(a.images, c.images) or not torch.equal(a.labels, c.labels)


@pytest.mark.parametrize("method, opts", [
    ("dd", dict(outer_lr=0.05, lr_init=0.1)),
    ("dd", dict(outer_lr=0.05, lr_init=0.1, soft_labels=True, init="noise")),
    ("ld", dict(label_lr=0.2, lr_init=0.1)),
    ("gtn", dict(outer_lr=0.01, lr_init=0.1)),
])
def test_outer_loss_falls_on_a_fixed_batch(method, opts, tiny):
    """Fixed theta_0 and the whole (tiny) training set as the real batch: L is a deterministic objective."""
    s = run(method, tiny, outer_iters=30, fixed_init=True, batch_real=300, **opts)
    L = s.meta["losses"]
    assert sum(L[-5:]) / 5 < sum(L[:5]) / 5 - 0.02, L


def test_dd_real_init_and_layout(tiny):
    """init="real": step k's batch starts as distinct real images, ipc of class 0 first, then class 1, ..."""
    s = run("dd", tiny, ipc=2, outer_iters=1, steps=2, outer_lr=1e-9, lr_lr=1e-9)
    flat = tiny.x_train.reshape(len(tiny.y_train), -1)
    for i, (img, c) in enumerate(zip(s.images, s.hard_labels)):
        d = (flat - img.reshape(1, -1)).abs().amax(1)
        j = int(d.argmin())
        assert float(d[j]) < 1e-6 and int(tiny.y_train[j]) == int(c), i
    assert len({tuple(i.flatten().tolist()) for i in s.images}) == 40
    noise = run("dd", tiny, ipc=2, outer_iters=1, init="noise", outer_lr=1e-9)
    assert abs(float(noise.images.std()) - 1) < 0.2


def test_ld_keeps_real_images_and_learns_labels(tiny):
    s = run("ld", tiny, ipc=1, outer_iters=5, label_lr=0.1)
    flat = tiny.x_train.reshape(len(tiny.y_train), -1)
    for img in s.images:
        assert bool(((flat - img.reshape(1, -1)).abs().amax(1) == 0).any())
    start = torch.softmax(torch.log(torch.eye(10) * 0.9 + 0.01), -1)
    assert float((s.labels - start).abs().max()) > 1e-2


def _naive_L(net, thetas, x, y, eta, outer):
    """L by autograd through the whole unroll with its graph: the reference for the chain into phi."""
    total = 0
    for theta in thetas:
        th = {n: t.detach().requires_grad_() for n, t in theta.items()}
        for k in range(eta.shape[0]):
            value = U.soft_cross_entropy(U.call(net, th, {}, x[k % x.shape[0]]), y[k % y.shape[0]])
            g = torch.autograd.grad(value, list(th.values()), create_graph=True)
            th = {n: t - eta[k] * gk for (n, t), gk in zip(th.items(), g)}
        total = total + outer(th) / len(thetas)
    return total


@pytest.mark.parametrize("method", ["dd", "gtn"])
def test_hypergradient_reaches_the_learned_tensors(method, tiny):
    """The .grad that the outer loop hands to Adam (generator weights, noise, label logits, rho) equals
    autograd through G (or the identity), softmax, softplus and the whole unroll, in float64."""
    data = F.digits(torch.float64)
    data.x_train, data.y_train = tiny.x_train.double(), tiny.y_train
    gen = torch.Generator().manual_seed(0)
    opts = B.BilevelOptions(steps=2, epochs=2, soft_labels=True, models=2, lr_init=0.1, checkpoint_every=3)
    classes = B.class_layout(10, 1, 2)
    labels = B.Labels(classes, 10, True, torch.float64)
    rates = B.Rates(opts, torch.float64)
    if method == "gtn":
        G = B.seeded(gen, lambda: gtn.Generator(data.shape, 10, 6, 8)).double()
        z = torch.randn(2, 10, 6, dtype=torch.float64, generator=gen).requires_grad_()
        onehot = torch.nn.functional.one_hot(classes, 10).double()
        learned = list(G.parameters()) + [z, labels.logits, rates.rho]

        def batches():
            return G(z.reshape(-1, 6), onehot.reshape(-1, 10)).reshape(2, 10, 1, 8, 8), labels()
    else:
        images = B.real_images(data, classes, gen).requires_grad_()
        learned = [images, labels.logits, rates.rho]

        def batches():
            return images, labels()
    rates.rho.requires_grad_()
    cfg = config(method)
    net = B.build_net(cfg, data)
    thetas = B.draw_params(cfg, data, gen, 2)
    outer = U.cross_entropy_outer(net, data.x_train[:50], data.y_train[:50])
    loss = B.hypergradient(net, thetas, outer, batches, rates, opts)
    ours = [t.grad.clone() for t in learned]
    x, y = batches()
    L = _naive_L(net, thetas, x, y, rates(), outer)
    ref = torch.autograd.grad(L, learned)
    assert loss == pytest.approx(float(L.detach()), rel=1e-12)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert float(b.abs().max()) > 0


def test_generator_output_shapes():
    for shape in [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 7, 9)]:
        G = gtn.Generator(shape, 10, 4, 8)
        assert G(torch.randn(5, 4), torch.eye(10)[:5]).shape == (5,) + shape


@pytest.mark.parametrize("method, bad, match", [
    ("dd", dict(init="zeros"), "--dd-init"),
    ("dd", dict(outer_iters=0), "--dd-outer-iters"),
    ("dd", dict(lr_init=-1.0), "--dd-lr-init"),
    ("dd", dict(checkpoint_every=0), "--dd-checkpoint-every"),
    ("dd", dict(width=0), "--dd-width"),
    ("ld", dict(soft_labels=False), "--ld-soft-labels"),
    ("gtn", dict(noise_dim=1), "--gtn-noise-dim"),
])
def test_bad_options_name_the_option(method, bad, match, tiny):
    with pytest.raises(DistillError, match=match):
        run(method, tiny, **bad)


def test_bad_ipc(tiny):
    with pytest.raises(DistillError, match="ipc"):
        run("dd", tiny, ipc=0)
    with pytest.raises(DistillError, match="ipc: class 0 has 30"):
        run("ld", tiny, ipc=31)


def test_with_the_pipeline_nets(tiny, monkeypatch):
    """Once condense.nets lands: dd runs with the real ConvNet builder."""
    nets = pytest.importorskip("torchopt_ext.condense.nets")
    monkeypatch.undo()
    s = dd.dd(tiny, 1, types.SimpleNamespace(net="convnet", width=8, dd_outer_iters=2),
              torch.Generator().manual_seed(0))
    assert s.images.shape == (10, 1, 8, 8) and nets is not None


def test_inner_width_option_builds_the_inner_net(tiny, monkeypatch):
    """--dd-width sets the inner net's channels; None falls back to the grid's --width."""
    pytest.importorskip("torchopt_ext.condense.nets")
    monkeypatch.undo()
    seen = []
    real = B.build_net
    monkeypatch.setattr(B, "build_net", lambda config, data, width=None: seen.append(
        real(config, data, width).head.in_features) or real(config, data, width))
    for width, features in [(4, 4 * 2 * 2), (None, 8 * 2 * 2)]:
        seen.clear()
        dd.dd(tiny, 1, types.SimpleNamespace(net="convnet", width=8, dd_outer_iters=1, dd_width=width),
              torch.Generator().manual_seed(0))
        assert seen and set(seen) == {features}
    assert B.BilevelOptions().width == 64


def test_rates_start_at_lr_init_and_are_none_when_fixed(tiny):
    rates = B.Rates(B.BilevelOptions(steps=2, epochs=3, lr_init=0.07), torch.float64)
    torch.testing.assert_close(rates(), torch.full((6,), 0.07, dtype=torch.float64), rtol=1e-12, atol=0)
    assert rates.learned() is not None
    assert B.Rates(B.BilevelOptions(learn_lrs=False), torch.float64).learned() is None
    assert run("dd", tiny, outer_iters=1, learn_lrs=False).lrs is None


def test_gtn_learns_its_noise(tiny):
    """learn_noise moves z (the learned curriculum): G's final output differs from fixed noise's."""
    a = run("gtn", tiny, outer_iters=3, outer_lr=0.01)
    b = run("gtn", tiny, outer_iters=3, outer_lr=0.01, learn_noise=False)
    assert not torch.equal(a.images, b.images)


def test_real_batch_is_redrawn_every_iteration(tiny, monkeypatch):
    seen = []
    real = U.cross_entropy_outer

    def spy(net, x, y, buffers=None):
        seen.append(x.clone())
        return real(net, x, y, buffers)
    monkeypatch.setattr(U, "cross_entropy_outer", spy)
    run("ld", tiny, outer_iters=3, batch_real=40)
    assert len(seen) == 3 and all(x.shape[0] == 40 for x in seen)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    flat = tiny.x_train.reshape(len(tiny.y_train), -1)
    assert len({int(((flat - r.reshape(1, -1)).abs().amax(1) == 0).nonzero()[0]) for r in seen[0]}) == 40
