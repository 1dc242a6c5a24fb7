"""The generic unroll: reverse loop vs naive autograd, naive vs finite differences, vs the tabular fast path."""
import pytest
import torch
from torch import nn

from tests.helpers.condense_fixtures import ConvNet, MLP
from torchopt_ext.condense import unroll as U
from torchopt_ext.distill import hypergrad as hg
from torchopt_ext.distill import models

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a shared machine: two intra-op threads mostly wait on each other."""
    with models.one_thread():
        yield


def problem(net_kind="conv", s=3, B=4, n=7, K=3, shape=(1, 6, 6), models_=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if net_kind == "conv":
        net = ConvNet(shape, K, width=4, depth=1)
    elif net_kind == "bn":
        net = ConvNet(shape, K, width=4, depth=1, norm="batch")
    else:
        net = MLP(shape, K, width=5, depth=3)
    net = net.to(DT)
    params0 = []
    for _ in range(models_):
        params0.append({k: 0.5 * torch.randn(p.shape, generator=g, dtype=DT) for k, p in net.named_parameters()})
    x = torch.randn(s, B, *shape, generator=g, dtype=DT)
    y = torch.softmax(torch.randn(s, B, K, generator=g, dtype=DT), -1)   # soft labels: exercises dL/dy
    lrs = 0.2 + 0.1 * torch.rand(n, generator=g, dtype=DT)
    x_real = torch.randn(16, *shape, generator=g, dtype=DT)
    y_real = torch.randint(0, K, (16,), generator=g)
    outer = U.cross_entropy_outer(net, x_real, y_real)
    outer.x_real, outer.y_real = x_real, y_real        # for the plain evaluations below
    return net, (params0[0] if models_ == 1 else params0), x, y, lrs, outer


def close(a, b, rtol=1e-10, atol=1e-13):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
@pytest.mark.parametrize("K", [None, 1, 2, 3])
def test_reverse_loop_equals_naive_autograd(kind, K):
    net, params0, x, y, lrs, outer = problem(kind)
    ours = U.unroll_hypergrad(net, params0, x, y, lrs, outer, checkpoint_every=K)
    ref = U.naive_unroll_hypergrad(net, params0, x, y, lrs, outer)
    assert ours.loss == pytest.approx(ref.loss, rel=1e-12)
    close(ours.x, ref.x)
    close(ours.y, ref.y)
    close(ours.lrs, ref.lrs)
    assert float(ref.x.abs().max()) > 0 and float(ref.lrs.abs().min()) > 0


def test_checkpointing_holds_fewer_parameter_copies():
    net, params0, x, y, lrs, outer = problem("mlp", n=12)
    full = U.unroll_hypergrad(net, params0, x, y, lrs, outer)
    ck = U.unroll_hypergrad(net, params0, x, y, lrs, outer, checkpoint_every=3)
    one = sum(t.numel() * t.element_size() for t in params0.values())
    assert full.stats["peak_state_bytes"] == 12 * one
    assert ck.stats["peak_state_bytes"] == (4 - 1 + 3) * one   # the other checkpoints + one segment
    close(full.x, ck.x)


def test_several_nets_average_and_list_batches():
    """params0 as a list: L and the gradients are the mean over nets; x_syn as a list of unequal batches."""
    net, params0, x, y, lrs, outer = problem("conv", models_=2)
    xs = [x[0], x[1, :3], x[2, :2]]
    ys = [y[0], y[1, :3], y[2, :2]]
    both = U.unroll_hypergrad(net, params0, xs, ys, lrs, outer, checkpoint_every=2)
    each = [U.unroll_hypergrad(net, p, xs, ys, lrs, outer) for p in params0]
    assert both.loss == pytest.approx((each[0].loss + each[1].loss) / 2, rel=1e-12)
    for i in range(3):
        close(both.x[i], (each[0].x[i] + each[1].x[i]) / 2)
        close(both.y[i], (each[0].y[i] + each[1].y[i]) / 2)
    close(both.lrs, (each[0].lrs + each[1].lrs) / 2)
    ref = U.naive_unroll_hypergrad(net, params0, xs, ys, lrs, outer)
    close(both.x[2], ref.x[2])


def test_batch_norm_uses_batch_statistics_and_leaves_running_stats():
    net, params0, x, y, lrs, outer = problem("bn")
    net.eval()
    before = {k: b.clone() for k, b in net.named_buffers()}
    ours = U.unroll_hypergrad(net, params0, x, y, lrs, outer, checkpoint_every=2)
    ref = U.naive_unroll_hypergrad(net, params0, x, y, lrs, outer)
    close(ours.x, ref.x)
    close(ours.lrs, ref.lrs)
    assert not net.training                     # the caller's mode is restored
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k

    # batch statistics: the unroll's L is the train-mode value, not the running-statistics (eval) one
    assert _outer_value(net, params0, x, y, lrs, outer) == pytest.approx(ours.loss, rel=1e-12)
    assert abs(_outer_value(net, params0, x, y, lrs, outer, train=False) - ours.loss) > 1e-3


def _outer_value(net, params0, x, y, lrs, outer, train=True):
    """L by plain evaluation: what finite differences perturb (train=False: running statistics)."""
    def value():
        theta = params0
        for k in range(lrs.shape[0]):
            theta = U._step(net, theta, dict(net.named_buffers()), x[k % x.shape[0]], y[k % y.shape[0]],
                            float(lrs[k]))
        return float(torch.nn.functional.cross_entropy(
            U.call(net, theta, dict(net.named_buffers()), outer.x_real), outer.y_real))
    if train:
        with U.train_mode(net):
            return value()
    net.eval()
    return value()


def test_naive_equals_central_finite_differences():
    net, params0, x, y, lrs, outer = problem("conv", n=5)
    ref = U.naive_unroll_hypergrad(net, params0, x, y, lrs, outer)
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    base = {"x": x, "y": y, "lrs": lrs}
    grads = {"x": ref.x, "y": ref.y, "lrs": ref.lrs}
    for which in base:
        for _ in range(3):
            idx = tuple(int(torch.randint(0, d, (1,), generator=g)) for d in base[which].shape)
            plus, minus = dict(base), dict(base)
            plus[which], minus[which] = base[which].clone(), base[which].clone()
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd = (_outer_value(net, params0, plus["x"], plus["y"], plus["lrs"], outer)
                  - _outer_value(net, params0, minus["x"], minus["y"], minus["lrs"], outer)) / (2 * eps)
            assert float(grads[which][idx]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (which, idx)


class TabularMLP(nn.Module):
    """The relu MLP of distill.models as a module: weights in x out, x @ W + b."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.register_parameter(f"W{l}", nn.Parameter(torch.zeros(a, b, dtype=DT)))
            self.register_parameter(f"b{l}", nn.Parameter(torch.zeros(b, dtype=DT)))

    def forward(self, x):
        L = len(self.sizes) - 1
        for l in range(L):
            x = x @ getattr(self, f"W{l}") + getattr(self, f"b{l}")
            if l < L - 1:
                x = torch.relu(x)
        return x


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("K", [None, 3])
def test_generic_unroll_equals_tabular_fast_path(layers, K):
    g = torch.Generator().manual_seed(0)
    C, d, m, s, n = 3, 4, 2, 3, 7
    sizes = models.layer_sizes(layers, d, C, 6)
    params0 = models.init_params(sizes, m, g, DT)
    x = torch.randn(s, 2 * C, d, generator=g, dtype=DT)
    p = torch.softmax(torch.randn(s, 2 * C, C, generator=g, dtype=DT), -1)
    lrs = 0.2 + 0.1 * torch.rand(n, generator=g, dtype=DT)
    x_real = torch.randn(20, d, generator=g, dtype=DT)
    y_real = torch.randint(0, C, (20,), generator=g)
    fast = hg.unrolled_hypergrad(params0, x, p, lrs, x_real, models.one_hot(y_real, C, DT), checkpoint_every=K)

    net = TabularMLP(sizes)
    names = [name for name, _ in net.named_parameters()]
    per_model = [{name: t[j] for name, t in zip(names, params0)} for j in range(m)]
    ours = U.unroll_hypergrad(net, per_model, x, p, lrs, U.cross_entropy_outer(net, x_real, y_real),
                              checkpoint_every=K)
    assert ours.loss == pytest.approx(fast.loss, rel=1e-12)
    close(ours.x, fast.points)
    close(ours.y, fast.labels)
    close(ours.lrs, fast.lrs)


def test_need_x_false_skips_images_only():
    net, params0, x, y, lrs, outer = problem("mlp")
    full = U.unroll_hypergrad(net, params0, x, y, lrs, outer)
    lab = U.unroll_hypergrad(net, params0, x, y, lrs, outer, need_x=False)
    assert lab.x is None
    close(lab.y, full.y, rtol=0, atol=0)
    close(lab.lrs, full.lrs, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(lrs=torch.zeros(0, dtype=DT)), "lrs"),
    (dict(y_syn=torch.zeros(3, 4, dtype=DT)), "y_syn"),
    (dict(checkpoint_every=-1), "checkpoint_every"),
    (dict(params0=[]), "params0"),
])
def test_bad_input_names_the_argument(bad, match):
    net, params0, x, y, lrs, outer = problem("mlp")
    args = dict(net=net, params0=params0, x_syn=x, y_syn=y, lrs=lrs, outer_loss=outer)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        U.unroll_hypergrad(**args)
