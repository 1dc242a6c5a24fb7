"""Train fresh models on distilled data and tabulate test accuracy.

The training schedules are strategies 0-3 of docs/design.md#dataset-distillation.
"""
import statistics

import torch

from torchopt_ext.distill import models

STRATEGY_NAMES = {0: "as distilled", 1: "Strategy1", 2: "Strategy2", 3: "Strategy3"}


def schedule(ds, strategy, strategy2_decay=0.9):
    """(synthetic step index, learning rate) for every training step of the given strategy."""
    s = ds.steps
    lrs = ds.lrs.tolist()
    n = len(lrs)
    if strategy == 0:   # exactly the distilled procedure
        return [(k % s, lrs[k]) for k in range(n)]
    if strategy == 1:   # ignore distilled rates: 0.3, x1.1 per epoch for 10 epochs, then x0.95; 50 epochs
        out, lr = [], 0.3
        for e in range(50):
            if e > 0:
                lr *= 1.1 if e <= 10 else 0.95
            out += [(i, lr) for i in range(s)]
        return out
    if strategy == 2:   # all distilled epochs 10 times, rates decayed once more at each repeat
        return [(k % s, lrs[k] * strategy2_decay ** r) for r in range(10) for k in range(n)]
    if strategy == 3:   # distilled epochs, then only the last epoch 45 more times, x0.98 cumulatively
        last = [(k % s, lrs[k]) for k in range(n - s, n)]
        return [(k % s, lrs[k]) for k in range(n)] + \
            [(i, lr * 0.98 ** j) for j in range(1, 46) for i, lr in last]
    raise ValueError(f"strategy: expected 0, 1, 2 or 3, got {strategy!r}")


def _optimizer_class(name):
    """None for the built-in plans (sgd, implicit), else the torch.optim-style class."""
    if name in ("sgd", "implicit"):
        return None
    try:
        from torchopt_ext import optim
        return {"adaptive": optim.AdaptiveLRSGD}[name]
    except (ImportError, AttributeError, KeyError) as exc:
        raise ImportError(f"--eval-optimizer {name}: needs torchopt_ext.optim.AdaptiveLRSGD, which is not "
                          f"available in this installation ({exc}); use --eval-optimizer sgd") from None


def _test_metrics(params, split):
    with torch.no_grad():
        z = models.forward(params, split.x_test)
        acc = (z.argmax(-1) == split.y_test).to(torch.float64).mean(-1)
        p = models.one_hot(split.y_test, split.n_classes, z.dtype)
        loss = models.loss(params, split.x_test, p)
    return acc, loss


def train_on_set(ds, split, layers, hidden, eval_models, strategy, gen, optimizer="sgd", strategy2_decay=0.9,
                 record_every=0):
    """Train eval_models fresh nets (batched) on ds; returns (final test acc per model, curve)."""
    dt = ds.points.dtype
    params = models.init_params(models.layer_sizes(layers, split.n_features, split.n_classes, hidden),
                                eval_models, gen, dt)
    plan = schedule(ds, strategy, strategy2_decay)
    cls = _optimizer_class(optimizer)
    curve = []
    if cls is None:
        for t, (i, lr) in enumerate(plan):
            if optimizer == "implicit":  # IB: the same plain step, on the implicit gradient
                g = models.implicit_grad(params, ds.points[i], ds.labels[i], lr)
            else:
                _, g, _ = models.loss_and_grad(params, ds.points[i], ds.labels[i], need_value=False)
            params = torch._foreach_add(params, g, alpha=-lr)
            if record_every and (t % record_every == 0 or t == len(plan) - 1):
                acc, loss = _test_metrics(params, split)
                curve.append((t + 1, float(acc.mean()), float(loss.mean())))
    else:
        params = [p.clone().requires_grad_() for p in params]
        # the five-probe optimizer starts at the plan's first rate and then adapts its own: the
        # distilled rates after the first are not imposed on it
        opt = cls(params, lr=plan[0][1])
        for t, (i, _lr) in enumerate(plan):
            opt.zero_grad()
            models.loss(params, ds.points[i], ds.labels[i]).sum().backward()

            def closure(i=i):  # re-evaluates only; the gradient came from the backward above
                return models.loss(params, ds.points[i], ds.labels[i]).sum()

            opt.step(closure)
            if record_every and (t % record_every == 0 or t == len(plan) - 1):
                acc, loss = _test_metrics([p.detach() for p in params], split)
                curve.append((t + 1, float(acc.mean()), float(loss.mean())))
        params = [p.detach() for p in params]
    acc, _ = _test_metrics(params, split)
    return acc.tolist(), curve, params


def train_on_sets(sets, split, layers, hidden, eval_models, strategy, gen, strategy2_decay=0.9, record_every=0):
    """``train_on_set`` with plain SGD for R sets at once: their R x eval_models nets in one stacked loop.

    Each set's initialisations are drawn from gen in the order R one-at-a-time calls would draw them.
    Returns (final test acc of each set's nets, R lists; curve of the first set; the first set's nets).
    """
    R, e = len(sets), eval_models
    dt = sets[0].points.dtype
    sizes = models.layer_sizes(layers, split.n_features, split.n_classes, hidden)
    params = [torch.cat(ts, 0) for ts in zip(*[models.init_params(sizes, e, gen, dt) for _ in sets])]
    plans = [schedule(ds, strategy, strategy2_decay) for ds in sets]
    steps = [i for i, _ in plans[0]]  # which synthetic step comes when depends on the shapes only
    neg = models.model_rates(torch.tensor([[lr for _, lr in plan] for plan in plans], dtype=dt), e, params)
    xs = models.per_model(torch.stack([ds.points for ds in sets]), e)   # R*e x s x B x d
    ps = models.per_model(torch.stack([ds.labels for ds in sets]), e)
    curve = []
    for t, i in enumerate(steps):
        _, g, _ = models.loss_and_grad(params, xs[:, i], ps[:, i], need_value=False)
        params = torch._foreach_addcmul(params, g, neg[t])
        if record_every and (t % record_every == 0 or t == len(steps) - 1):
            acc, loss = _test_metrics([q[:e] for q in params], split)
            curve.append((t + 1, float(acc.mean()), float(loss.mean())))
    acc, _ = _test_metrics(params, split)
    return acc.view(R, e).tolist(), curve, [q[:e] for q in params]


