"""Independent float64 brute-force solvers of the 1-D implicit-SGD problem, used only by tests.

They share nothing with the package's solvers: a dense grid plus bounded scalar minimisation for
the global minimum (piecewise cubics), sign changes plus bisection for the stationary points
(arctan).
"""

import numpy as np
from scipy.optimize import brentq, minimize_scalar


def prox_objective(sigma, b, c, tau):
    """F(u) = b*sigma(u) + (u - c)^2 / (2 tau)."""
    return lambda u: b * sigma(u) + (u - c) ** 2 / (2 * tau)


def global_min_u(sigma, lipschitz, b, c, tau, knots=(), grid=4001):
    """Global minimiser u* of F over the real line and its value.

    F(u*) <= F(c) bounds |u* - c| <= 2 tau |b| L, so a grid over that interval (plus the knots)
    followed by a bounded refinement of every grid-local minimum finds the global minimum."""
    F = prox_objective(sigma, b, c, tau)
    r = 2 * tau * abs(b) * lipschitz + 1e-12
    us = np.concatenate([np.linspace(c - r, c + r, grid), [k for k in knots if c - r <= k <= c + r], [c]])
    us = np.unique(us)
    vals = np.array([F(u) for u in us])
    best_u, best_v = c, F(c)
    for i in range(len(us)):
        lo, hi = us[max(i - 1, 0)], us[min(i + 1, len(us) - 1)]
        if vals[i] <= vals[max(i - 1, 0)] and vals[i] <= vals[min(i + 1, len(us) - 1)]:
            if hi > lo:
                res = minimize_scalar(F, bounds=(lo, hi), method="bounded", options={"xatol": 1e-13})
                cand = [(res.fun, res.x), (vals[i], us[i])]
            else:
                cand = [(vals[i], us[i])]
            for v, u in cand:
                if v < best_v:
                    best_u, best_v = u, v
    return best_u, best_v


def arctan_nearest_root(b, c, tau):
    """v = d*alpha: the root of v (1 + (c - tau v)^2) = b nearest 0, and f'(v) there."""
    f = lambda v: v * (1 + (c - tau * v) ** 2) - b
    fp = lambda v: 1 + (c - tau * v) * (c - 3 * tau * v)
    if b == 0:
        return 0.0, 1.0
    # every real root lies in [0, b] (b > 0) or [b, 0] (b < 0)
    lo, hi = (0.0, b) if b > 0 else (b, 0.0)
    vs = np.linspace(lo, hi, 20001)
    fs = np.array([f(v) for v in vs])
    roots = []
    for i in range(len(vs) - 1):
        if fs[i] == 0:
            roots.append(vs[i])
        elif np.sign(fs[i]) * np.sign(fs[i + 1]) < 0:
            roots.append(brentq(f, vs[i], vs[i + 1], xtol=1e-15, rtol=1e-15))
    if fs[-1] == 0:
        roots.append(vs[-1])
    root = min(roots, key=abs)
    return root, fp(root)
