"""AdaptiveLRSGD against fixed-lr SGD and the learning-rate-free optimizers, on sklearn digits.

    python -m torchopt_ext.compare.lr_free --out runs/lr_free            # the full grid
    python -m torchopt_ext.compare.lr_free --out /tmp/t --tiny           # seconds, a smoke run
    python -m torchopt_ext.compare.lr_free --adaptive-kwargs '{"eps": 1e-3}' --optimizers adaptive,sgd

Digits pixels scaled to [0, 1] (pixel/16), a fixed seeded 2:1 train/test split (``data.digits``),
batch 64, 5 epochs (an epoch is one pass over the training set in a per-seed shuffled order, the
last batch partial), seeds 0-9, initial lr in 1e-4 ... 1, three models (logistic regression, a
64-64 ReLU MLP, a small ConvNet), each built from the seed so every optimizer starts from the same
weights and sees the same batches.

An optimizer is one ``OPTIMIZERS`` entry (factory, step function, what "initial lr" sets).
AdaptiveLRSGD's constructor arguments come from one place: ``ADAPTIVE_KWARGS`` updated by
``--adaptive-kwargs`` (JSON). Writes under ``--out``: ``runs.json`` (every run; a rerun skips
runs whose config, which includes the optimizer's code fingerprint or package version, is already
there), ``results.md`` (tables and the issue's verdict for adaptive) and ``adaptive_<model>.png``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from torchopt_ext._atomic import atomic_open
from torchopt_ext.compare.data import digits

LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TINY_LRS = (1e-2, 1.0)
EPOCHS = 5
BATCH = 64
SEEDS = 10
TINY_STEPS = 3
# bump when the training loop or the recorded quantities change, so old runs.json entries rerun
HARNESS_VERSION = 1

# the verdict's criteria (the numbers)
LOSS_RATIO = 1.5  # (c) adaptive's median final loss within this factor of the best fixed-lr SGD's
ACC_FLOOR = 0.5  # (b) every adaptive run reaches this training accuracy
ZONE_RATIO = 2.0  # logistic: settled etas from all initial lrs within this max/min ratio = one zone
DEAD_STD = 1e-6  # logits whose std across samples is below this for every class are constant

ADAPTIVE_KWARGS: Dict = {}  # AdaptiveLRSGD's keyword arguments besides lr; empty = its defaults


# -- models ------------------------------------------------------------------------------------

def logistic(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


MODELS = {"logistic": logistic, "mlp": mlp, "convnet": convnet}


# -- optimizers --------------------------------------------------------------------------------

def _noop(opt) -> None:
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    """``make(params, lr0, kwargs)`` builds it; ``step(opt, closure)`` is called after
    ``loss.backward()`` (``closure()`` returns the batch's per-sample losses without backward) and
    returns the step size this step used; ``train``/``eval`` switch optimizers that keep two
    iterates (schedule-free) before training and before evaluation."""

    make: Callable
    step: Callable
    knob: str  # what the grid's "initial lr" sets, and why, for results.md
    package: Optional[str] = None  # import name of the package it needs (None: torch / torchopt_ext)
    dist: Optional[str] = None  # its pip name, for the version in the run config
    train: Callable = field(default=_noop)
    eval: Callable = field(default=_noop)


def _make_adaptive(params, lr, kwargs):
    from torchopt_ext.optim import AdaptiveLRSGD

    return AdaptiveLRSGD(params, lr=lr, **{**ADAPTIVE_KWARGS, **kwargs})


def _step_adaptive(opt, closure):
    eta = float(opt.param_groups[0]["lr"])  # the eta this step uses; step() writes the next one
    opt.step(closure)
    return eta


def _step_plain(opt, closure):
    opt.step()
    return float(opt.param_groups[0]["lr"])


def _step_dadapt(opt, closure):
    d = opt.param_groups[0]["d"]  # the step uses d from before its own update of d
    opt.step()
    group = opt.param_groups[0]
    return float(d * group["lr"] / group["g0_norm"])


def _step_prodigy(opt, closure):
    d = opt.param_groups[0]["d"]
    opt.step()
    return float(d * opt.param_groups[0]["lr"])


def _step_schedulefree(opt, closure):
    opt.step()
    return float(opt.param_groups[0]["scheduled_lr"])


def _step_dog(opt, closure):
    opt.step()
    return float(opt.param_groups[0]["eta"][0])


def _import(name):
    return importlib.import_module(name)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    "adaptive": OptimizerSpec(
        make=_make_adaptive, step=_step_adaptive,
        knob="`lr` (the initial eta), other arguments from `ADAPTIVE_KWARGS` / `--adaptive-kwargs`"),
    "sgd": OptimizerSpec(
        make=lambda params, lr, kw: torch.optim.SGD(params, lr=lr, **kw), step=_step_plain,
        knob="`lr`, fixed"),
    "dadapt_sgd": OptimizerSpec(
        make=lambda params, lr, kw: _import("dadaptation").DAdaptSGD(params, **{"lr": 1.0, "d0": lr, **kw}),
        step=_step_dadapt, package="dadaptation", dist="dadaptation",
        knob="`d0` (initial distance estimate; the first step is d0·g/‖g0‖), `lr=1` as its authors "
             "intend (lr only scales the learned step)"),
    "prodigy": OptimizerSpec(
        make=lambda params, lr, kw: _import("prodigyopt").Prodigy(params, **{"lr": 1.0, "d0": lr, **kw}),
        step=_step_prodigy, package="prodigyopt", dist="prodigyopt",
        knob="`d0` (initial D estimate; Adam-like, so d0 is the first per-coordinate step), `lr=1` as its "
             "authors intend"),
    "schedulefree_sgd": OptimizerSpec(
        make=lambda params, lr, kw: _import("schedulefree").SGDScheduleFree(params, **{"lr": lr, **kw}),
        step=_step_schedulefree, package="schedulefree", dist="schedulefree",
        train=lambda opt: opt.train(), eval=lambda opt: opt.eval(),
        knob="`lr` (it removes the schedule, not the lr; momentum 0.9, no warmup: its defaults); "
             "evaluated at its averaged x (`opt.eval()`)"),
    "dog": OptimizerSpec(
        make=lambda params, lr, kw: _import("dog").DoG(params, **{"reps_rel": lr, **kw}),
        step=_step_dog, package="dog", dist="dog-optimizer",
        knob="`reps_rel` (its only knob: the first step moves reps_rel·(1+‖x0‖)), `lr=1` (the package "
             "advises against changing it); raw iterates, no averaging"),
}


def available(name: str) -> bool:
    pkg = OPTIMIZERS[name].package
    try:
        return pkg is None or importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules (None) raises ValueError
        return False


def _fingerprint(name: str) -> str:
    """What identifies the optimizer's code in a run's config: a package's version, or for
    torchopt_ext's AdaptiveLRSGD a hash of its module's source (it changes while being redesigned)."""
    spec = OPTIMIZERS[name]
    if spec.dist is not None:
        from importlib.metadata import version

        return f"{spec.dist}=={version(spec.dist)}"
    if name == "adaptive":
        from torchopt_ext.optim import adaptive_lr
        from torchopt_ext.ops import probe

        src = "".join(inspect.getsource(m) for m in (adaptive_lr, probe))
        return "adaptive_lr.py+probe.py sha256:" + hashlib.sha256(src.encode()).hexdigest()[:16]
    return f"torch=={torch.__version__}"


# -- one run -----------------------------------------------------------------------------------

def dead_logits(logits: torch.Tensor) -> bool:
    """Constant predictions: one argmax for every sample, every logit's std across samples below
    ``DEAD_STD``, or non-finite logits."""
    if not torch.isfinite(logits).all():
        return True
    if logits.argmax(1).unique().numel() == 1:
        return True
    return bool(logits.std(0).max() < DEAD_STD)


@torch.no_grad()
def is_dead(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``net`` predicts a constant on ``x`` (``dead_logits``)."""
    return dead_logits(net(x))


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    logits = net(x)
    return {"loss": float(nn.functional.cross_entropy(logits.double(), y)),
            "acc": float((logits.argmax(1) == y).double().mean()), "dead": dead_logits(logits)}


def _g(v: float) -> float:
    return float(f"{v:.5g}")  # five digits are plenty for curves and keep runs.json small


def settled(etas: Sequence[float]) -> float:
    """The eta a run settles at: the median over its last 20% of steps."""
    tail = list(etas)[-max(1, len(etas) // 5):]
    return float(statistics.median(tail)) if tail else float("nan")


def train_run(config: dict, data) -> dict:
    """Train ``config["model"]`` with ``config["optimizer"]`` from ``config["lr"]``; returns the
    run's record (config plus results)."""
    x, y, xt, yt = data
    net = MODELS[config["model"]](config["seed"])
    spec = OPTIMIZERS[config["optimizer"]]
    opt = spec.make(net.parameters(), config["lr"], dict(config["kwargs"]))
    lossf = nn.CrossEntropyLoss(reduction="none")
    g = torch.Generator().manual_seed(config["seed"])
    max_steps = config["max_steps"]
    losses: List[float] = []
    etas: List[float] = []
    t0 = time.perf_counter()
    net.train()
    spec.train(opt)
    for _ in range(config["epochs"]):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), config["batch"]):
            if max_steps is not None and len(losses) >= max_steps:
                break
            xb, yb = x[perm[i:i + config["batch"]]], y[perm[i:i + config["batch"]]]
            opt.zero_grad()
            loss = lossf(net(xb), yb).mean()
            loss.backward()
            losses.append(_g(loss.item()))
            etas.append(_g(spec.step(opt, lambda: lossf(net(xb), yb))))
    spec.eval(opt)
    net.eval()
    tr, te = evaluate(net, x, y), evaluate(net, xt, yt)
    return {"config": config, "key": config_key(config), "final_loss": tr["loss"], "train_acc": tr["acc"],
            "test_acc": te["acc"], "dead": tr["dead"], "settled_eta": settled(etas),
            "steps": len(losses), "seconds": round(time.perf_counter() - t0, 3), "eta": etas, "loss": losses}


def config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def make_config(model, optimizer, lr, seed, epochs, batch, max_steps, kwargs) -> dict:
    return {"model": model, "optimizer": optimizer, "lr": lr, "seed": seed, "epochs": epochs, "batch": batch,
            "max_steps": max_steps, "kwargs": kwargs, "code": _fingerprint(optimizer),
            "data": "digits/16, split seed 0, 2:1", "harness": HARNESS_VERSION}


@functools.lru_cache(maxsize=1)
def _digits():
    return digits()  # the same fixed split every call; loading it takes a noticeable fraction of a tiny run


# -- runs.json ---------------------------------------------------------------------------------

def load_runs(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["runs"]


def save_runs(path: str, runs: List[dict]) -> None:
    """Atomic: a temp file in the same folder, then ``os.replace``, so an interrupted write never
    leaves a truncated runs.json behind."""
    with atomic_open(path) as f:
        json.dump({"format": 1, "runs": runs}, f, separators=(",", ":"))


# -- summaries and the verdict -----------------------------------------------------------------

def _num(v) -> float:
    """A loss for ordering: NaN (diverged) counts as +inf."""
    v = float(v)
    return math.inf if math.isnan(v) else v


def _median(vals: Iterable) -> float:
    vals = sorted(_num(v) for v in vals)
    return float(statistics.median(vals)) if vals else math.nan


def select(runs, model=None, optimizer=None, lr=None) -> List[dict]:
    return [r for r in runs if (model is None or r["config"]["model"] == model)
            and (optimizer is None or r["config"]["optimizer"] == optimizer)
            and (lr is None or r["config"]["lr"] == lr)]


def lrs_of(runs) -> List[float]:
    return sorted({r["config"]["lr"] for r in runs})


def verdict(runs: List[dict], model: str, loss_ratio: float = LOSS_RATIO, acc_floor: float = ACC_FLOOR,
            zone_ratio: float = ZONE_RATIO) -> dict:
    """The issue's criteria for ``adaptive`` on ``model``, from ``runs`` (records as ``train_run``
    returns them; only config.model/optimizer/lr, dead, train_acc, final_loss, settled_eta are read).

    (a) no dead run; (b) every run's train accuracy >= ``acc_floor``; (c) from every initial lr, the
    median final train loss over seeds <= ``loss_ratio`` x the best fixed-lr SGD's (the lowest of
    SGD's per-lr medians); ``None`` when there are no SGD runs. Logistic regression also gets the
    zone check: the per-lr medians of the settled eta, their max/min ratio, and ratio <= ``zone_ratio``.
    """
    ad = select(runs, model, "adaptive")
    if not ad:
        raise ValueError(f"verdict: no adaptive runs for model {model!r}")
    lrs = lrs_of(ad)
    out = {"model": model, "runs": len(ad), "dead": sum(bool(r["dead"]) for r in ad)}
    out["a"] = out["dead"] == 0
    low = [r for r in ad if not (r["train_acc"] >= acc_floor)]
    out["min_train_acc"] = min(r["train_acc"] for r in ad)
    out["below_acc"] = len(low)
    out["b"] = not low
    sgd = select(runs, model, "sgd")
    per_lr = {lr: _median(r["final_loss"] for r in select(ad, lr=lr)) for lr in lrs}
    out["adaptive_median_loss"] = per_lr
    if sgd:
        sgd_med = {lr: _median(r["final_loss"] for r in select(sgd, lr=lr)) for lr in lrs_of(sgd)}
        best_lr = min(sgd_med, key=lambda lr: sgd_med[lr])
        out["best_sgd_lr"], out["best_sgd_loss"] = best_lr, sgd_med[best_lr]
        out["c_ratio"] = {lr: v / sgd_med[best_lr] if sgd_med[best_lr] > 0 else math.inf for lr, v in per_lr.items()}
        out["c_per_lr"] = {lr: v <= loss_ratio * sgd_med[best_lr] for lr, v in per_lr.items()}
        out["c"] = all(out["c_per_lr"].values())
    else:
        out["c"] = None
    if model == "logistic":
        zone = {lr: _median(r["settled_eta"] for r in select(ad, lr=lr)) for lr in lrs}
        finite = [v for v in zone.values() if 0 < v < math.inf]
        ratio = max(finite) / min(finite) if len(finite) == len(zone) else math.inf
        out["settled_eta"], out["zone_ratio"], out["one_zone"] = zone, ratio, ratio <= zone_ratio
    out["passed"] = bool(out["a"] and out["b"] and out["c"] is not False)
    return out


def _mark(ok) -> str:
    return "n/a (no sgd runs)" if ok is None else ("pass" if ok else "**FAIL**")


def _verdict_md(v: dict) -> List[str]:
    lines = [f"### Verdict for `adaptive` on {v['model']}: {'pass' if v['passed'] else '**FAIL**'}", "",
             f"- (a) no dead run: {_mark(v['a'])} ({v['dead']} of {v['runs']} runs dead)",
             f"- (b) every run train acc >= {ACC_FLOOR}: {_mark(v['b'])} ({v['below_acc']} below; "
             f"lowest {v['min_train_acc']:.3f})"]
    if v["c"] is None:
        lines.append(f"- (c) median final loss within {LOSS_RATIO}x of the best fixed-lr SGD: {_mark(None)}")
    else:
        per = ", ".join(f"{lr:g}: {v['c_ratio'][lr]:.3g}x{'' if ok else ' ✗'}" for lr, ok in v["c_per_lr"].items())
        lines.append(f"- (c) median final loss within {LOSS_RATIO}x of the best fixed-lr SGD (lr "
                     f"{v['best_sgd_lr']:g}, median {v['best_sgd_loss']:.4g}) from every initial lr: "
                     f"{_mark(v['c'])} (ratio per initial lr: {per})")
    if "settled_eta" in v:
        etas = ", ".join(f"{lr:g}: {e:.3g}" for lr, e in v["settled_eta"].items())
        lines.append(f"- settled eta (median over seeds of the median of the last 20% of steps) per initial lr: "
                     f"{etas}; max/min ratio {v['zone_ratio']:.3g}: "
                     f"{'one zone' if v['one_zone'] else '**not one zone**'} (threshold {ZONE_RATIO:g}x)")
    return lines + [""]


def _ms(vals) -> str:
    vals = [float(v) for v in vals]
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def results_markdown(runs: List[dict], header: str, dead_at_init: Optional[Dict[str, List[int]]] = None) -> str:
    """The tables and verdicts; ``dead_at_init``: {model: seeds whose untrained network is already
    constant}, so a "dead" count that only means "never left its init" can be told apart."""
    models = [m for m in MODELS if select(runs, m)]
    opts = [o for o in OPTIMIZERS if select(runs, optimizer=o)]
    out = [header, "", "What the grid's \"initial lr\" sets for each optimizer:", "",
           "| optimizer | initial lr sets | code |", "|---|---|---|"]
    for o in opts:
        out.append(f"| {o} | {OPTIMIZERS[o].knob} | {select(runs, optimizer=o)[0]['config']['code']} |")
    kw = sorted({json.dumps(r["config"]["kwargs"], sort_keys=True) for r in select(runs, optimizer="adaptive")})
    if kw:
        out += ["", f"adaptive's constructor kwargs besides lr: {', '.join(kw)}"]
    out.append("")
    for m in models:
        out += [f"## {m}", "",
                "| optimizer | initial lr | median final train loss | train acc min / median | "
                "test acc mean ± std | dead | median settled step size |",
                "|---|---|---|---|---|---|---|"]
        for o in opts:
            for lr in lrs_of(select(runs, m, o)):
                rs = select(runs, m, o, lr)
                accs = [r["train_acc"] for r in rs]
                out.append(f"| {o} | {lr:g} | {_median(r['final_loss'] for r in rs):.4g} | "
                           f"{min(accs):.3f} / {statistics.median(accs):.3f} | {_ms(r['test_acc'] for r in rs)} | "
                           f"{sum(bool(r['dead']) for r in rs)}/{len(rs)} | "
                           f"{_median(r['settled_eta'] for r in rs):.3g} |")
        out.append("")
        if dead_at_init is not None and m in dead_at_init:
            seeds = dead_at_init[m]
            out += [f"Untrained networks already dead (constant argmax) at init: "
                    f"{'seeds ' + ', '.join(map(str, seeds)) if seeds else 'none'} of this grid's seeds.", ""]
        if select(runs, m, "adaptive"):
            out += _verdict_md(verdict(runs, m))
    return "\n".join(out) + "\n"


def plot_adaptive(runs: List[dict], model: str, path: str, seed: int = 0) -> bool:
    """eta and batch loss vs step for adaptive on ``model``, one line per initial lr (``seed``);
    False when there is nothing to plot."""
    rs = [r for r in select(runs, model, "adaptive") if r["config"]["seed"] == seed]
    if not rs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(sorted(rs, key=lambda r: r["config"]["lr"])):
        label = f"lr0={r['config']['lr']:g}" + (" (dead)" if r["dead"] else "")
        ax_e.plot(r["eta"], color=f"C{k}", lw=1, label=label)
        ax_l.plot(r["loss"], color=f"C{k}", lw=1, label=label)
    ax_e.set(yscale="log", xlabel="step", ylabel="eta (param_groups[0]['lr'] used by the step)",
             title=f"{model}: adaptive eta (seed {seed})")
    ax_l.set(yscale="log", xlabel="step", ylabel="batch loss", title=f"{model}: adaptive batch loss (seed {seed})")
    ax_e.legend(fontsize=7)
    ax_l.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- the grid ----------------------------------------------------------------------------------

def _git_rev() -> str:
    """The commit of the checkout this module runs from (+ "-dirty"), or "" outside git."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("-dirty" if rev and dirty else "")


def check(models: Sequence[str], optimizers: Optional[Sequence[str]], adaptive_kwargs: Optional[dict]):
    """(optimizers, {optimizer: constructor kwargs}); ValueError for an unknown model or optimizer,
    a missing package, or adaptive kwargs its constructor rejects."""
    if optimizers is None:
        optimizers = [o for o in OPTIMIZERS if available(o)]
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {o!r}; known: {', '.join(OPTIMIZERS)}")
        if not available(o):
            raise ValueError(f"optimizer {o!r} needs the package {OPTIMIZERS[o].dist!r}: "
                             f"pip install --no-deps {OPTIMIZERS[o].dist} (or the `bench` extra)")
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    kwargs = {o: {} for o in optimizers}
    if "adaptive" in kwargs:
        # the merged kwargs go into each run's config, so editing ADAPTIVE_KWARGS also reruns
        kwargs["adaptive"] = {**ADAPTIVE_KWARGS, **(adaptive_kwargs or {})}
        try:  # fail before the grid starts, not at its first adaptive run
            OPTIMIZERS["adaptive"].make(nn.Linear(2, 2).parameters(), 0.1, kwargs["adaptive"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"AdaptiveLRSGD rejects --adaptive-kwargs {json.dumps(kwargs['adaptive'])}: {exc}") from exc
    return list(optimizers), kwargs


def run(out: str, models: Sequence[str] = tuple(MODELS), optimizers: Optional[Sequence[str]] = None,
        lrs: Sequence[float] = LRS, seeds: Sequence[int] = range(SEEDS), epochs: int = EPOCHS,
        batch: int = BATCH, max_steps: Optional[int] = None, adaptive_kwargs: Optional[dict] = None,
        progress: bool = True, checkpoint_s: float = 20.0, plots: bool = True,
        command: Optional[str] = None) -> dict:
    """Run every (model, optimizer, lr, seed) not already in ``out/runs.json`` and write the
    outputs; returns ``{"runs", "new", "files", "seconds"}``. ``optimizers=None``: every registered
    one whose package is installed; ``plots=False``: no png; ``command``: the CLI arguments, for
    results.md."""
    from tqdm import tqdm

    optimizers, kwargs = check(models, optimizers, adaptive_kwargs)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "runs.json")
    runs = load_runs(path)
    done = {r["key"] for r in runs}
    jobs = [make_config(m, o, float(lr), int(s), epochs, batch, max_steps, kwargs[o])
            for m in models for o in optimizers for lr in lrs for s in seeds]
    todo = [c for c in jobs if config_key(c) not in done]
    data = _digits()
    t0 = last = time.perf_counter()
    new = 0
    try:
        for c in tqdm(todo, desc="lr_free", unit="run", disable=not progress, file=sys.stderr):
            runs.append(train_run(c, data))
            new += 1
            if time.perf_counter() - last > checkpoint_s:
                save_runs(path, runs)
                last = time.perf_counter()
    finally:
        if new:
            save_runs(path, runs)
    seconds = time.perf_counter() - t0
    wanted = {config_key(c) for c in jobs}
    current = [r for r in runs if r["key"] in wanted]  # the report is about this grid, not older ones
    header = (f"# AdaptiveLRSGD vs SGD and learning-rate-free optimizers on digits\n\n"
              f"{len(current)} runs: models {', '.join(models)}; {epochs} epoch(s) of batch {batch}"
              f"{f', at most {max_steps} steps' if max_steps is not None else ''}; seeds "
              f"{', '.join(map(str, seeds))}; initial lr {', '.join(f'{lr:g}' for lr in lrs)}. Final loss and "
              f"accuracies on the whole set after training (eval mode); dead = constant predictions on the "
              f"training set.\n\n"
              f"{f'Command: `python -m torchopt_ext.compare.lr_free {command}`; ' if command is not None else ''}"
              f"{f'commit {rev}; ' if (rev := _git_rev()) else ''}this call ran {new} new run(s) in "
              f"{seconds:.0f} s on {torch.get_num_threads()} thread(s), torch {torch.__version__}; the "
              f"{len(current)} runs' own training and evaluation took {sum(r['seconds'] for r in current):.0f} s "
              f"in all.")
    x = _digits()[0]
    dead_at_init = {m: [s for s in seeds if is_dead(MODELS[m](s), x)] for m in models}
    files = [path]
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(results_markdown(current, header, dead_at_init))
    files.append(md)
    for m in models if plots else ():
        png = os.path.join(out, f"adaptive_{m}.png")
        if plot_adaptive(current, m, png, seed=min(seeds)):
            files.append(png)
    return {"runs": current, "new": new, "files": files, "seconds": seconds}


# -- command line ------------------------------------------------------------------------------

def _list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> List[int]:
    """``10``: seeds 0-9; ``3-7``: 3..7; ``0,4,5``: those."""
    if "," in text:
        return [int(t) for t in _list(text)]
    if "-" in text:
        a, b = text.split("-", 1)
        return list(range(int(a), int(b) + 1))
    return list(range(int(text)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchopt_ext.compare.lr_free",
        description=__doc__.split("\n\n")[0] + " Writes runs.json, results.md and adaptive_<model>.png under --out.")
    p.add_argument("--out", default="runs/lr_free", help="output folder (default runs/lr_free); runs already in its runs.json are skipped")
    p.add_argument("--seeds", default=None,
                   help=f"N (seeds 0..N-1), A-B or A,B,C (default {SEEDS}; --tiny: 1)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the training set (default {EPOCHS}; --tiny: 1)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    p.add_argument("--lrs", default=None, help="comma-separated initial lrs (default "
                   f"{','.join(f'{x:g}' for x in LRS)}; --tiny: {','.join(f'{x:g}' for x in TINY_LRS)})")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated, of {', '.join(OPTIMIZERS)} (default: all whose package is installed)")
    p.add_argument("--adaptive-kwargs", default="{}",
                   help="JSON object of AdaptiveLRSGD keyword arguments besides lr, e.g. '{\"eps\": 1e-3}' (default {}: its defaults)")
    p.add_argument("--max-steps", type=int, default=None, help=f"stop each run after this many steps (--tiny: {TINY_STEPS})")
    p.add_argument("--tiny", action="store_true",
                   help=f"a seconds-long smoke run: 1 seed, lrs {TINY_LRS}, {TINY_STEPS} steps (explicit options win)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        adaptive_kwargs = json.loads(args.adaptive_kwargs)
        if not isinstance(adaptive_kwargs, dict):
            raise ValueError("not a JSON object")
        seeds = _seeds(args.seeds) if args.seeds is not None else ([0] if args.tiny else list(range(SEEDS)))
        lrs = [float(x) for x in _list(args.lrs)] if args.lrs is not None else list(TINY_LRS if args.tiny else LRS)
    except ValueError as exc:
        print(f"lr_free: bad --adaptive-kwargs, --seeds or --lrs: {exc}", file=sys.stderr)
        return 2
    epochs = args.epochs if args.epochs is not None else (1 if args.tiny else EPOCHS)
    max_steps = args.max_steps if args.max_steps is not None else (TINY_STEPS if args.tiny else None)
    optimizers = _list(args.optimizers) if args.optimizers is not None else None
    if not seeds or not lrs or epochs < 1:
        print("lr_free: need at least one seed, one lr and one epoch", file=sys.stderr)
        return 2
    try:
        check(_list(args.models), optimizers, adaptive_kwargs)
    except ValueError as exc:
        print(f"lr_free: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: a second thread costs more than it gives on shared cores
    try:
        res = run(args.out, _list(args.models), optimizers, lrs, seeds, epochs, args.batch, max_steps,
                  adaptive_kwargs, progress=not args.no_progress,
                  command=" ".join(sys.argv[1:] if argv is None else argv))
    finally:
        torch.set_num_threads(threads)
    print(f"lr_free: {res['new']} new run(s) in {res['seconds']:.1f} s, {len(res['runs'])} in the report; "
          f"wrote {', '.join(res['files'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
