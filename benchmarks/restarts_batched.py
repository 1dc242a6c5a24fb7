"""Restarts batched against restarts one after another, timed interleaved in one process.

1. One outer iteration of the tabular paper's configuration (3 internal models, 40 steps x 5 epochs,
   4 points per class per step, outer batch 64, two-moons shapes), for each architecture of Table 1 and
   for Table 2 (one model each of 1, 2 and 4 layers, three unrolls): R problems in one stacked unroll
   per architecture (what the driver does), R unrolls one after another (what it did), and the same
   reverse loop with the restarts vectorised by torch.func.vmap (the alternative we measured and did
   not take). The hypergradients of the three agree.
2. Evaluation: R x 5 fresh nets trained on R distilled sets (strategy 1, 2000 SGD steps) in one stacked
   loop against R loops.

    python benchmarks/restarts_batched.py [--restarts 10] [--repeats 3] [--dtype float32] [--json PATH]

Times are CPU seconds of this process (time.process_time), the minimum over the repeats: on a shared
machine wall time mostly measures how often the scheduler runs us, CPU time what the work costs. The
load average is printed before and after.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.func import vmap

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))   # this checkout

from torchopt_ext.distill import hypergrad as hg  # noqa: E402
from torchopt_ext.distill import models  # noqa: E402


def problems(layers, R, dt, m=3, seed=0):
    """R independent outer iterations of the paper's shapes, and the same stacked for the driver."""
    g = torch.Generator().manual_seed(seed)
    s, k, C, d = 40, 4, 2, 2
    one = []
    for _ in range(R):
        params0 = models.init_params(models.layer_sizes(layers, d, C, 10), m, g, dt)
        x = torch.randn(s, k * C, d, generator=g, dtype=dt)
        p = models.one_hot(torch.arange(C).repeat_interleave(k), C, dt).expand(s, -1, -1).contiguous()
        lrs = 0.05 + 0.1 * torch.rand(s * 5, generator=g, dtype=dt)
        x_real = torch.randn(64, d, generator=g, dtype=dt)
        p_real = models.one_hot(torch.randint(0, C, (64,), generator=g), C, dt)
        one.append((params0, x, p, lrs, x_real, p_real))
    stacked = ([torch.cat(ts, 0) for ts in zip(*[q[0] for q in one])],) + \
        tuple(torch.stack([q[i] for q in one]) for i in range(1, 6))
    return one, stacked


def vmap_hypergrad(params0, x_syn, p_syn, lrs, x_real, p_real):
    """The reverse loop of hypergrad.unrolled_hypergrad with the R restarts vectorised by vmap over the
    per-restart step and tangent (params0: R*m stacked, as the stacked unroll takes them)."""
    R, n = lrs.shape
    s, N = x_syn.shape[1], x_syn.shape[2]

    def step(params, x, p, eta):
        _, g, cache = models.loss_and_grad(params, x, p, need_value=False)
        return [w - eta * gw for w, gw in zip(params, g)], g, cache[:-1]   # vmap returns tensors only

    def back(params, x, p, cache, v, g, eta):
        hv, xd, pd = models.tangent(params, x, p, tuple(cache) + (N,), v)
        dot = sum((vw * gw).sum() for vw, gw in zip(v, g))
        return [vw - eta * h for vw, h in zip(v, hv)], -eta * xd, -eta * pd, dot

    vstep, vback = vmap(step), vmap(back)
    final = vmap(lambda th, x, p: models.loss_and_grad(th, x, p)[:2])
    with torch.no_grad():
        theta = [t.view(R, -1, *t.shape[1:]) for t in params0]
        m = theta[0].shape[1]
        records = []
        for k in range(n):
            new, g, cache = vstep(theta, x_syn[:, k % s], p_syn[:, k % s], lrs[:, k])
            records.append((theta, g, cache))
            theta = new
        value, g_real = final(theta, x_real, p_real)
        v = [gw / m for gw in g_real]
        gx, gp, dots = torch.zeros_like(x_syn), torch.zeros_like(p_syn), [None] * n
        for k in reversed(range(n)):
            th, g, cache = records.pop()
            v, xd, pd, dots[k] = vback(th, x_syn[:, k % s], p_syn[:, k % s], cache, v, g, lrs[:, k])
            gx[:, k % s] += xd
            gp[:, k % s] += pd
    return hg.Hypergrad(value.sum(1) / m, gx, gp, -torch.stack(dots, 1))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def outer_iteration(archs, m, R, repeats, dt):
    """One outer iteration: for each architecture in archs, an unroll of m models (Table 2: 1, 2 and 4
    layers, one model each, as the driver groups them)."""
    cases = [problems(layers, R, dt, m, seed) for seed, layers in enumerate(archs)]
    times = {"stacked": [], "one after another": [], "vmap": []}
    for _ in range(repeats):   # interleaved: a load change hits all three alike
        t0 = time.process_time()
        both = [hg.unrolled_hypergrad(*stacked) for _, stacked in cases]
        t1 = time.process_time()
        alone = [[hg.unrolled_hypergrad(*q) for q in one] for one, _ in cases]
        t2 = time.process_time()
        vm = [vmap_hypergrad(*stacked) for _, stacked in cases]
        t3 = time.process_time()
        for key, t in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(t)
    err = max(max(rel(b.points[r], a[r].points), rel(b.lrs[r], a[r].lrs)) for b, a in zip(both, alone)
              for r in range(R))
    err_vmap = max(max(rel(v.points, b.points), rel(v.lrs, b.lrs)) for v, b in zip(vm, both))
    assert err < 1e-4 and err_vmap < 1e-4, (err, err_vmap)
    return {k: min(v) for k, v in times.items()}, err, err_vmap


