"""Fully connected relu nets written functionally, batched over m models.

Parameters are a list ``[W_1, b_1, ..., W_L, b_L]`` with a leading model axis (W_l: m x in x out).
Besides the autograd-friendly ``forward`` this file has the loss gradient and its directional
derivative written out by hand: at tabular sizes autograd's per-op overhead, not flops, dominates
the unrolled hypergradient, and the hand-written second-order pass avoids building any graph.

Loss of model j on points x with target probabilities p (rows may be soft labels):
    l_j = (1/N) sum_i [ (sum_c p_ic) logsumexp(z_i) - p_i . z_i ],  z = net_j(x)
which is the cross-entropy when rows of p sum to one, and is linear in p (so dl/dp is exact).
"""
import contextlib
import math

import torch


@contextlib.contextmanager
def one_thread():
    """Run tabular-sized work on one intra-op thread.

    Every op here touches a few hundred numbers, so a second thread only adds the wait in an OpenMP
    barrier, which on a busy machine can cost more than the op itself.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_sizes(layers, n_features, n_classes, hidden):
    return [n_features] + [hidden] * (layers - 1) + [n_classes]


def init_params(sizes, m, generator, dtype=torch.float32):
    """Xavier-uniform weights, zero biases: p(theta_0) of the paper."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = (torch.rand(m, fan_in, fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        params += [w.to(dtype), torch.zeros(m, fan_out, dtype=dtype)]
    return params


def n_params(sizes):
    return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))


def forward(params, x):
    """Logits, m x N x C. x is N x d (shared by all models) or m x N x d."""
    a = x
    L = len(params) // 2
    for l in range(L):
        a = torch.matmul(a, params[2 * l]) + params[2 * l + 1].unsqueeze(-2)
        if l < L - 1:
            a = torch.relu(a)
    return a


def loss(params, x, p):
    """Per-model loss l_j (m,), autograd-friendly."""
    z = forward(params, x)
    lse = torch.logsumexp(z, -1)
    return (p.sum(-1) * lse - (p * z).sum(-1)).mean(-1)


def per_model(t, m):
    """Problem r's tensor repeated for its m models: R x ... -> R*m x ... (model j of r at r*m + j)."""
    return t.repeat_interleave(m, 0)


def model_rates(lrs, m, params):
    """-lrs[r, k] for each of problem r's m models, as views broadcasting against each parameter of an
    R*m stack: one list per step k (lrs: R x n)."""
    neg = per_model(-lrs, m).t().contiguous()                  # n x R*m
    views = {d: neg.view(neg.shape + (1,) * (d - 1)).unbind(0) for d in {t.dim() for t in params}}
    return [[views[t.dim()][k] for t in params] for k in range(neg.shape[0])]


def softmax(z):
    # composed of elementwise ops: torch.softmax enters an OpenMP parallel region, which on these
    # tiny tensors costs more than the arithmetic
    e = torch.exp(z - z.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def one_hot(y, n_classes, dtype):
    return torch.nn.functional.one_hot(y, n_classes).to(dtype)


def _transpose_input(a):
    return a.transpose(-1, -2)


def _stacked(a, b):
    return a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]


def _mm(a, b):
    """a @ b; torch.bmm for two stacks of equally many matrices (the unroll's case), which costs less per
    call than matmul's broadcasting bookkeeping."""
    return torch.bmm(a, b) if _stacked(a, b) else torch.matmul(a, b)


def _addmm(c, a, b):
    """c + a @ b, fused into one baddbmm for stacks (c broadcasts against the product)."""
    return torch.baddbmm(c, a, b) if _stacked(a, b) else c + torch.matmul(a, b)


def loss_and_grad(params, x, p, need_value=True):
    """l_j and dl_j/dtheta_j without autograd; also returns the cache for ``tangent``.

    need_value=False skips the loss itself (value None): inner steps only need the gradient."""
    L = len(params) // 2
    N = x.shape[-2]
    acts, masks = [x], []
    a = x
    for l in range(L):
        z = _addmm(params[2 * l + 1].unsqueeze(-2), a, params[2 * l])
        if l < L - 1:
            mask = (z > 0).to(z.dtype)
            masks.append(mask)
            a = z * mask
            acts.append(a)
    s = softmax(z)
    P = p.sum(-1, keepdim=True)
    value = None
    if need_value:
        value = (P.squeeze(-1) * torch.logsumexp(z, -1) - (p * z).sum(-1)).mean(-1)
    delta = (P * s - p) / N                    # dl/dz_L
    deltas = [None] * L
    grads = [None] * (2 * L)
    for l in range(L - 1, -1, -1):
        deltas[l] = delta
        grads[2 * l] = _mm(_transpose_input(acts[l]), delta)
        grads[2 * l + 1] = delta.sum(-2)
        if l > 0:
            delta = _mm(delta, params[2 * l].transpose(-1, -2)) * masks[l - 1]
    cache = (acts, masks, deltas, z, s, P, N)
    return value, grads, cache


