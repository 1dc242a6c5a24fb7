"""dc and dsa: the gradient distance against a direct formula, what is matched, the loops by ipc, the matching
step against one autograd call on the summed distance, frozen batch norm, and a smoke test beating random."""
import types

import pytest
import torch
import torch.nn.functional as F

from torchopt_ext.condense import augment as A
from torchopt_ext.condense.evaluate import evaluate_set
from torchopt_ext.condense.methods import load_methods
from torchopt_ext.condense.methods import _matching as M
from torchopt_ext.condense.methods import dc as D
from torchopt_ext.condense.nets import make_net
from torchopt_ext.distill.config import DistillError


METHODS = load_methods()

pytestmark = pytest.mark.usefixtures("single_thread")


def config(method="dc", width=16, **opts):
    return types.SimpleNamespace(net="convnet", width=width, depth=None,
                                 **{f"{method}_{k}": v for k, v in opts.items()})


def direct_distance(g_syn, g_real):
    """The 'ours' distance written out: for each weight tensor, each output channel i, 1 - cos(g_S[i], g_T[i])."""
    total = 0
    for gs, gr in zip(g_syn, g_real):
        if gs.dim() == 1:
            continue
        for i in range(gs.shape[0]):
            a, b = gs[i].flatten(), gr[i].flatten()
            total = total + 1 - (a @ b) / (torch.sqrt(a @ a) * torch.sqrt(b @ b) + 1e-6)
    return total


def two_layers(seed=0):
    """Gradients of a tiny conv (2 out, 1 in, 2x2) with bias and a linear (3 out, 4 in) with bias."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 1, 2, 2), (2,), (3, 4), (3,)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def test_distance_and_its_gradient_equal_the_direct_formula():
    g_syn = [t.requires_grad_() for t in two_layers(0)]
    g_real = two_layers(1)
    d = D.gradient_distance(g_syn, g_real)
    ref = direct_distance(g_syn, g_real)
    torch.testing.assert_close(d, ref)
    grads = torch.autograd.grad(d, g_syn, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, g_syn, allow_unused=True, materialize_grads=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # closed form of one channel: d/da (1 - a.b / (|a||b|)) = -(b / (|a||b|) - (a.b) a / (|a|^3 |b|)), eps aside
    a, b = g_syn[2][0].detach(), g_real[2][0]
    na, nb = a.norm(), b.norm()
    torch.testing.assert_close(grads[2][0], -(b / (na * nb) - (a @ b) * a / (na ** 3 * nb)), rtol=1e-5, atol=1e-6)
    assert grads[1].abs().sum() == 0 and grads[3].abs().sum() == 0   # biases get no gradient


def test_equal_gradients_are_at_distance_zero_and_opposite_ones_at_two_per_channel():
    g = two_layers(0)
    assert float(D.gradient_distance(g, g)) == pytest.approx(0, abs=1e-4)   # eps aside
    assert float(D.gradient_distance(g, [-t for t in g])) == pytest.approx(2 * (2 + 3), abs=1e-4)


def test_bias_and_norm_gradients_do_not_change_the_distance():
    g_syn, g_real = two_layers(0), two_layers(1)
    d = D.gradient_distance(g_syn, g_real)
    moved = [t if t.dim() > 1 else t + 100 * torch.randn_like(t) for t in g_syn]
    assert torch.equal(D.gradient_distance(moved, g_real), d)
    net = make_net("convnet", (1, 8, 8), 10, width=4)
    kept = {id(p) for p in D.matched(list(net.parameters()))}
    names = [n for n, p in net.named_parameters() if id(p) in kept]
    assert names == ["features.0.weight", "features.4.weight", "head.weight"]   # no conv/head bias, no norm


def test_distance_refuses_mismatched_or_empty_gradients():
    with pytest.raises(ValueError, match="g_syn, g_real: expected equal shapes"):
        D.gradient_distance([torch.zeros(2, 3)], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="at least one weight gradient"):
        D.gradient_distance([torch.zeros(3)], [torch.zeros(3)])


@pytest.mark.parametrize("ipc, expected", [(1, (80, 1, 1)), (10, (3, 10, 50)), (50, (1, 50, 10)),
                                           (20, (1, 20, 25)), (5, (80, 1, 1)), (6, (3, 10, 50)), (200, (1, 50, 10))])
def test_schedule_by_ipc(ipc, expected):
    assert D.schedule(ipc, D.DCOptions()) == expected
    assert D.schedule(ipc, D.DCOptions(iterations=4, outer_loop=3, inner_loop=2)) == (4, 3, 2)


@pytest.mark.parametrize("fams", [(), ("crop",), ("color", "scale")])
def test_matching_step_equals_autograd_of_the_summed_distance(tiny, fams):
    """The class-by-class backward into x~ equals one autograd.grad of sum_c D over the same draws."""
    torch.manual_seed(0)
    net = make_net("convnet", tiny.shape, 10, width=4).double()
    data = types.SimpleNamespace(x_train=tiny.x_train.double(), y_train=tiny.y_train, n_classes=10)
    ipc = 2
    images = M.initial_images(tiny, ipc, "real", torch.Generator().manual_seed(1)).double().requires_grad_()
    pools = M.class_pools(tiny)
    opts = D.DCOptions(batch_real=7)
    total = D.matching_step(net, images, data, ipc, pools, opts, fams, torch.Generator().manual_seed(2), M.Held())
    g = torch.Generator().manual_seed(2)     # replay the same draws: real batch, then the class's siamese draw
    weights = D.matched(list(net.parameters()))
    ref = 0
    for c in range(10):
        real = M.real_batch(data, pools[c], 7, g)
        d = A.draw(fams, 1, (8, 8), g)
        xr, xs = A.apply(real, d), A.apply(images[c * ipc:(c + 1) * ipc], d)
        gr = torch.autograd.grad(F.cross_entropy(net(xr), torch.full((7,), c)), weights)
        gs = torch.autograd.grad(F.cross_entropy(net(xs), torch.full((ipc,), c)), weights, create_graph=True)
        ref = ref + direct_distance(gs, [t.detach() for t in gr])
    want, = torch.autograd.grad(ref, images)
    assert total == pytest.approx(float(ref.detach()), rel=1e-9)
    torch.testing.assert_close(images.grad, want)
    assert all(p.grad is None for p in net.parameters())   # the nets' .grad stay untouched


def test_batch_norm_is_frozen_at_the_real_batch_statistics():
    torch.manual_seed(0)
    net = make_net("convnet_bn", (1, 8, 8), 10, width=3, depth=1)
    x = torch.randn(20, 1, 8, 8)
    D.freeze_batch_norm(net, x)
    bn = net.features[1]
    h = net.features[0](x).detach()
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True))
    assert not bn.training and bn.momentum == 0.1


@pytest.mark.parametrize("fams", [(), ("crop", "flip")])
def test_net_training_on_the_set_is_sgd_on_augmented_batches(fams):
    """train_on_set against SGD written out: shuffled batches, each augmented per image, p -= lr_net grad."""
    torch.manual_seed(0)
    net = make_net("convnet", (1, 8, 8), 10, width=3).double()
    ref = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(7) % 10
    opts = D.DCOptions(lr_net=0.05, batch_train=3)
    D.train_on_set(net, x, y, 2, opts, fams, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        perm = torch.randperm(7, generator=g)
        for i in range(0, 7, 3):
            xb = x[perm[i:i + 3]]
            if fams:
                xb = A.augment(xb, fams, g)
            p = {k: v.requires_grad_() for k, v in ref.items()}
            loss = F.cross_entropy(torch.func.functional_call(net, p, (xb,)), y[perm[i:i + 3]])
            grads = torch.autograd.grad(loss, list(p.values()))
            ref = {k: (v - 0.05 * gk).detach() for (k, v), gk in zip(p.items(), grads)}
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), ref[k])


def run(method, data, ipc=1, seed=0, width=16, **opts):
    return METHODS[method](data, ipc, config(method, width, **opts), torch.Generator().manual_seed(seed), False)


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_shapes_meta_and_seeding(tiny, method):
    small = dict(ipc=2, width=4, iterations=2, outer_loop=2, inner_loop=1)
    a = run(method, tiny, **small)
    assert a.images.shape == (20, 1, 8, 8) and a.lrs is None
    assert torch.equal(a.hard_labels, torch.arange(10).repeat_interleave(2))
    assert a.meta["method"] == method
    assert (a.meta["iterations"], a.meta["outer_loop"], a.meta["inner_loop"]) == (2, 2, 1)
    assert len(a.meta["losses"]) == 2 and all(b > a.images.numel() * 4 for b in a.meta["held_bytes"])
    assert a.meta["augment"] == ([] if method == "dc" else ["color", "crop", "cutout", "scale", "rotate"])
    b = run(method, tiny, **small)
    assert torch.equal(a.images, b.images) and a.meta["losses"] == b.meta["losses"]
    c = run(method, tiny, seed=1, **small)
    assert not torch.equal(a.images, c.images)


def test_real_init_starts_from_the_random_baselines_images(tiny):
    """With a tiny lr the set stays the random baseline's pick for the same generator seed."""
    s = run("dc", tiny, ipc=3, width=4, iterations=1, lr_img=1e-12)
    r = METHODS["random"](tiny, 3, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.images, r.images)


