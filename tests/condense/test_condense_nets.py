"""The nets: layer layout, shapes per image size, too-small images, functional_call, features + head."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from torchopt_ext.condense.config import CondenseError
from torchopt_ext.condense.nets import NETS, default_depth, make_net, net_features, seeded_net

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 5, 7)]


@pytest.mark.parametrize("shape,depth", [((1, 8, 8), 2), ((1, 28, 28), 3), ((3, 32, 32), 3), ((1, 4, 4), 1),
                                         ((1, 16, 64), 3)])
def test_default_depth(shape, depth):
    assert default_depth(shape) == depth
    convs = [m for m in make_net("convnet", shape, 10, width=8).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth


def test_convnet_is_the_fields_layout():
    net = make_net("convnet", (1, 8, 8), 10)
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 2 + [nn.Flatten]
    conv, norm = net.features[0], net.features[1]
    assert conv.out_channels == 128 and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert norm.num_groups == norm.num_channels == 128 and norm.affine   # instance norm
    assert net.head.in_features == 128 * 2 * 2 and net.head.out_features == 10
    bn = make_net("convnet_bn", (1, 8, 8), 10)
    assert isinstance(bn.features[1], nn.BatchNorm2d)


def test_instance_norm_normalises_each_image_and_channel():
    norm = make_net("convnet", (1, 8, 8), 10, width=4).features[1]
    x = torch.randn(3, 4, 8, 8) * 5 + 2
    y = norm(x)
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((2, 3), unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)


def test_mlp_and_lenet_layouts():
    mlp = make_net("mlp", (1, 8, 8), 10)
    lin = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(64, 128), (128, 128), (128, 10)]
    lenet = make_net("lenet", (1, 28, 28), 10)
    convs = [m for m in lenet.modules() if isinstance(m, nn.Conv2d)]
    lin = [m for m in lenet.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(6, (5, 5), (2, 2)), (16, (5, 5), (0, 0))]
    assert [(m.in_features, m.out_features) for m in lin] == [(400, 120), (120, 84), (84, 10)]   # LeNet-5
    assert [m.in_features for m in make_net("lenet", (3, 32, 32), 10).modules() if isinstance(m, nn.Linear)][0] == 400
    assert [m.in_features for m in make_net("lenet", (1, 8, 8), 10).modules() if isinstance(m, nn.Linear)][0] == 64


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_net_takes_every_size_and_splits_into_features_and_head(name, shape):
    if name == "lenet" and min(shape[1:]) < 4:
        pytest.skip("too small for lenet (tested below)")
    net = make_net(name, shape, 7, width=8)
    x = torch.randn(3, *shape)
    out = net(x)
    assert out.shape == (3, 7)
    feats = net_features(net, x)
    assert feats.dim() == 2 and feats.shape[0] == 3 and feats.shape[1] == net.head.in_features
    torch.testing.assert_close(net.head(feats), out)


@pytest.mark.parametrize("name,shape,depth,match", [
    ("convnet", (1, 8, 8), 4, r"--net convnet: images of shape \(1, 8, 8\) are too small for 4 conv blocks"),
    ("convnet_bn", (1, 1, 1), None, r"--net convnet_bn: images of shape \(1, 1, 1\)"),
    ("lenet", (1, 3, 9), None, r"--net lenet: images of shape \(1, 3, 9\) are too small; expected H, W >= 4"),
    ("resnet", (1, 8, 8), None, r"--net: expected one of convnet, convnet_bn, mlp, lenet, got 'resnet'"),
    ("mlp", (8, 8), None, r"--net mlp: expected images of shape \(C, H, W\)"),
])
def test_images_a_net_cannot_take(name, shape, depth, match):
    with pytest.raises(CondenseError, match=match):
        make_net(name, shape, 10, depth=depth)


@pytest.mark.parametrize("name", NETS)
def test_functional_call_matches_the_module_and_differentiates_in_params(name):
    net = make_net(name, (1, 8, 8), 5, width=8).double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    out = functional_call(net, (params, buffers), (x,))
    torch.testing.assert_close(out, net(x))
    # a perturbed parameter dict is used, not the module's own
    shifted = {k: v + 0.1 for k, v in params.items()}
    assert not torch.allclose(functional_call(net, (shifted, buffers), (x,)), out)
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # second order, as the unroll needs: d/dparams of <grad, v>
    out = functional_call(net, (params, buffers), (x,))
    g = torch.autograd.grad(out.square().sum(), list(params.values()), create_graph=True)
    hv = torch.autograd.grad(sum((gi * torch.ones_like(gi)).sum() for gi in g), list(params.values()),
                             allow_unused=True)
    assert any(h is not None for h in hv)


def test_batch_norm_functional_call_in_train_mode_uses_batch_statistics():
    net = make_net("convnet_bn", (1, 8, 8), 5, width=4).double().train()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64) * 3 + 1
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    before = {k: v.clone() for k, v in net.named_buffers()}
    out = functional_call(net, (params, buffers), (x,))
    torch.testing.assert_close(out, net(x))   # both in train mode: batch statistics
    torch.autograd.grad(out.sum(), list(params.values()))
    assert not torch.equal(buffers["features.1.running_mean"], before["features.1.running_mean"])
    assert int(buffers["features.1.num_batches_tracked"]) == 1


def test_seeded_net_is_reproducible_and_leaves_the_global_stream():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = seeded_net("convnet", (1, 8, 8), 10, seed=3, width=8)
    assert torch.equal(torch.rand(1), expected)
    b = seeded_net("convnet", (1, 8, 8), 10, seed=3, width=8)
    c = seeded_net("convnet", (1, 8, 8), 10, seed=4, width=8, dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, c.head.weight.float()) and c.head.weight.dtype == torch.float64
