"""Hypergradients of the outer loss L w.r.t. synthetic points, labels and per-step learning rates.

Inner loop (DESIGN.md §4), per model j, k = 0..n-1, i(k) = k mod s:
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

``neumann_hypergrad`` is implicit differentiation for an inner problem trained to convergence:
    dL/dlam = dL/dlam|direct - (dL/dw) H^-1 d2l_T/dw dlam,   H^-1 v ~ alpha sum_{j<K} (I - alpha H)^j v.
"""
from dataclasses import dataclass, field

import torch

from torchopt_ext.distill import models


@dataclass
class Hypergrad:
    loss: float               # outer loss L (already averaged over all m models)
    points: torch.Tensor      # dL/dx~, s x B x d
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


def _step(params, x, p, eta):
    """One inner SGD step; also returns what the reverse step at theta_k needs (g_k and the cache)."""
    _, g, cache = models.loss_and_grad(params, x, p, need_value=False)
    return torch._foreach_add(params, g, alpha=-eta), (params, g, cache)


def unrolled_hypergrad(params0, x_syn, p_syn, lrs, x_real, p_real, m_total=None, checkpoint_every=None):
    """Reverse-mode hypergradient for one group of same-architecture models (params0: m stacked).

    x_syn: s x B x d, p_syn: s x B x C, lrs: n. p_real: one-hot targets of the real batch.
    m_total: the number of models L averages over (all groups, all ranks); default this group's m.
    checkpoint_every=None keeps every inner state (and its activations, so the reverse loop does not
    recompute them); K keeps theta_k only for k % K == 0 and recomputes one segment at a time.
    Returns a Hypergrad whose stats hold the peak bytes of inner states held at once.
    """
    s = x_syn.shape[0]
    n = lrs.shape[0]
    m = params0[0].shape[0]
    m_total = m if m_total is None else m_total
    K = int(checkpoint_every) if checkpoint_every else n
    etas = lrs.detach().tolist()  # python floats: ops with 0-d tensors cost more than these tiny matmuls
    with torch.no_grad():
        return _unroll([t.detach() for t in params0], x_syn.detach(), p_syn.detach(), etas, x_real, p_real,
                       s, n, m_total, K)


def _unroll(theta, x_syn, p_syn, etas, x_real, p_real, s, n, m_total, K):
    held = peak = 0
    kept = {}                      # k -> theta_k at segment starts (K == n: only theta_0)
    segment = {}                   # k -> (theta_k, g_k, cache_k) of the segment being reversed
    for k in range(n):
        if k % K == 0:
            kept[k] = theta
            held += _nbytes(theta)
        theta, record = _step(theta, x_syn[k % s], p_syn[k % s], etas[k])
        if K == n:                 # no checkpointing: the forward already is the last (only) segment
            segment[k] = record
            held += _nbytes(record)
        peak = max(peak, held)

    value, g_real, _ = models.loss_and_grad(theta, x_real, p_real)
    v = [gw / m_total for gw in g_real]        # dL/dtheta_n
    gx = torch.zeros_like(x_syn)
    gp = torch.zeros_like(p_syn)
    dots = [None] * n
    for c in reversed(range(0, n, K)):
        end = min(c + K, n)
        if K != n:                 # recompute theta_c .. theta_{end-1} from the checkpoint
            th = kept[c]
            for k in range(c, end):
                th, record = _step(th, x_syn[k % s], p_syn[k % s], etas[k])
                segment[k] = record
                held += _nbytes(record)
            peak = max(peak, held)
        for k in range(end - 1, c - 1, -1):
            i = k % s
            th, g, cache = segment.pop(k)
            held -= _nbytes((th, g, cache))
            dots[k] = torch.stack([torch.vdot(vw.reshape(-1), gw.reshape(-1)) for vw, gw in zip(v, g)])
            hv, xd, pd = models.tangent(th, x_syn[i], p_syn[i], cache, v)
            gx[i].add_(xd, alpha=-etas[k])
            gp[i].add_(pd, alpha=-etas[k])
            torch._foreach_add_(v, hv, alpha=-etas[k])   # dL/dtheta_k = v - eta_k H_k v
    glr = -torch.stack(dots).sum(1)
    stats = {"peak_state_bytes": peak, "n": n, "checkpoint_every": None if K == n else K}
    return Hypergrad(float(value.sum() / m_total), gx, gp, glr, stats)


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
    """alpha * sum_{j<terms} (I - alpha H)^j v, for a list of tensors v (Neumann series of H^-1 v)."""
    term = [t.clone() for t in v]
    acc = [t.clone() for t in v]
    for _ in range(terms - 1):
        hv = hvp(term)
        term = [t - alpha * h for t, h in zip(term, hv)]
        acc = [a + t for a, t in zip(acc, term)]
    return [alpha * a for a in acc]


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
    points. The learned rates only choose the path to the minimum, so their hypergradient is zero."""
    s, B = x_syn.shape[:2]
    m = params0[0].shape[0]
    m_total = m if m_total is None else m_total
    lrs_ = lrs.detach()
    x_all = x_syn.detach().reshape(s * B, -1)
    p_all = p_syn.detach().reshape(s * B, -1)
    theta = [t.detach() for t in params0]
    for k in range(lrs_.shape[0]):
        theta, _ = _step(theta, x_syn[k % s].detach(), p_syn[k % s].detach(), float(lrs_[k]))
    value, g_real, _ = models.loss_and_grad(theta, x_real, p_real)
    v = [gw / m_total for gw in g_real]
    _, _, cache = models.loss_and_grad(theta, x_all, p_all)
    alpha = float(lrs_.abs().mean()) if alpha is None else alpha
    u = neumann_inverse_hvp(lambda t: models.tangent(theta, x_all, p_all, cache, t)[0], v, alpha, terms)
    _, xd, pd = models.tangent(theta, x_all, p_all, cache, u)
    # the real loss does not depend on x~, p~ directly: only the mixed term remains
    return Hypergrad(float(value.sum() / m_total), -xd.reshape(x_syn.shape), -pd.reshape(p_syn.shape),
                     torch.zeros_like(lrs_), {"alpha": alpha, "terms": terms})
