"""Hypergradients through n SGD steps of any nn.Module, for the bilevel methods (DD, LD, GTN; MTT's student).

Inner loop (docs/design.md#dataset-distillation), with i(k) = k mod s and the net called by
``torch.func.functional_call``:
    theta_{k+1} = theta_k - eta_k g_k,   g_k = d l(f_{theta_k}(x~_i(k)), y~_i(k)) / d theta
    l(z, p) = (1/B) sum_b [ (sum_c p_bc) logsumexp(z_b) - p_b . z_b ]
l is the cross-entropy when the rows of p sum to one and is linear in p (the tabular models.loss, on logits).
The outer loss L(theta_n) is the caller's; with several nets L is the MEAN of L(theta_n^(j)) over them.

``unroll_hypergrad`` is the reverse loop of the tabular paper's Algorithm 3. With v = dL/dtheta_{k+1}:
    dL/deta_k     = -<g_k, v>
    dL/dx~_i(k)  += -eta_k d<g_k, v>/dx~        dL/dy~_i(k) += -eta_k d<g_k, v>/dy~
    dL/dtheta_k   = v - eta_k H_k v
all three from one double-backward of <g_k, v> (autograd, no graph kept between steps). The forward keeps
theta_k of every step, or with ``checkpoint_every=K`` only every K-th and recomputes one segment of K steps
at a time in the reverse pass: parameter copies held ~ n/K + K instead of n.
``naive_unroll_hypergrad`` is the reference: autograd through the whole unroll with create_graph=True.

Normalisation layers run in train mode (batch statistics) for every call; buffers are cloned for each
call so running statistics are never written back to the net or to ``buffers`` (and a graph that saved a
buffer cannot be invalidated by a later step's in-place update).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.func import functional_call

Params = Dict[str, torch.Tensor]
Batches = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class UnrollGrad:
    loss: float                 # L, averaged over the nets
    x: Optional[Batches]        # dL/dx~, same layout as x_syn (None when need_x=False)
    y: Batches                  # dL/dy~, same layout as y_syn
    lrs: torch.Tensor           # dL/deta, (n,)
    stats: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.loss, self.x, self.y, self.lrs))


def soft_cross_entropy(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """l(z, p) of the module docstring: logits (B, K), target probabilities p (B, K) -> scalar."""
    return (p.sum(-1) * torch.logsumexp(logits, -1) - (p * logits).sum(-1)).mean()


@contextlib.contextmanager
def train_mode(net: torch.nn.Module):
    """Batch statistics inside the unroll, whatever mode the caller left the net in."""
    modes = [(m, m.training) for m in net.modules()]
    net.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def call(net: torch.nn.Module, params: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    """f_theta(x) with fresh copies of the buffers, so nothing the net writes to them survives the call."""
    return functional_call(net, ({**{k: b.clone() for k, b in buffers.items()}, **params}), (x,))


def _as_list(batches: Batches) -> List[torch.Tensor]:
    return list(batches.unbind(0)) if isinstance(batches, torch.Tensor) else list(batches)


def _like(grads: List[torch.Tensor], template: Batches) -> Batches:
    return torch.stack(grads) if isinstance(template, torch.Tensor) else grads


def _param_list(params0) -> List[Params]:
    return [params0] if isinstance(params0, dict) else list(params0)


def _nbytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def _check(params0, xs, ys, lrs):
    if not isinstance(lrs, torch.Tensor) or lrs.dim() != 1 or lrs.numel() == 0:
        raise ValueError(f"lrs: expected a non-empty 1-d tensor of step sizes, got {getattr(lrs, 'shape', lrs)}")
    if len(xs) == 0 or len(xs) != len(ys):
        raise ValueError(f"x_syn, y_syn: expected the same non-zero number of step batches, got {len(xs)} "
                         f"and {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y.dim() != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y_syn[{i}]: expected (B, K) probabilities with B = {x.shape[0]}, got "
                             f"{tuple(y.shape)}")
    if not _param_list(params0):
        raise ValueError("params0: expected a dict of tensors or a non-empty list of them")


def _inner_grad(net, theta, buffers, x, y, create_graph):
    """g = dl/dtheta at theta (a dict of leaves that require grad), optionally with its graph."""
    value = soft_cross_entropy(call(net, theta, buffers, x), y)
    return torch.autograd.grad(value, list(theta.values()), create_graph=create_graph)


def _step(net, theta, buffers, x, y, eta):
    """theta_{k+1} from theta_k, no graph kept."""
    leaves = {k: t.detach().requires_grad_() for k, t in theta.items()}
    with torch.enable_grad():
        g = _inner_grad(net, leaves, buffers, x, y, create_graph=False)
    return {k: t.detach() - eta * gk for (k, t), gk in zip(theta.items(), g)}


def unroll_hypergrad(net: torch.nn.Module, params0, x_syn: Batches, y_syn: Batches, lrs: torch.Tensor,
                     outer_loss: Callable[[Params], torch.Tensor], checkpoint_every: Optional[int] = None,
                     buffers: Optional[Params] = None, need_x: bool = True) -> UnrollGrad:
    """Reverse-loop hypergradient of L(theta_n) w.r.t. the synthetic batches and step sizes.

    net: the architecture (its own parameters are not used); params0: theta_0 as a dict name -> tensor,
    or a list of such dicts (several nets: L and all gradients are the mean over them).
    x_syn: (s, B, ...) or a list of s batches (B_i, ...); y_syn: (s, B, K) or a list of (B_i, K)
    target probabilities; lrs: (n,) step sizes eta_k, step k uses batch k mod s.
    outer_loss(theta_n) -> 0-d tensor, differentiable in theta_n by autograd.
    checkpoint_every=K keeps theta_k only for k % K == 0 and recomputes a segment at a time.
    buffers: the net's buffers to use (default its own); they are never updated.
    need_x=False skips dL/dx~ (fixed images, as in LD).
    Returns UnrollGrad(loss, x, y, lrs, stats); unpacks as (L, dL/dx~, dL/dy~, dL/dlrs).
    stats: "peak_state_bytes" (parameter copies held at once), "n", "checkpoint_every".
    """
    xs, ys = _as_list(x_syn), _as_list(y_syn)
    _check(params0, xs, ys, lrs)
    models = _param_list(params0)
    n = lrs.shape[0]
    K = int(checkpoint_every) if checkpoint_every else n
    if K < 1:
        raise ValueError(f"checkpoint_every: expected a positive integer or None, got {checkpoint_every}")
    buffers = dict(net.named_buffers()) if buffers is None else buffers
    buffers = {k: b.detach() for k, b in buffers.items()}
    etas = lrs.detach().tolist()
    xs = [x.detach() for x in xs]
    ys = [y.detach() for y in ys]
    gx = [torch.zeros_like(x) for x in xs] if need_x else None
    gy = [torch.zeros_like(y) for y in ys]
    glr = torch.zeros(n, dtype=lrs.dtype, device=lrs.device)
    total, peak = 0.0, 0
    with train_mode(net):
        for theta0 in models:
            value, p = _reverse(net, {k: t.detach() for k, t in theta0.items()}, buffers, xs, ys, etas,
                                outer_loss, K, gx, gy, glr, 1.0 / len(models))
            total += value / len(models)
            peak = max(peak, p)
    stats = {"peak_state_bytes": peak, "n": n, "checkpoint_every": None if K >= n else K}
    return UnrollGrad(total, None if gx is None else _like(gx, x_syn), _like(gy, y_syn), glr, stats)


def _reverse(net, theta, buffers, xs, ys, etas, outer_loss, K, gx, gy, glr, weight):
    """One net: forward keeping checkpoints, L, then the reverse loop; adds weight * gradients in place."""
    s, n = len(xs), len(etas)
    every = K >= n                 # no checkpointing: the forward keeps every theta_k for the reverse loop
    kept, held, peak = {}, 0, 0    # k -> theta_k at segment starts
    segment = {}                   # k -> theta_k of the segment being reversed
    for k in range(n):
        if every or k % K == 0:
            (segment if every else kept)[k] = theta
            held += _nbytes(theta)
        theta = _step(net, theta, buffers, xs[k % s], ys[k % s], etas[k])
        peak = max(peak, held)

    leaves = {k: t.requires_grad_() for k, t in theta.items()}
    with torch.enable_grad():
        value = outer_loss(leaves)
        v = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, materialize_grads=True)
    v = [weight * t for t in v]
    for c in reversed(range(0, n, K)):
        end = min(c + K, n)
        if not every:              # recompute theta_c .. theta_{end-1} from the checkpoint
            th = kept.pop(c)
            held -= _nbytes(th)
            for k in range(c, end):
                segment[k] = th
                held += _nbytes(th)
                if k + 1 < end:
                    th = _step(net, th, buffers, xs[k % s], ys[k % s], etas[k])
            peak = max(peak, held)
        for k in range(end - 1, c - 1, -1):
            th = segment.pop(k)
            held -= _nbytes(th)
            v = _reverse_step(net, th, buffers, xs, ys, k, etas[k], v, gx, gy, glr)
    return float(value.detach()), peak


def _reverse_step(net, theta, buffers, xs, ys, k, eta, v, gx, gy, glr):
    """dL/dtheta_k from v = dL/dtheta_{k+1}; accumulates step k's dL/deta_k, dL/dx~, dL/dy~."""
    i = k % len(xs)
    leaves = {name: t.detach().requires_grad_() for name, t in theta.items()}
    x = xs[i].detach().requires_grad_(gx is not None)
    y = ys[i].detach().requires_grad_()
    with torch.enable_grad():
        g = _inner_grad(net, leaves, buffers, x, y, create_graph=True)
        dot = sum((gj * vj).sum() for gj, vj in zip(g, v))
        wrt = list(leaves.values()) + ([x] if gx is not None else []) + [y]
        d = torch.autograd.grad(dot, wrt, allow_unused=True, materialize_grads=True)
    P = len(leaves)
    glr[k] -= dot.detach()
    if gx is not None:
        gx[i].add_(d[P], alpha=-eta)
    gy[i].add_(d[-1], alpha=-eta)
    return [vj - eta * hv for vj, hv in zip(v, d[:P])]


