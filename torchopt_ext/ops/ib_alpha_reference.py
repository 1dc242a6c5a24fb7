"""Pure-PyTorch reference of the implicit-backprop alpha solve: the ground truth in the tests and
the fallback when the compiled extension is missing.

Same contract and the same mathematics as csrc/include/torchopt_ext/ib_alpha_math.h (derived in
docs/derivations.md), written with whole-tensor ops and always computed in float64.
"""
from __future__ import annotations

import math

import torch

from torchopt_ext import activations as _act


def _alpha_relu(q, b, zsq, eta, mu):
    d = 1.0 + eta * mu
    s = eta * zsq
    sb = s * b
    full = b / d
    mid = q / (d * s)
    zero = torch.zeros_like(q)
    pos = torch.where(q <= 0, zero, torch.where(q <= sb, mid, full))
    neg = torch.where(q <= 0.5 * sb, zero, full)
    return torch.where(b > 0, pos, torch.where(b < 0, neg, zero))


def _alpha_identity(q, b, zsq, eta, mu):
    return b / (1.0 + eta * mu) + 0.0 * q


def _alpha_arctan(q, b, zsq, eta, mu):
    d = 1.0 + eta * mu
    tau = eta * zsq / d
    sg = torch.where(b < 0, -1.0, 1.0).to(q.dtype)
    bb = sg * b
    c = sg * (q / d)
    c2 = c * c
    p3 = 1.0 / 3.0 - c2 / 9.0
    h = c * (c2 / 27.0 + 1.0 / 3.0) - 0.5 * bb * tau
    disc = h * h + p3 * p3 * p3
    one_root = (disc >= 0) | (c <= 0)  # c <= 0: one real root, whatever the sign of disc's rounding
    # Cardano (one real root)
    a = -torch.copysign(torch.pow(h.abs() + disc.clamp(min=0).sqrt(), 1.0 / 3.0), h)
    t1 = torch.where(a != 0, a - p3 / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))
    # trigonometric form (three real roots, take the smallest)
    rt = (-p3).clamp(min=0).sqrt()
    arg = (-h / torch.where(rt > 0, rt**3, torch.ones_like(rt))).clamp(-1.0, 1.0)
    t3 = 2.0 * rt * torch.cos((torch.acos(arg) + 2.0 * math.pi) / 3.0)
    t = torch.where(one_root, t1, t3)
    x = t + 2.0 * c / 3.0
    w = c - x
    v = bb / (1.0 + w * w)  # contraction step: absolute error in x -> relative error in v
    w = c - tau * v
    f = v * (1.0 + w * w) - bb
    fp = 1.0 + w * (c - 3.0 * tau * v)
    vn = v - f / fp
    v = torch.where((fp > 0) & ((vn - v).abs() < 0.5 * v), vn, v)
    return sg * v / d


def _alpha_piecewise(q, b, zsq, eta, mu, knots, coef):
    inf = math.inf
    d = 1.0 + eta * mu
    c = q / d
    tau = eta * zsq / d
    M = coef.shape[0]
    k = torch.bucketize(c, knots)  # piece holding c (c <= k_1 -> 0, as in the kernel)
    ck = coef[k]
    sig_c = ck[..., 0] + c * (ck[..., 1] + c * (ck[..., 2] + c * ck[..., 3]))
    best_g = torch.full_like(c, inf)
    best_scale = torch.zeros_like(c)
    best_w = torch.zeros_like(c)
    eps = torch.finfo(torch.float64).eps

    def offer(w, valid, p1, h2, a3, off):
        nonlocal best_g, best_scale, best_w
        tw = tau * w
        g = b * tw * (p1 + tw * (h2 + a3 * tw)) + off + 0.5 * tau * w * w
        scale = (b * tw).abs() * (p1.abs() + tw.abs() * (h2.abs() + (a3 * tw).abs())) + off.abs() + 0.5 * tau * w * w
        tol = 8 * eps * torch.maximum(scale, best_scale)
        better = valid & ((g < best_g - tol) | ((g <= best_g + tol) & (w.abs() < best_w.abs())))
        best_g = torch.where(better, g, best_g)
        best_scale = torch.where(better, scale, best_scale)
        best_w = torch.where(better, w, best_w)

    for m in range(M):
        a0, a1, a2, a3 = (float(v) for v in coef[m])
        lo = -inf if m == 0 else float(knots[m - 1])
        hi = inf if m == M - 1 else float(knots[m])
        h2 = a2 + 3.0 * a3 * c
        p1 = a1 + c * (2.0 * a2 + 3.0 * a3 * c)
        pm_c = a0 + c * (a1 + c * (a2 + c * a3))
        off = b * (pm_c - sig_c)
        A = 3.0 * b * a3 * tau * tau
        B = 1.0 + 2.0 * b * tau * h2
        C = b * p1
        lin = -C / B
        bs = torch.where(B.abs() > 1, B, torch.ones_like(B))
        disc = (B / bs) ** 2 - 4.0 * (A / bs) * (C / bs)
        sq = torch.where(disc >= 0, disc.clamp(min=0).sqrt() * bs, torch.full_like(disc, math.nan))
        Q = -0.5 * (B + torch.copysign(sq, B))
        r1 = torch.where(A == 0, lin, Q / A)
        r2 = torch.where(A == 0, lin, torch.where(Q != 0, C / Q, r1))
        for r in (r1, r2):
            u = c + tau * r
            offer(r, torch.isfinite(r) & (u >= lo) & (u <= hi), p1, h2, a3, off)
        every = torch.ones_like(c, dtype=torch.bool)
        if m > 0:
            offer((lo - c) / tau, every, p1, h2, a3, off)
        if m < M - 1:
            offer((hi - c) / tau, every, p1, h2, a3, off)
    return -best_w / d


def alpha_reference_float64(q, b, zsq, eta: float, mu: float, activation) -> torch.Tensor:
    """alpha for float64 tensors q, b and zsq (already broadcast to q's shape); no checks."""
    act = _act.get(activation)
    if act.kind == _act.KIND_RELU:
        a = _alpha_relu(q, b, zsq, eta, mu)
    elif act.kind == _act.KIND_ARCTAN:
        a = _alpha_arctan(q, b, zsq, eta, mu)
    elif act.kind == _act.KIND_IDENTITY:
        a = _alpha_identity(q, b, zsq, eta, mu)
    else:
        knots, coef = act.tables(q.device)
        a = _alpha_piecewise(q, b, zsq, eta, mu, knots, coef)
    # NaN in q, b or zsq makes that element's alpha NaN, as in the kernels
    return a + 0.0 * q + 0.0 * b + 0.0 * zsq
