"""dm: the class embedding means and the loss against a direct computation, one siamese draw per class for
both batches, seeding, the options, and a smoke test beating random real images."""
import types

import pytest
import torch

from torchopt_ext.condense import augment as A
from torchopt_ext.condense.evaluate import evaluate_set
from torchopt_ext.condense.methods import _matching as M
from torchopt_ext.condense.methods import dm as D
from torchopt_ext.condense.methods import load_methods
from torchopt_ext.condense.nets import make_net
from torchopt_ext.distill.config import DistillError


METHODS = load_methods()

pytestmark = pytest.mark.usefixtures("single_thread")


def run(data, ipc=1, seed=0, **opts):
    config = types.SimpleNamespace(net="convnet", width=16, depth=None, **{f"dm_{k}": v for k, v in opts.items()})
    return METHODS["dm"](data, ipc, config, torch.Generator().manual_seed(seed), False)


def batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) for n in sizes]


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_embedding_means_equal_a_direct_computation(name):
    torch.manual_seed(0)
    net = make_net(name, (1, 8, 8), 10, width=6).double()
    xs = batches([3, 1, 5])
    got = D.embedding_means(net, xs)
    direct = torch.stack([torch.stack([net.features(x[i:i + 1])[0] for i in range(len(x))]).mean(0) for x in xs])
    torch.testing.assert_close(got, direct)
    assert got.shape == (3, net.head.in_features)


def test_batch_norm_nets_embed_all_classes_in_one_train_mode_batch():
    torch.manual_seed(0)
    net = make_net("convnet_bn", (1, 8, 8), 10, width=4).double().train()
    xs = batches([4, 6])
    feats = net.features(torch.cat(xs))
    torch.testing.assert_close(D.embedding_means(net, xs), torch.stack([feats[:4].mean(0), feats[4:].mean(0)]))


def test_loss_is_the_sum_over_classes_of_squared_mean_differences():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    direct = sum(sum((a[c, f] - b[c, f]) ** 2 for f in range(5)) for c in range(3))
    torch.testing.assert_close(D.mean_distance(a, b), direct)


def test_one_iteration_is_one_sgd_step_on_the_direct_loss(tiny):
    """lr 1, no momentum, one iteration: x~ moves by -dL/dx~ with L written out per class, the same draws."""
    s = run(tiny, ipc=2, iterations=1, momentum_img=0.0, batch_real=9)
    g = torch.Generator().manual_seed(0)
    x0 = M.initial_images(tiny, 2, "real", g).requires_grad_()
    net = M.fresh_net(types.SimpleNamespace(net="convnet", width=16, depth=None), tiny, g)
    fams = A.default_strategy("digits")
    loss = 0
    for c in range(10):
        real = M.real_batch(tiny, M.class_pools(tiny)[c], 9, g)
        d = A.draw(fams, 1, (8, 8), g)
        mr = net.features(A.apply(real, d)).mean(0).detach()
        ms = net.features(A.apply(x0[2 * c:2 * c + 2], d)).mean(0)
        loss = loss + ((mr - ms) ** 2).sum()
    grad, = torch.autograd.grad(loss, x0)
    torch.testing.assert_close(s.images, (x0 - grad).detach(), rtol=1e-4, atol=1e-5)
    assert s.meta["losses"][0] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_held_counts_fixed_tensors_and_saved_storages_once():
    held = M.Held()
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    with held.step([x]) as hold:
        y = (x * w).sum()           # mul saves x (already counted) and w
        z = (x * 2 + w).sum()       # saves nothing new
        hold([torch.zeros(10)])
    assert held.take() == 4 * (1000 + 1000 + 10) and held.take() == 0
    (y + z).backward()


def test_shapes_meta_and_seeding(tiny):
    a = run(tiny, ipc=3, iterations=3)
    assert a.images.shape == (30, 1, 8, 8) and a.lrs is None
    assert torch.equal(a.hard_labels, torch.arange(10).repeat_interleave(3))
    assert a.meta["method"] == "dm" and len(a.meta["losses"]) == 3 and len(a.meta["held_bytes"]) == 3
    assert all(b > a.images.numel() * 4 for b in a.meta["held_bytes"])
    assert a.meta["augment"] == ["color", "crop", "cutout", "scale", "rotate"]
    b = run(tiny, ipc=3, iterations=3)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, run(tiny, ipc=3, seed=1, iterations=3).images)
    assert run(tiny, ipc=1, iterations=1, strategy="none").meta["augment"] == []


@pytest.mark.parametrize("name, value, match", [
    ("iterations", 0, "--dm-iterations: expected a positive integer"),
    ("momentum_img", -0.5, "--dm-momentum-img: expected a finite number >= 0"),
    ("batch_real", 2.5, "--dm-batch-real: expected a positive integer"),
    ("strategy", "crop_blur", "--dm-strategy: expected 'auto', 'none'"),
])
def test_bad_options_are_one_clear_error(tiny, name, value, match):
    with pytest.raises(DistillError, match=match):
        run(tiny, **{name: value})


def test_dm_beats_random_real_images(tiny):
    """ipc 1 on the tiny split: the matched images train better nets than the random images they start from."""
    dm = run(tiny, ipc=1, iterations=30)
    rand = METHODS["random"](tiny, 1, None, torch.Generator().manual_seed(0))
    acc = [sum(evaluate_set(s, tiny, "convnet", n_models=2, epochs=100, width=16)) / 2 for s in (dm, rand)]
    assert acc[0] > acc[1] + 0.05, acc
