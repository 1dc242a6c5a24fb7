"""Hypergradients of the outer loss L w.r.t. synthetic points, labels and per-step learning rates.

Inner loop (docs/design.md#dataset-distillation), per model j, k = 0..n-1, i(k) = k mod s:
    theta_{k+1} = theta_k - eta_k g_k,   g_k = dl(x_i(k), p_i(k), theta_k)/dtheta
    L = (1/m) sum_j l(x_real, y_real, theta_n^(j))

``unrolled_hypergrad`` is the reverse loop of the tabular paper's Algorithm 3. With v = dL/dtheta_{k+1}:
    dL/deta_k    = -v . g_k
    dL/dx_i(k)  += -eta_k v^T dg_k/dx          (mixed second derivative)
    dL/dp_i(k)  += -eta_k v^T dg_k/dp
    dL/dtheta_k  = v - eta_k H_k v              (Hessian-vector product)
All second-order products come from ``models.tangent`` (no autograd graph). Without checkpointing each
step's theta_k, g_k and activations are kept (n of them); with ``checkpoint_every=K`` only every K-th
theta_k is kept and one segment of K steps is recomputed at a time during the reverse loop, so memory
grows like n/K + K instead of n.

Both hypergradients also take R independent problems at once (the driver's restarts): every tensor
gains a leading R and the models of all problems are stacked on the model axis, so one pass of
batched matrix products does the work of R passes (on tabular sizes, per-op overhead dominates).

``neumann_hypergrad`` is implicit differentiation for an inner problem trained to convergence:
    dL/dlam = dL/dlam|direct - (dL/dw) H^-1 d2l_T/dw dlam,   H^-1 v ~ alpha sum_{j<K} (I - alpha H)^j v.
"""
from dataclasses import dataclass, field

import torch

from torchopt_ext.distill import models
from torchopt_ext.distill.models import model_rates, per_model


@dataclass
class Hypergrad:
    loss: object              # outer loss L (averaged over all m models): a float, or R for R problems
    points: torch.Tensor      # dL/dx~, s x B x d (R x s x B x d for R problems)
    labels: torch.Tensor      # dL/dp~, s x B x C
    lrs: torch.Tensor         # dL/deta~, n
    stats: dict = field(default_factory=dict)


def _nbytes(tensors):
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += _nbytes(t)
    return total


def _step(params, x, p, neg_eta):
    """One inner SGD step; also returns what the reverse step at theta_k needs (g_k and the cache).

    neg_eta: -eta_k of every model, one tensor per parameter that broadcasts against it."""
    _, g, cache = models.loss_and_grad(params, x, p, need_value=False)
    return torch._foreach_addcmul(params, g, neg_eta), (params, g, cache)


def _batched(lrs, *tensors):
    """R problems at once (lrs R x n) as given, one problem (lrs n) with a leading R = 1 added."""
    if lrs.dim() == 2:
        return True, (lrs,) + tensors
    return False, tuple(t.unsqueeze(0) for t in (lrs,) + tensors)


def unrolled_hypergrad(params0, x_syn, p_syn, lrs, x_real, p_real, m_total=None, checkpoint_every=None):
    """Reverse-mode hypergradient for one group of same-architecture models.

    One problem: params0 m stacked models (W_l: m x in x out), x_syn s x B x d, p_syn s x B x C,
    lrs n, x_real b x d, p_real b x C (targets of the real batch).
    R independent problems at once (e.g. restarts): lrs R x n, and x_syn, p_syn, x_real, p_real gain
    the same leading R; params0 then stacks R*m models, problem r's at rows r*m .. r*m + m - 1. The
    loss (a float, or R) and the gradients (points, labels, lrs) have the leading R of the input.
    m_total: the number of models L averages over (all groups, all ranks); default this group's m.
    checkpoint_every=None keeps every inner state (and its activations, so the reverse loop does not
    recompute them); K keeps theta_k only for k % K == 0 and recomputes one segment at a time.
    Returns a Hypergrad whose stats hold the peak bytes of inner states held at once.
    """
    batched, (lrs, x_syn, p_syn, x_real, p_real) = _batched(lrs.detach(), x_syn, p_syn, x_real, p_real)
    R, n = lrs.shape
    m = params0[0].shape[0] // R
    m_total = m if m_total is None else m_total
    K = int(checkpoint_every) if checkpoint_every else n
    with torch.no_grad():
        theta = [t.detach() for t in params0]
        xs, ps = per_model(x_syn.detach(), m), per_model(p_syn.detach(), m)   # M x s x B x .
        h = _unroll(theta, xs, ps, model_rates(lrs, m, theta), per_model(x_real, m), per_model(p_real, m),
                    n, m_total, K)
        # per-model sums of the reverse loop -> per-problem sums
        gx, gp = (t.view(R, m, *t.shape[1:]).sum(1) for t in (h.points, h.labels))
        glr = h.lrs.view(n, R, m).sum(2).t()
        loss = h.loss.view(R, m).sum(1) / m_total
    if not batched:
        return Hypergrad(float(loss[0]), gx[0], gp[0], glr[0], h.stats)
    return Hypergrad(loss, gx, gp, glr, h.stats)


