"""The unrolled hypergradient against finite differences and a naive autograd unroll; checkpointing; implicit."""
import pytest
import torch

from torchopt_ext.distill import hypergrad as hg
from torchopt_ext.distill import models

DT = torch.float64


def problem(layers=2, m=2, s=3, per_class=2, C=2, d=2, n=7, hidden=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    params0 = models.init_params(models.layer_sizes(layers, d, C, hidden), m, g, DT)
    B = per_class * C
    x = torch.randn(s, B, d, generator=g, dtype=DT)
    p = torch.softmax(torch.randn(s, B, C, generator=g, dtype=DT), -1)   # soft labels: exercises dL/dp
    lrs = 0.2 + 0.1 * torch.rand(n, generator=g, dtype=DT)
    x_real = torch.randn(32, d, generator=g, dtype=DT)
    p_real = models.one_hot(torch.randint(0, C, (32,), generator=g), C, DT)
    return params0, x, p, lrs, x_real, p_real


def outer_loss(params0, x, p, lrs, x_real, p_real):
    """L by plain forward evaluation (no derivatives): what finite differences perturb."""
    s = x.shape[0]
    theta = params0
    for k in range(lrs.shape[0]):
        _, g, _ = models.loss_and_grad(theta, x[k % s], p[k % s])
        theta = [w - lrs[k] * gw for w, gw in zip(theta, g)]
    return float(models.loss(theta, x_real, p_real).mean())


def close(a, b, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_unrolled_equals_naive_autograd(layers):
    args = problem(layers=layers, C=3, d=3)
    ours = hg.unrolled_hypergrad(*args)
    ref = hg.naive_unrolled_hypergrad(*args)
    assert ours.loss == pytest.approx(ref.loss, rel=1e-12)
    close(ours.points, ref.points)
    close(ours.labels, ref.labels)
    close(ours.lrs, ref.lrs)


def test_unrolled_equals_finite_differences():
    args = problem(layers=2, n=6)
    params0, x, p, lrs, x_real, p_real = args
    h = hg.unrolled_hypergrad(*args)
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    for which, grad in (("x", h.points), ("p", h.labels), ("lrs", h.lrs)):
        for _ in range(3):
            base = {"x": x, "p": p, "lrs": lrs}
            u = torch.randn(base[which].shape, generator=g, dtype=DT)
            plus, minus = dict(base), dict(base)
            plus[which], minus[which] = base[which] + eps * u, base[which] - eps * u
            fd = (outer_loss(params0, plus["x"], plus["p"], plus["lrs"], x_real, p_real)
                  - outer_loss(params0, minus["x"], minus["p"], minus["lrs"], x_real, p_real)) / (2 * eps)
            assert float((grad * u).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-9), which


def batch_of(problems):
    """R problems stacked the way the hypergradients take them (models restart-major, rates R x n)."""
    params0 = [torch.cat(ts, 0) for ts in zip(*[q[0] for q in problems])]
    return (params0,) + tuple(torch.stack([q[i] for q in problems]) for i in range(1, 6))


@pytest.mark.parametrize("layers, K", [(1, None), (2, 3), (4, None)])
def test_batched_problems_equal_one_at_a_time(layers, K):
    """R = 3 problems with their own models, points, labels, rates and real batch, in one stacked unroll."""
    problems = [problem(layers=layers, m=2, C=3, d=3, seed=r) for r in range(3)]
    both = hg.unrolled_hypergrad(*batch_of(problems), m_total=3, checkpoint_every=K)
    assert both.loss.shape == (3,) and both.lrs.shape == (3, 7)
    for r, args in enumerate(problems):
        one = hg.unrolled_hypergrad(*args, m_total=3, checkpoint_every=K)
        assert float(both.loss[r]) == pytest.approx(one.loss, rel=1e-14)
        close(both.points[r], one.points, rtol=1e-12, atol=1e-15)
        close(both.labels[r], one.labels, rtol=1e-12, atol=1e-15)
        close(both.lrs[r], one.lrs, rtol=1e-12, atol=1e-15)


def test_batched_implicit_equals_one_at_a_time():
    problems = [problem(layers=2, m=2, n=12, seed=r) for r in range(3)]
    both = hg.implicit_distill_hypergrad(*batch_of(problems), terms=6)
    for r, args in enumerate(problems):
        one = hg.implicit_distill_hypergrad(*args, terms=6)
        assert both.stats["alpha"][r] == pytest.approx(one.stats["alpha"], rel=1e-15)
        assert float(both.loss[r]) == pytest.approx(one.loss, rel=1e-14)
        close(both.points[r], one.points, rtol=1e-12, atol=1e-15)
        close(both.labels[r], one.labels, rtol=1e-12, atol=1e-15)
    assert torch.all(both.lrs == 0)


@pytest.mark.parametrize("K", [1, 3, 4, 20])
def test_checkpointing_unchanged_and_less_memory(K):
    args = problem(layers=2, n=20)
    full = hg.unrolled_hypergrad(*args)
    ck = hg.unrolled_hypergrad(*args, checkpoint_every=K)
    close(full.points, ck.points, rtol=0, atol=0)
    close(full.labels, ck.labels, rtol=0, atol=0)
    close(full.lrs, ck.lrs, rtol=0, atol=0)
    if 1 < K < 20:
        assert ck.stats["peak_state_bytes"] < full.stats["peak_state_bytes"]


def test_checkpoint_memory_at_n200_is_under_a_third():
    args = problem(layers=2, n=200, s=40)
    full = hg.unrolled_hypergrad(*args)
    ck = hg.unrolled_hypergrad(*args, checkpoint_every=20)
    close(full.points, ck.points, rtol=0, atol=0)
    ratio = ck.stats["peak_state_bytes"] / full.stats["peak_state_bytes"]
    assert ratio < 1 / 3, ratio


def test_m_total_scales_and_groups_add_up():
    params0, x, p, lrs, xr, pr = problem(m=3)
    whole = hg.unrolled_hypergrad(params0, x, p, lrs, xr, pr)
    a = hg.unrolled_hypergrad([t[:1] for t in params0], x, p, lrs, xr, pr, m_total=3)
    b = hg.unrolled_hypergrad([t[1:] for t in params0], x, p, lrs, xr, pr, m_total=3)
    close(a.points + b.points, whole.points)
    close(a.lrs + b.lrs, whole.lrs)


def test_implicit_equals_closed_form_ridge():
    """Inner: w* = argmin ||X w - y||^2/(2N) + lam/2 ||w||^2, solved exactly; hypergradient w.r.t.
    the training inputs X, targets y and lam (all 'distilled' quantities) against autograd through
    the closed-form solve."""
    g = torch.Generator().manual_seed(0)
    N, d = 12, 4
    X = torch.randn(N, d, generator=g, dtype=DT)
    y = torch.randn(N, generator=g, dtype=DT)
    lam = torch.tensor(0.5, dtype=DT)
    Xv = torch.randn(20, d, generator=g, dtype=DT)
    yv = torch.randn(20, generator=g, dtype=DT)

    def w_star(X, y, lam):
        return torch.linalg.solve(X.T @ X / N + lam * torch.eye(d, dtype=DT), X.T @ y / N)

    def loss_T(w, lam_list):
        X, y, lam = lam_list
        return ((X @ w[0] - y) ** 2).sum() / (2 * N) + lam / 2 * (w[0] ** 2).sum()

    def loss_V(w, lam_list):
        return ((Xv @ w[0] - yv) ** 2).sum() / 2

    leaves = [t.clone().requires_grad_() for t in (X, y, lam)]
    exact = torch.autograd.grad(loss_V([w_star(*leaves)], None), leaves)
    H = X.T @ X / N + lam * torch.eye(d, dtype=DT)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
    ours = hg.implicit_hypergrad(loss_T, loss_V, [w_star(X, y, lam)], [X, y, lam], alpha, terms=400)
    for a, b in zip(ours, exact):
        close(a, b, rtol=1e-8, atol=1e-10)


def test_neumann_series_converges_to_inverse():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=DT)
    H = A @ A.T + torch.eye(5, dtype=DT)
    v = torch.randn(5, generator=g, dtype=DT)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
    u = hg.neumann_inverse_hvp(lambda t: [H @ t[0]], [v], alpha, 2000)[0]
    close(u, torch.linalg.solve(H, v), rtol=1e-8, atol=1e-10)


def test_implicit_distill_hypergrad_matches_autograd_implicit():
    """The hand-written distillation form equals the generic autograd form at the same w."""
    params0, x, p, lrs, xr, pr = problem(layers=1, m=1, n=30)
    h = hg.implicit_distill_hypergrad(params0, x, p, lrs, xr, pr, terms=15, alpha=0.3)
    s, B = x.shape[:2]
    theta = params0
    for k in range(lrs.shape[0]):
        _, g, _ = models.loss_and_grad(theta, x[k % s], p[k % s])
        theta = [w - lrs[k] * gw for w, gw in zip(theta, g)]

    def loss_T(w, lam):
        return models.loss(w, lam[0].reshape(s * B, -1), lam[1].reshape(s * B, -1)).sum()

    def loss_V(w, lam):
        return models.loss(w, xr, pr).sum()

    gx, gp = hg.implicit_hypergrad(loss_T, loss_V, theta, [x, p], 0.3, 15)
    close(h.points, gx)
    close(h.labels, gp)
    assert torch.all(h.lrs == 0)