def naive_unroll_hypergrad(net: torch.nn.Module, params0, x_syn: Batches, y_syn: Batches, lrs: torch.Tensor,
                           outer_loss: Callable[[Params], torch.Tensor],
                           buffers: Optional[Params] = None) -> UnrollGrad:
    """Reference: autograd through the whole unroll (create_graph=True), every step's graph kept alive.

    Same arguments and result as :func:`unroll_hypergrad` (no checkpointing; stats empty).
    """
    xs, ys = _as_list(x_syn), _as_list(y_syn)
    _check(params0, xs, ys, lrs)
    models = _param_list(params0)
    buffers = dict(net.named_buffers()) if buffers is None else buffers
    buffers = {k: b.detach() for k, b in buffers.items()}
    xs = [x.detach().clone().requires_grad_() for x in xs]
    ys = [y.detach().clone().requires_grad_() for y in ys]
    eta = lrs.detach().clone().requires_grad_()
    s = len(xs)
    total = 0.0
    with train_mode(net), torch.enable_grad():
        for theta0 in models:
            theta = {k: t.detach().clone().requires_grad_() for k, t in theta0.items()}
            for k in range(eta.shape[0]):
                g = _inner_grad(net, theta, buffers, xs[k % s], ys[k % s], create_graph=True)
                theta = {name: t - eta[k] * gk for (name, t), gk in zip(theta.items(), g)}
            total = total + outer_loss(theta) / len(models)
        grads = torch.autograd.grad(total, xs + ys + [eta], allow_unused=True, materialize_grads=True)
    gx, gy, glr = list(grads[:s]), list(grads[s:2 * s]), grads[-1]
    return UnrollGrad(float(total.detach()), _like(gx, x_syn), _like(gy, y_syn), glr)


def cross_entropy_outer(net: torch.nn.Module, x_real: torch.Tensor, y_real: torch.Tensor,
                        buffers: Optional[Params] = None) -> Callable[[Params], torch.Tensor]:
    """DD's outer loss: L(theta) = mean cross-entropy of f_theta on a real batch (x_real (N, ...),
    y_real (N,) class indices), batch statistics of that batch where the net normalises."""
    buffers = dict(net.named_buffers()) if buffers is None else buffers
    buffers = {k: b.detach() for k, b in buffers.items()}

    def loss(theta: Params) -> torch.Tensor:
        with train_mode(net):
            return torch.nn.functional.cross_entropy(call(net, theta, buffers, x_real), y_real)
    return loss