def _unroll(theta, xs, ps, neg, x_real, p_real, n, m_total, K):
    """The reverse loop on M models, each with its own points (xs: M x s x B x d) and rates (neg);
    returns per-model loss (M,), dL/dx~ (M x s x B x d), dL/dp~ and dL/deta~ (n x M)."""
    s = xs.shape[1]
    held = peak = 0
    kept = {}                      # k -> theta_k at segment starts (K == n: only theta_0)
    segment = {}                   # k -> (theta_k, g_k, cache_k) of the segment being reversed
    for k in range(n):
        if k % K == 0:
            kept[k] = theta
            held += _nbytes(theta)
        theta, record = _step(theta, xs[:, k % s], ps[:, k % s], neg[k])
        if K == n:                 # no checkpointing: the forward already is the last (only) segment
            segment[k] = record
            held += _nbytes(record)
        peak = max(peak, held)

    value, g_real, _ = models.loss_and_grad(theta, x_real, p_real)
    v = [gw / m_total for gw in g_real]        # dL/dtheta_n
    gx = torch.zeros_like(xs)
    gp = torch.zeros_like(ps)
    dots = [None] * n
    for c in reversed(range(0, n, K)):
        end = min(c + K, n)
        if K != n:                 # recompute theta_c .. theta_{end-1} from the checkpoint
            th = kept[c]
            for k in range(c, end):
                th, record = _step(th, xs[:, k % s], ps[:, k % s], neg[k])
                segment[k] = record
                held += _nbytes(record)
            peak = max(peak, held)
        for k in range(end - 1, c - 1, -1):
            i = k % s
            th, g, cache = segment.pop(k)
            held -= _nbytes((th, g, cache))
            dots[k] = sum(torch.sum(vw * gw, tuple(range(1, vw.dim()))) for vw, gw in zip(v, g))
            hv, xd, pd = models.tangent(th, xs[:, i], ps[:, i], cache, v)
            gx[:, i].addcmul_(xd, neg[k][0])         # neg[k][0]: M x 1 x 1, the view for W_1
            gp[:, i].addcmul_(pd, neg[k][0])
            torch._foreach_addcmul_(v, hv, neg[k])   # dL/dtheta_k = v - eta_k H_k v
    glr = -torch.stack(dots)
    stats = {"peak_state_bytes": peak, "n": n, "checkpoint_every": None if K == n else K}
    return Hypergrad(value, gx, gp, glr, stats)


def naive_unrolled_hypergrad(params0, x_syn, p_syn, lrs, x_real, p_real, m_total=None):
    """Reference: autograd through the whole unroll with create_graph=True, one model at a time.

    This is what public implementations do; it keeps every inner step's graph alive until backward.
    """
    s = x_syn.shape[0]
    m = params0[0].shape[0]
    m_total = m if m_total is None else m_total
    x = x_syn.detach().clone().requires_grad_()
    p = p_syn.detach().clone().requires_grad_()
    eta = lrs.detach().clone().requires_grad_()
    total = 0.0
    for j in range(m):
        theta = [t[j:j + 1].detach().clone().requires_grad_() for t in params0]
        for k in range(eta.shape[0]):
            lk = models.loss(theta, x[k % s], p[k % s]).sum()
            g = torch.autograd.grad(lk, theta, create_graph=True)
            theta = [w - eta[k] * gw for w, gw in zip(theta, g)]
        total = total + models.loss(theta, x_real, p_real).sum() / m_total
    gx, gp, glr = torch.autograd.grad(total, (x, p, eta))
    return Hypergrad(float(total.detach()), gx, gp, glr)