def train_whole(split, layers, hidden, eval_models, gen, steps=500, lr=0.05, dtype=torch.float32):
    """The 'original' row: full-batch Adam on the whole training part."""
    params = [p.requires_grad_() for p in models.init_params(
        models.layer_sizes(layers, split.n_features, split.n_classes, hidden), eval_models, gen, dtype)]
    opt = torch.optim.Adam(params, lr=lr)
    x = split.x_train.to(dtype)
    p = models.one_hot(split.y_train, split.n_classes, dtype)
    for _ in range(steps):
        opt.zero_grad()
        models.loss(params, x, p).sum().backward()
        opt.step()
    params = [q.detach() for q in params]
    return _test_metrics(params, split)[0].tolist(), params


def _mean_std(values):
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def evaluate(sets, split, config, progress=False):
    """Accuracy table: rows (data, strategy), columns test architectures; mean +- std over restarts.

    With a single restart the spread is over the --eval-models fresh initialisations instead.
    Returns {"rows": [(label, {layers: (mean, std)})], "curves": {...}, "per_model": {...}}.
    """
    with models.one_thread():
        return _evaluate(sets, split, config)


def _evaluate(sets, split, config):
    test_archs = config.eval_arch or [1, 2, 4]
    dt = sets[0].points.dtype
    gen = torch.Generator().manual_seed(config.seed + 12345)
    label = "+".join(str(a) for a in config.arch) + "-layer"
    rows, curves, raw, trained = [], {}, {}, {}
    whole = {}
    for a in test_archs:
        accs, trained[f"{a}-layer, whole data"] = train_whole(split, a, config.hidden, config.eval_models * len(sets), gen,
                              steps=config.baseline_steps, dtype=dt)
        whole[a] = _mean_std(accs)
        raw[("original", a)] = accs
    rows.append(("original", whole))
    for strategy in config.strategies:
        cells = {}
        for a in test_archs:
            # restart 0's curve only: a point every 1% of its schedule
            record = max(1, len(schedule(sets[0], strategy, config.strategy2_decay)) // 100)
            if config.eval_optimizer == "sgd":
                accs, curve, params = train_on_sets(sets, split, a, config.hidden, config.eval_models, strategy,
                                                    gen, config.strategy2_decay, record)
            else:  # the optimiser classes step one stack of nets at a time
                accs, curve, params = [], None, None
                for r, ds in enumerate(sets):
                    acc, c, p = train_on_set(ds, split, a, config.hidden, config.eval_models, strategy, gen,
                                             config.eval_optimizer, config.strategy2_decay, record if r == 0 else 0)
                    accs.append(acc)
                    if r == 0:
                        curve, params = c, p
            per_restart = [statistics.fmean(acc) for acc in accs]
            all_models = [v for acc in accs for v in acc]
            curves[(strategy, a)] = curve
            if strategy == config.strategies[0]:
                trained[f"{a}-layer, distilled (strategy {strategy})"] = params
            cells[a] = _mean_std(per_restart if len(sets) > 1 else all_models)
            raw[(strategy, a)] = all_models
        name = label if strategy == 0 else f"{STRATEGY_NAMES[strategy]} + {label}"
        rows.append((name, cells))
    return {"rows": rows, "curves": curves, "per_model": raw, "trained": trained, "test_archs": test_archs,
            "spread": "restarts" if len(sets) > 1 else "eval models"}


def results_markdown(result, config, wall_s=None):
    archs = result["test_archs"]
    best = {a: max(cells[a][0] for _, cells in result["rows"]) for a in archs}
    lines = ["| Data \\ Test models | " + " | ".join(f"{a}-layer" for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for name, cells in result["rows"]:
        out = []
        for a in archs:
            m, s = cells[a]
            txt = f"{m:.3f} ± {s:.3f}"
            out.append(f"**{txt}**" if m == best[a] else txt)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    src = f"--csv {config.csv} --target {config.target}" if config.csv else f"--dataset {config.dataset}"
    notes = [f"Test accuracy, mean ± std over {result['spread']} ({config.restarts} restart(s), "
             f"{config.eval_models} fresh models per test architecture). Data: {src}. "
             f"Distilled for {'+'.join(str(a) for a in config.arch)}-layer internal models, "
             f"{config.steps} steps × {config.epochs} epochs × {config.per_class} per class, "
             f"{config.outer_epochs} outer epochs, hypergradient {config.hypergrad}, "
             f"evaluation optimizer {config.eval_optimizer}. 'original': full-batch Adam "
             f"({config.baseline_steps} steps) on the whole training part. Bold: best in the column."]
    if wall_s is not None:
        notes.append(f"Wall time: {wall_s:.1f} s.")
    return "# Results\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
