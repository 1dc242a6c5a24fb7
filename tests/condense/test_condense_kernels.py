"""The relu NNGP/NTK recursion: batched vs pair-by-pair reference, vs Gaussian expectations and wide random
nets (Monte Carlo, seeded), symmetry and PSD, gradients (gradcheck; finite at coincident inputs)."""
import math

import pytest
import torch

from torchopt_ext.condense.kernels import relu_kernel, relu_kernels, relu_kernels_reference

DT = torch.float64


def points(n=6, d=16, seed=0):
    """Generic points plus the awkward ones: a near neighbour, an antipode and an exact duplicate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    x[1] = 0.9 * x[0] + 0.3 * x[1]
    x[2] = -x[0]
    x[3] = x[0]
    return x


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_batched_equals_pairwise_reference(depth):
    x = points()
    y = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(1), dtype=DT)   # flattened to 16
    for other in (None, y):
        k, th = relu_kernels(x, other, depth=depth, w_var=1.7, b_var=0.3)
        kr, thr = relu_kernels_reference(x, x if other is None else other, depth, 1.7, 0.3)
        # arccos near c = +-1 turns one rounding of c into ~sqrt(eps) in phi: the duplicate/antipode rows
        torch.testing.assert_close(k, torch.tensor(kr, dtype=DT), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(th, torch.tensor(thr, dtype=DT), rtol=1e-7, atol=1e-7)
    generic = points()[4:]
    k, th = relu_kernels(generic, y, depth=depth)
    kr, thr = relu_kernels_reference(generic, y, depth)
    torch.testing.assert_close(k, torch.tensor(kr, dtype=DT), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(th, torch.tensor(thr, dtype=DT), rtol=1e-12, atol=1e-13)


def test_one_layer_is_the_gaussian_expectation():
    """K^1 = E[relu(u) relu(v)], Theta^1 = K^1 + E[relu'(u) relu'(v)] K^0 for (u, v) ~ N(0, K^0)."""
    x = points()[[0, 1, 2, 4, 5]]
    d = x.shape[1]
    k, th = relu_kernels(x, depth=1, w_var=1.0, b_var=0.0)
    g = torch.Generator().manual_seed(2)
    n = 1 << 21
    u = x @ torch.randn(d, n, generator=g, dtype=DT) / math.sqrt(d)    # columns: draws of N(0, K^0)
    r, s = torch.relu(u), (u > 0).to(DT)
    k0 = x @ x.T / d
    for est, draws in ((k, r[:, None, :] * r[None, :, :]), (th - k, k0[:, :, None] * s[:, None, :] * s[None, :, :])):
        # the antipode pair has zero variance; its closed form is 0 up to sqrt(eps) of the arccos
        mean, se = draws.mean(-1), draws.std(-1) / math.sqrt(n)
        assert ((est - mean).abs() <= 5 * se + 1e-7).all(), ((est - mean) / se).abs().max()


def hidden_features(x, depth, width, g, w_var, b_var):
    """relu(h^depth) of a random net in the NTK parameterisation."""
    h = x
    for _ in range(depth):
        w = torch.randn(h.shape[1], width, generator=g)
        h = torch.relu(math.sqrt(w_var / h.shape[1]) * h @ w + math.sqrt(b_var) * torch.randn(width, generator=g))
    return h


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_nngp_is_the_output_covariance_of_a_wide_net(depth):
    """Cov(f(x), f(x')) of the readout given the hidden layers, averaged over 8 nets of width 4096."""
    x, w_var, b_var, width, nets = points(), 2.0, 0.5, 4096, 8
    g = torch.Generator().manual_seed(3)
    cov = torch.zeros(len(x), len(x), dtype=DT)
    for _ in range(nets):
        a = hidden_features(x.float(), depth, width, g, w_var, b_var)
        cov += (w_var * a @ a.T / width + b_var).to(DT) / nets      # E over the readout's weights and bias
    k = relu_kernel(x, kind="nngp", depth=depth, w_var=w_var, b_var=b_var)
    assert (cov - k).abs().max() < 0.05 * k.diagonal().max()


def net_output(params, x, w_var, b_var):
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        h = math.sqrt(w_var / w.shape[0]) * h @ w + math.sqrt(b_var) * b
        if i < n_layers - 1:
            h = torch.relu(h)
    return h[:, 0]


@pytest.mark.parametrize("depth", [1, 2])
def test_ntk_is_the_empirical_ntk_of_a_wide_net(depth):
    """J J^T of one output with respect to every weight and bias, averaged over 4 nets of width 2048."""
    x, w_var, b_var, width, nets = points(5), 2.0, 0.5, 2048, 4
    g = torch.Generator().manual_seed(4)
    sizes = [x.shape[1]] + [width] * depth + [1]
    emp = torch.zeros(len(x), len(x), dtype=DT)
    for _ in range(nets):
        params = [t.requires_grad_() for i, o in zip(sizes[:-1], sizes[1:])
                  for t in (torch.randn(i, o, generator=g), torch.randn(o, generator=g))]
        out = net_output(params, x.float(), w_var, b_var)
        jac = torch.stack([torch.cat([p.flatten() for p in torch.autograd.grad(out[i], params, retain_graph=True)])
                           for i in range(len(x))])
        emp += (jac @ jac.T).to(DT) / nets
    th = relu_kernel(x, kind="ntk", depth=depth, w_var=w_var, b_var=b_var)
    assert (emp - th).abs().max() < 0.06 * th.diagonal().max()


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_symmetric_and_psd(kind):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(5), dtype=DT)
    x[7] = x[3]
    k = relu_kernel(x, kind=kind, depth=3)
    assert torch.equal(k, k.T)
    ev = torch.linalg.eigvalsh(k)
    assert ev.min() > -1e-12 * ev.max()
    torch.testing.assert_close(relu_kernel(x, x.clone(), kind=kind, depth=3), k, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("depth", [1, 3])
def test_gradcheck_generic_points(kind, depth):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=g, dtype=DT, requires_grad=True)
    y = torch.randn(4, 5, generator=g, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: relu_kernel(a, b, kind=kind, depth=depth, b_var=0.1), (x, y))
    assert torch.autograd.gradcheck(lambda a: relu_kernel(a, kind=kind, depth=depth, b_var=0.1), (x,))


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_gradient_finite_at_coincident_points(kind):
    """The diagonal of K(S, S) (cos phi = 1) and a duplicated row must give finite, matching gradients."""
    x = points().requires_grad_()
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(7), dtype=DT)
    g_self, = torch.autograd.grad((w * relu_kernel(x, kind=kind, depth=2)).sum(), x)
    g_pair, = torch.autograd.grad((w * relu_kernel(x, x, kind=kind, depth=2)).sum(), x)
    assert torch.isfinite(g_self).all() and torch.isfinite(g_pair).all()
    # the generic rows (away from the duplicate/antipode cluster) agree tightly between the two paths
    torch.testing.assert_close(g_self[4:], g_pair[4:], rtol=1e-6, atol=1e-8)
    for dt in (torch.float32, DT):
        xs = points().to(dt).requires_grad_()
        (relu_kernel(xs, kind=kind, depth=2) + relu_kernel(xs, xs.detach(), kind=kind, depth=2)).sum().backward()
        assert torch.isfinite(xs.grad).all()


def test_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind"):
        relu_kernel(x, kind="rbf")
    with pytest.raises(ValueError, match="depth"):
        relu_kernels(x, depth=-1)
    with pytest.raises(ValueError, match="y: expected"):
        relu_kernels(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="w_var"):
        relu_kernels(x, w_var=0.0)