def neumann_inverse_hvp(hvp, v, alpha, terms):
    """alpha * sum_{j<terms} (I - alpha H)^j v, for a list of tensors v (Neumann series of H^-1 v).

    alpha: a number, or one tensor per entry of v that broadcasts against it (a step per model)."""
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * len(v)
    term = [t.clone() for t in v]
    acc = [t.clone() for t in v]
    for _ in range(terms - 1):
        hv = hvp(term)
        term = [t - a * h for t, h, a in zip(term, hv, alphas)]
        acc = [a + t for a, t in zip(acc, term)]
    return [al * a for a, al in zip(acc, alphas)]


def implicit_hypergrad(loss_T, loss_V, w, lam, alpha, terms):
    """Generic autograd form: dL_V/dlam at w ~ argmin_w loss_T(w, lam).

    loss_T(w, lam), loss_V(w, lam) return scalars; w, lam are lists of tensors.
    """
    w = [t.detach().requires_grad_() for t in w]
    lam = [t.detach().requires_grad_() for t in lam]
    lv = loss_V(w, lam)
    dv_dw = torch.autograd.grad(lv, w, retain_graph=True, allow_unused=True)
    dv_dw = [torch.zeros_like(t) if d is None else d for t, d in zip(w, dv_dw)]
    direct = torch.autograd.grad(lv, lam, allow_unused=True)
    direct = [torch.zeros_like(t) if d is None else d for t, d in zip(lam, direct)]
    dT_dw = torch.autograd.grad(loss_T(w, lam), w, create_graph=True)

    def hvp(u):
        return torch.autograd.grad(dT_dw, w, grad_outputs=u, retain_graph=True)

    u = neumann_inverse_hvp(hvp, dv_dw, alpha, terms)
    mixed = torch.autograd.grad(dT_dw, lam, grad_outputs=u, allow_unused=True)
    return [d - (torch.zeros_like(d) if mx is None else mx) for d, mx in zip(direct, mixed)]


def implicit_distill_hypergrad(params0, x_syn, p_syn, lrs, x_real, p_real, m_total=None, terms=20,
                               alpha=None):
    """Implicit hypergradient for distillation: treat theta_n as argmin of the loss on all synthetic
    points. The learned rates only choose the path to the minimum, so their hypergradient is zero.

    Shapes as for ``unrolled_hypergrad`` (one problem, or R with lrs R x n); alpha defaults to each
    problem's mean learned rate."""
    batched, (lrs, x_syn, p_syn, x_real, p_real) = _batched(lrs.detach(), x_syn, p_syn, x_real, p_real)
    R, n = lrs.shape
    s, B = x_syn.shape[1:3]
    m = params0[0].shape[0] // R
    m_total = m if m_total is None else m_total
    with torch.no_grad():
        theta = [t.detach() for t in params0]
        xs, ps = per_model(x_syn.detach(), m), per_model(p_syn.detach(), m)
        neg = model_rates(lrs, m, theta)
        for k in range(n):
            theta, _ = _step(theta, xs[:, k % s], ps[:, k % s], neg[k])
        value, g_real, _ = models.loss_and_grad(theta, per_model(x_real, m), per_model(p_real, m))
        v = [gw / m_total for gw in g_real]
        x_all, p_all = xs.flatten(1, 2), ps.flatten(1, 2)          # M x sB x .
        _, _, cache = models.loss_and_grad(theta, x_all, p_all)
        a = lrs.abs().mean(1) if alpha is None else torch.full((R,), float(alpha), dtype=lrs.dtype)
        steps = [per_model(a, m).view((-1,) + (1,) * (t.dim() - 1)) for t in theta]
        u = neumann_inverse_hvp(lambda t: models.tangent(theta, x_all, p_all, cache, t)[0], v, steps, terms)
        _, xd, pd = models.tangent(theta, x_all, p_all, cache, u)
        # the real loss does not depend on x~, p~ directly: only the mixed term remains
        gx, gp = (-t.view(R, m, s, B, -1).sum(1) for t in (xd, pd))
        loss = value.view(R, m).sum(1) / m_total
    stats = {"alpha": a.tolist() if batched else float(a[0]), "terms": terms}
    if not batched:
        return Hypergrad(float(loss[0]), gx[0], gp[0], torch.zeros_like(lrs[0]), stats)
    return Hypergrad(loss, gx, gp, torch.zeros_like(lrs), stats)