@pytest.mark.parametrize("name, value, match", [
    ("iterations", 0, "--dc-iterations: expected a positive integer or none"),
    ("lr_img", -1.0, "--dc-lr-img: expected a finite number > 0"),
    ("init", "zeros", "--dc-init: expected real or noise"),
    ("outer_loop", 0, "--dc-outer-loop: expected a positive integer or none"),
])
def test_bad_options_are_one_clear_error(tiny, name, value, match):
    with pytest.raises(DistillError, match=match):
        run("dc", tiny, width=4, **{name: value})


def test_dsa_strategy_is_checked_with_the_config(tiny):
    from torchopt_ext.condense.config import CondenseConfig
    with pytest.raises(DistillError, match="--dsa-strategy: expected 'auto', 'none'"):
        CondenseConfig(methods=["dsa"], options={"dsa_strategy": "blur"}).validate()
    with pytest.raises(DistillError, match="--dsa-strategy: expected 'auto', 'none'"):
        run("dsa", tiny, width=4, strategy="blur")


def test_dc_beats_random_real_images(tiny):
    """ipc 1 on the tiny split: the learned images train better nets than the random images they start from."""
    dc = run("dc", tiny, ipc=1, iterations=10)
    rand = METHODS["random"](tiny, 1, None, torch.Generator().manual_seed(0))
    acc = [sum(evaluate_set(s, tiny, "convnet", n_models=2, epochs=100, width=16)) / 2 for s in (dc, rand)]
    assert acc[0] > acc[1] + 0.05, acc