def implicit_grad(params, x, p, lr):
    """Implicit-backprop gradients (Fagan & Iyengar; docs/design.md#implicit-backprop) of the relu net at step size lr.

    Hidden relu layers get the implicit layers' own gradient (torchopt_ext.nn.grads.implicit_grads,
    all m models as one stack, alpha from the checked torchopt_ext.ops.ib_alpha); the last layer is
    linear into the softmax loss, where the implicit step equals the explicit one, so its gradient
    is the ordinary one. The signal passed down is the ordinary EB one. A plain step
    theta - lr * grad is then the implicit step."""
    from torchopt_ext import activations
    from torchopt_ext.nn.grads import implicit_grads
    from torchopt_ext.ops import ib_alpha

    _, grads, cache = loss_and_grad(params, x, p, need_value=False)
    acts, masks, deltas, z, s, P, N = cache
    relu = activations.get("relu")
    L = len(params) // 2
    for l in range(L - 1):
        a_in, w, bias = acts[l], params[2 * l], params[2 * l + 1]
        pre = torch.matmul(a_in, w) + bias.unsqueeze(-2)
        b = torch.matmul(deltas[l + 1], params[2 * (l + 1)].transpose(-1, -2))  # dl/d relu(pre)
        # the stack's weights are W^T of the layer y = relu(a W + bias): transposed in, transposed out
        _, gw, gb = implicit_grads(a_in, w.transpose(-1, -2), bias, pre, b, lr, 0.0, False, relu,
                                   need_x=False, solve=ib_alpha)
        grads[2 * l], grads[2 * l + 1] = gw.transpose(-1, -2), gb
    return grads


def tangent(params, x, p, cache, v):
    """Directional derivative, along theta-direction v, of all first derivatives of l.

    Returns (H v, d/dv dl/dx summed over models, d/dv dl/dp summed over models). Because the full
    Hessian of l in (theta, x, p) is symmetric, these are also v^T dg/dtheta, v^T dg/dx, v^T dg/dp
    for g = dl/dtheta: exactly the vector-Jacobian products of Algorithm 3's reverse step.
    """
    acts, masks, deltas, z, s, P, N = cache
    L = len(params) // 2
    # forward tangents of the pre-activations
    a_dot = None
    zdots = []
    for l in range(L):
        zd = _addmm(v[2 * l + 1].unsqueeze(-2), acts[l], v[2 * l])
        if a_dot is not None:
            zd = _addmm(zd, a_dot, params[2 * l])
        zdots.append(zd)
        if l < L - 1:
            a_dot = zd * masks[l]
    zd = zdots[-1]
    sz = (s * zd).sum(-1, keepdim=True)
    p_dot = (sz - zd) / N                      # d/dv of dl/dp = (lse - z)/N
    delta_dot = P * s * (zd - sz) / N          # d/dv of dl/dz_L (softmax Jacobian)
    out = [None] * (2 * L)
    for l in range(L - 1, -1, -1):
        delta = deltas[l]
        out[2 * l] = _mm(_transpose_input(acts[l]), delta_dot)
        if l > 0:
            a_dot_prev = zdots[l - 1] * masks[l - 1]
            out[2 * l] = _addmm(out[2 * l], _transpose_input(a_dot_prev), delta)
        out[2 * l + 1] = delta_dot.sum(-2)
        back = _addmm(_mm(delta_dot, params[2 * l].transpose(-1, -2)), delta, v[2 * l].transpose(-1, -2))
        if l > 0:
            delta_dot = back * masks[l - 1]
        else:
            x_dot = back
    if x_dot.dim() > x.dim():
        x_dot = x_dot.sum(0)
    if p_dot.dim() > p.dim():
        p_dot = p_dot.sum(0)
    return out, x_dot, p_dot


def grad_x(params, cache):
    """dl/dx summed over models (first order), used for the direct term of the outer loss."""
    acts, masks, deltas, z, s, P, N = cache
    g = torch.matmul(deltas[0], params[0].transpose(-1, -2))
    return g.sum(0) if g.dim() == 3 else g


def predict(params, x):
    return forward(params, x).argmax(-1)


def flatten(params):
    """One flat vector per model, m x P: the form a generic optimiser or a naive unroll wants."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in params], 1)


def unflatten(flat, sizes):
    m = flat.shape[0]
    out, i = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        out.append(flat[:, i:i + fan_in * fan_out].reshape(m, fan_in, fan_out))
        i += fan_in * fan_out
        out.append(flat[:, i:i + fan_out])
        i += fan_out
    return out