def evaluation(layers, R, repeats, dt):
    from torchopt_ext.distill import DistillConfig
    from torchopt_ext.distill.data import load_split
    from torchopt_ext.distill.distill import DistilledSet
    from torchopt_ext.distill.evaluate import train_on_set, train_on_sets

    split = load_split(DistillConfig(), dt)
    g = torch.Generator().manual_seed(0)
    labels = models.one_hot(torch.arange(2).repeat_interleave(4), 2, dt).expand(40, -1, -1).contiguous()
    sets = [DistilledSet(torch.randn(40, 8, 2, generator=g, dtype=dt), labels,
                         0.05 + 0.1 * torch.rand(200, generator=g, dtype=dt)) for _ in range(R)]
    times = {"stacked": [], "one after another": []}
    for _ in range(repeats):
        t0 = time.process_time()
        train_on_sets(sets, split, layers, 10, 5, 1, torch.Generator().manual_seed(1), 0.9, 20)
        t1 = time.process_time()
        for r, ds in enumerate(sets):
            train_on_set(ds, split, layers, 10, 5, 1, torch.Generator().manual_seed(1), "sgd", 0.9, 20 if r == 0 else 0)
        times["stacked"].append(t1 - t0)
        times["one after another"].append(time.process_time() - t1)
    return {k: min(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    torch.set_num_threads(1)   # as the driver runs
    out = {"load_before": os.getloadavg(), "restarts": args.restarts, "dtype": args.dtype, "iteration": {},
           "evaluation": {}}
    print(f"load average {out['load_before'][0]:.2f}; R = {args.restarts}, {args.dtype}, CPU time, min of "
          f"{args.repeats}")
    tables = (("1-layer", [1], 3), ("2-layer", [2], 3), ("4-layer", [4], 3), ("1+2+4-layer", [1, 2, 4], 1))
    for name, archs, m in tables:
        t, err, err_vmap = outer_iteration(archs, m, args.restarts, args.repeats, dt)
        out["iteration"][name] = {**t, "rel_err": err, "rel_err_vmap": err_vmap}
        print(f"outer iteration, {name}: stacked {t['stacked'] * 1e3:.0f} ms, one after another "
              f"{t['one after another'] * 1e3:.0f} ms ({t['one after another'] / t['stacked']:.1f}x), vmap "
              f"{t['vmap'] * 1e3:.0f} ms ({t['vmap'] / t['stacked']:.1f}x the stacked time); relative "
              f"differences {err:.1e} (one after another), {err_vmap:.1e} (vmap)")
    for layers in (1, 2, 4):
        t = evaluation(layers, args.restarts, args.repeats, dt)
        out["evaluation"][layers] = t
        print(f"evaluation, strategy 1, {layers}-layer, {args.restarts} x 5 nets: stacked {t['stacked']:.2f} s, one "
              f"after another {t['one after another']:.2f} s ({t['one after another'] / t['stacked']:.1f}x)")
    out["load_after"] = os.getloadavg()
    print(f"load average {out['load_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
