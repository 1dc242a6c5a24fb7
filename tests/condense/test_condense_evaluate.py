"""The evaluation protocol against hand-written SGD, the replay of learned steps, accuracy, seeding, optimizers."""
import pytest
import torch
from torch.func import functional_call

from torchopt_ext.condense.config import CondenseConfig
from torchopt_ext.condense.data import load_images
from torchopt_ext.condense.evaluate import (compute_threads, evaluate_detailed, evaluate_set, mean_std, replay_steps,
                                            test_accuracy as accuracy_of, train_protocol)
from torchopt_ext.condense.methods import load_methods
from torchopt_ext.condense.nets import seeded_net
from torchopt_ext.condense.types import SyntheticSet


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


@pytest.fixture(scope="module")
def ten(digits):
    return load_methods()["random"](digits, 10, CondenseConfig(), torch.Generator().manual_seed(0))


def soft_set(n=300, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.softmax(2 * torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    return x, y


def reference_sgd(net, x, y, epochs, seed):
    """The protocol written out: momentum buffer b = 0.9 b + (g + 5e-4 p) (b = g + 5e-4 p at the first step),
    p -= lr b, lr 0.01 then 0.001 from epoch ceil(epochs/2); soft cross-entropy -sum y log softmax(z), batch mean."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    bufs = {}
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        lr = 0.01 if epoch < (epochs + 1) // 2 else 0.001
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 256):
            b = perm[i:i + 256]
            p = {k: v.requires_grad_() for k, v in params.items()}
            z = functional_call(net, p, (x[b],))
            loss = -(y[b] * torch.log_softmax(z, -1)).sum(1).mean()
            grads = torch.autograd.grad(loss, list(p.values()))
            with torch.no_grad():
                for (k, v), g in zip(p.items(), grads):
                    d = g + 5e-4 * v
                    bufs[k] = d.clone() if k not in bufs else 0.9 * bufs[k] + d
                    params[k] = v - lr * bufs[k]
    return params


@pytest.mark.parametrize("name,epochs", [("mlp", 3), ("convnet", 2), ("convnet_bn", 3)])
def test_protocol_equals_hand_written_sgd(name, epochs):
    x, y = soft_set(n=260)   # two batches, the second short
    net = seeded_net(name, (1, 8, 8), 10, seed=1, width=4, dtype=torch.float64)
    expected = reference_sgd(net, x, y, epochs, seed=2)
    train_protocol(net, x, y, epochs, torch.Generator().manual_seed(2))
    for k, v in net.named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=1e-10, atol=1e-12, msg=k)


def test_replay_equals_the_unrolled_steps():
    x, y = soft_set(n=12)
    lrs = torch.tensor([0.3, 0.1, 0.2, 0.05, 0.4], dtype=torch.float64)
    net = seeded_net("mlp", (1, 8, 8), 10, seed=0, width=8, dtype=torch.float64)
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    for t, lr in enumerate(lrs.tolist()):   # theta_{t+1} = theta_t - eta_t grad l(x~_{t mod 3}, theta_t)
        b = slice(4 * (t % 3), 4 * (t % 3) + 4)
        p = {k: v.requires_grad_() for k, v in theta.items()}
        loss = -(y[b] * torch.log_softmax(functional_call(net, p, (x[b],)), -1)).sum(1).mean()
        theta = {k: (v - lr * g).detach() for (k, v), g in zip(p.items(), torch.autograd.grad(loss, list(p.values())))}
    replay_steps(net, SyntheticSet(x, y, lrs, {"steps": 3}))
    for k, v in net.named_parameters():
        torch.testing.assert_close(v, theta[k], rtol=1e-12, atol=1e-14)


def test_learned_lrs_are_used_only_when_asked(digits, ten):
    syn = SyntheticSet(ten.images, ten.labels, torch.full((20,), 0.05), {"steps": 2})
    replay = evaluate_detailed(syn, digits, "mlp", n_models=2, epochs=3, width=8, use_learned_lrs=True)
    protocol = evaluate_detailed(syn, digits, "mlp", n_models=2, epochs=3, width=8)
    assert replay["training"] == "replay" and protocol["training"] == "protocol"
    assert replay["accuracies"] != protocol["accuracies"]
    plain = evaluate_detailed(ten, digits, "mlp", n_models=1, epochs=1, width=8, use_learned_lrs=True)
    assert plain["training"] == "protocol"   # no lrs: the protocol


def test_accuracy_counts_argmax_hits(digits):
    net = seeded_net("convnet_bn", digits.shape, 10, seed=0, width=4)
    net.train()
    x, y = digits.x_test[:200], digits.y_test[:200]
    net.eval()
    with torch.no_grad():
        brute = sum(int(net(x[i:i + 1]).argmax() == y[i]) for i in range(x.shape[0])) / x.shape[0]
    net.train()
    assert accuracy_of(net, x, y) == pytest.approx(brute)
    assert net.training   # mode restored


def test_evaluate_is_seeded_and_learns(digits, ten):
    a = evaluate_set(ten, digits, "convnet", n_models=2, epochs=2, width=8, seed=0)
    assert len(a) == 2 and all(0 <= v <= 1 for v in a)
    assert a == evaluate_set(ten, digits, "convnet", n_models=2, epochs=2, width=8, seed=0)
    assert a != evaluate_set(ten, digits, "convnet", n_models=2, epochs=2, width=8, seed=1)
    learned = evaluate_set(ten, digits, "convnet", n_models=1, epochs=30, width=8)
    assert learned[0] > 0.25   # 100 real images, 30 steps of a width-8 net: above chance (0.1)
    wrong = SyntheticSet(ten.images, ten.labels.roll(1, dims=1))   # every label one class off
    assert evaluate_set(wrong, digits, "convnet", n_models=1, epochs=30, width=8)[0] < 0.1


def test_each_net_has_its_own_initialisation(digits, ten, monkeypatch):
    import torchopt_ext.condense.evaluate as ev
    from torchopt_ext.condense.config import derive_seed
    seeds = []

    def spy(name, shape, k, seed, *a, **kw):
        seeds.append(seed)
        return seeded_net(name, shape, k, seed, *a, **kw)
    monkeypatch.setattr(ev, "seeded_net", spy)
    evaluate_set(ten, digits, "mlp", n_models=3, epochs=1, width=4, seed=5)
    assert seeds == [derive_seed(5, "mlp", j) for j in range(3)] and len(set(seeds)) == 3


def test_detailed_numbers(digits, ten):
    r = evaluate_detailed(ten, digits, "mlp", n_models=3, epochs=2, width=8)
    assert len(r["wall_s"]) == 3 and all(w > 0 for w in r["wall_s"])
    m, s = mean_std(r["accuracies"])
    assert (r["mean"], r["std"]) == (m, s) and r["epochs"] == 2 and r["optimizer"] == "sgd"
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


def test_implicit_and_adaptive_optimizers(digits, ten):
    from torchopt_ext.nn.hyper import is_implicit
    net = seeded_net("mlp", digits.shape, 10, seed=0, width=8)
    net = train_protocol(net, ten.images, ten.labels, 2, torch.Generator().manual_seed(0), "implicit")
    assert all(is_implicit(p) for p in net.parameters())
    sgd = evaluate_set(ten, digits, "convnet", n_models=1, epochs=5, width=8)
    imp = evaluate_set(ten, digits, "convnet", n_models=1, epochs=5, width=8, optimizer="implicit")
    ada = evaluate_detailed(ten, digits, "convnet", n_models=1, epochs=5, width=8, optimizer="adaptive")
    assert 0 <= imp[0] <= 1 and 0 <= ada["accuracies"][0] <= 1 and ada["optimizer"] == "adaptive"
    assert sgd != ada["accuracies"]


def test_compute_threads_restores():
    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    with compute_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
