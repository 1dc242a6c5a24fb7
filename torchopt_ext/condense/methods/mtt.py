"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

Experts (condense/experts.py): E nets trained on the real training part by plain SGD, their parameters
theta*_0 .. theta*_T saved after every epoch and cached on disk. Each iteration draws an expert and a start
epoch t uniformly from 0..max_start_epoch, takes N student steps on the synthetic images from theta*_t,

    theta_{k+1} = theta_k - alpha grad l(f_{theta_k}(x~_B(k)), y~_B(k)),   theta_0 = theta*_t,

on minibatches B(k) of ``batch_syn`` images (consecutive chunks of concatenated random permutations of the
set, so each image is used once per pass), and minimises

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2    (sums over all parameters)

over the images and the step size by SGD with momentum 0.5 (the reference's optimiser). The gradient is the
reverse-loop unroll of condense/unroll.py (``checkpoint_every`` trades recomputation for memory); alpha =
exp(a) is log-parametrised, so a step on a changes alpha by a fixed ratio and alpha stays positive.
Labels are fixed one-hot, ipc images per class, class-major; images start from random real ones
(``init="noise"``: N(0, 1) in the standardised space).

Options (``config.mtt_<name>``, flags ``--mtt-<name>``): :class:`MTTOptions`. Defaults: 5 experts of 15
epochs at lr 0.1, N = 10, M = 2, max_start_epoch min(10, max(5, ipc)), 100 iterations, batch_syn 50, pixel
lr 100, lr 0.01 on log alpha, alpha from the experts' lr. The reference code's defaults: 100 experts of 50
epochs at lr 0.01 (momentum 0, DSA), N = 20, M = 3, max_start_epoch 25, 5000 iterations, the whole set per
step, pixel lr 1000 on ZCA-whitened CIFAR, lr 1e-5 on alpha itself (the paper tunes N, M, max_start_epoch
and the lrs per dataset and ipc).

Differs from the paper: defaults sized for a CPU and 8x8 digits (few experts, short trajectories, few
iterations; an epoch of digits is 5 steps against CIFAR's 196, hence the experts' larger lr); no
augmentation (the ``augment`` hook of :func:`distill` takes one); alpha is log-parametrised; the start epoch
is drawn from 0..max_start_epoch inclusive (the reference draws t < max_start_epoch); the evaluation trains
with the pipeline's fixed protocol, not at the learned alpha.

SyntheticSet: images (K ipc, C, H, W), one-hot labels, ``lrs`` = alpha repeated R = ceil(N T / M) times with
``meta["steps"] = 1``: ``--use-learned-lrs`` replays R plain SGD steps of alpha on the whole set from a fresh
initialisation, the student's pace over as many epochs as an expert trains (T = train_epochs). ``meta``:
options, losses, alpha and [expert, t] per iteration, the experts' record (folder, test accuracies,
trained / reused, seconds), ``peak_state_bytes`` (the most parameter copies the unroll held in one
iteration, in bytes) next to ``param_bytes`` (one copy), and the seconds of distillation and of the experts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from torchopt_ext.condense import experts as E
from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError

MOMENTUM = 0.5   # the reference's SGD momentum on the images and on the step size
INITS = ("real", "noise")


@dataclass
class MTTOptions:
    """MTT's settings; each is read from the run config as ``mtt_<name>`` (CLI ``--mtt-<name>``)."""
    experts: int = 5                # E: expert trajectories, trained once and cached
    train_epochs: int = 15          # T: epochs of each expert, its parameters saved after each
    expert_lr: float = 0.1          # the experts' SGD lr (momentum 0)
    expert_batch: int = 256         # real images per expert step
    experts_dir: str = ""           # cache folder of the trajectories ('': OUT/experts inside the grid's --out)
    syn_steps: int = 10             # N: student steps per iteration
    expert_epochs: int = 2          # M: the student's target is theta*_{t+M}
    max_start_epoch: Optional[int] = None  # t is drawn from 0..max_start_epoch (None: min(10, max(5, ipc)))
    iterations: int = 100           # SGD steps on the images and alpha
    batch_syn: Optional[int] = 50   # images per student step (the whole set when it has fewer)
    lr_img: float = 100.0           # SGD lr (momentum 0.5) on the images
    lr_lr: float = 0.01             # SGD lr (momentum 0.5) on log alpha
    lr_init: Optional[float] = None  # alpha's start (None: expert_lr)
    init: str = "real"              # real | noise: what the images start from
    checkpoint_every: Optional[int] = None  # K of the unroll's checkpointing (None: keep every student step)

    @classmethod
    def from_config(cls, config, prefix: str = "mtt") -> "MTTOptions":
        defaults = cls()
        return cls(**{f.name: getattr(config, f"{prefix}_{f.name}", getattr(defaults, f.name))
                      for f in dataclasses.fields(cls)}).validate()

    def validate(self) -> "MTTOptions":
        def need(ok, name, expected, got):
            if not ok:
                raise DistillError(f"--mtt-{name.replace('_', '-')}: expected {expected}, got {got!r}")

        def integer(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def positive(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

        for name in ("experts", "train_epochs", "expert_batch", "syn_steps", "expert_epochs", "iterations"):
            need(integer(getattr(self, name), 1), name, "an integer >= 1", getattr(self, name))
        need(self.max_start_epoch is None or integer(self.max_start_epoch, 0), "max_start_epoch",
             "an integer >= 0 or none", self.max_start_epoch)
        for name in ("batch_syn", "checkpoint_every"):
            v = getattr(self, name)
            need(v is None or integer(v, 1), name, "an integer >= 1 or none", v)
        for name in ("expert_lr", "lr_img", "lr_lr"):
            need(positive(getattr(self, name)), name, "a finite number > 0", getattr(self, name))
        need(self.lr_init is None or positive(self.lr_init), "lr_init", "a finite number > 0 or none", self.lr_init)
        need(self.init in INITS, "init", " or ".join(INITS), self.init)
        need(isinstance(self.experts_dir, str), "experts_dir", "a folder", self.experts_dir)
        if (self.max_start_epoch or 0) + self.expert_epochs > self.train_epochs:
            raise DistillError(f"--mtt-max-start-epoch + --mtt-expert-epochs: expected at most --mtt-train-epochs "
                               f"({self.train_epochs}), the experts' length; got {self.max_start_epoch or 0} + "
                               f"{self.expert_epochs}")
        return self

    def max_start(self, ipc: int) -> int:
        """The last start epoch: max_start_epoch, or by default min(10, max(5, ipc)) within the trajectory
        (one image per class cannot follow an expert far into training; larger sets gain from later starts)."""
        if self.max_start_epoch is not None:
            return self.max_start_epoch
        return min(10, max(5, ipc), self.train_epochs - self.expert_epochs)

    @property
    def alpha0(self) -> float:
        return self.expert_lr if self.lr_init is None else self.lr_init

    @property
    def replay_steps(self) -> int:
        """R: student steps of alpha that cover an expert's T epochs at the matched pace of N steps per M."""
        return math.ceil(self.syn_steps * self.train_epochs / self.expert_epochs)


def experts_root(opts: MTTOptions, config) -> str:
    """--mtt-experts-dir, else OUT/experts of the grid running this method (``config.out``)."""
    if opts.experts_dir:
        return opts.experts_dir
    out = getattr(config, "out", None)
    if not out:
        raise DistillError("--mtt-experts-dir: expected a folder for the expert trajectories (the default, "
                           "OUT/experts, needs the grid's --out)")
    return os.path.join(out, "experts")


def squared_distance(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> torch.Tensor:
    """||a - b||^2 summed over every parameter (the names of ``b``)."""
    return sum(((a[k] - b[k]) ** 2).sum() for k in b)


def normalised_distance(theta: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor],
                        target: Dict[str, torch.Tensor]) -> torch.Tensor:
    """MTT's loss ||theta - target||^2 / ||start - target||^2; dicts name -> tensor of one net."""
    return squared_distance(theta, target) / squared_distance(start, target)


def student_batches(m: int, steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch) image indices: consecutive chunks of concatenated random permutations of range(m)."""
    passes = math.ceil(steps * batch / m)
    return torch.cat([torch.randperm(m, generator=generator) for _ in range(passes)])[:steps * batch].view(steps, batch)


def epoch_params(trajectory: E.Trajectory, t: int) -> Dict[str, torch.Tensor]:
    """theta*_t of one expert."""
    return {k: v[t] for k, v in trajectory.items()}


def match_gradient(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, log_alpha: torch.Tensor,
                   start: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], idx: torch.Tensor,
                   opts: MTTOptions, augment: Optional[E.Augment] = None,
                   generator: Optional[torch.Generator] = None, stats: Optional[dict] = None) -> float:
    """L of one iteration: N = idx.shape[0] student steps from ``start`` on images[idx[k]] (M, C, H, W) with
    labels[idx[k]] (M, K) at rate exp(log_alpha), against ``target``; adds dL/d images and dL/d log_alpha to
    their .grad (by the reverse-loop unroll, ``opts.checkpoint_every``). ``stats`` gets the unroll's stats.
    Raises FloatingPointError when L or a gradient is not finite."""
    n = idx.shape[0]

    def batches():
        x = images[idx]
        if augment is not None:
            x = torch.stack([augment(xk, generator) for xk in x])
        return x, labels[idx]
    return B.hypergradient(net, [start], lambda theta: normalised_distance(theta, start, target), batches,
                           lambda: log_alpha.exp().expand(n), opts, stats=stats)


def prepare(data: ImageData, config, progress: bool = False):
    """Every mtt cell's experts, trained before the cells and spread over the ranks of a torchrun (each cell then
    reads them from the cache)."""
    opts = MTTOptions.from_config(config)
    E.expert_trajectories(data, config, opts.experts, opts.train_epochs, opts.expert_lr, opts.expert_batch,
                          experts_root(opts, config), progress=progress, spread=True)


@register("mtt", options=MTTOptions, prepare=prepare)
def mtt(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    return distill(data, ipc, config, generator, progress)


def distill(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False,
            augment: Optional[E.Augment] = None, augment_name: Optional[str] = None) -> SyntheticSet:
    """MTT's synthetic set (module docstring). ``augment(x, generator)``, when given, transforms the real
    batches of the experts and every student batch (a fresh differentiable draw each); ``augment_name``
    keys the experts' cache."""
    opts = MTTOptions.from_config(config)
    classes = B.class_layout(data.n_classes, ipc, 1)[0]
    t0 = time.perf_counter()
    trajectories, record = E.expert_trajectories(
        data, config, opts.experts, opts.train_epochs, opts.expert_lr, opts.expert_batch,
        experts_root(opts, config), augment, augment_name, progress)
    t1 = time.perf_counter()
    dt = data.x_train.dtype
    if opts.init == "real":
        x0 = B.real_images(data, classes, generator)
    else:
        x0 = torch.randn((classes.numel(),) + data.shape, generator=generator, dtype=torch.float64).to(dt)
    images = x0.clone().requires_grad_()
    labels = torch.nn.functional.one_hot(classes, data.n_classes).to(dt)
    log_alpha = torch.tensor(math.log(opts.alpha0), dtype=dt).requires_grad_()
    opt = torch.optim.SGD([{"params": [images], "lr": opts.lr_img}, {"params": [log_alpha], "lr": opts.lr_lr}],
                          momentum=MOMENTUM)
    net = E.key_net(record.pop("key"), data)   # the architecture: the student's parameters are passed to it
    m, n = images.shape[0], opts.syn_steps
    batch = min(opts.batch_syn or m, m)
    last = opts.max_start(ipc)
    losses, alphas, starts, peak = [], [], [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.iterations, desc=f"mtt ipc {ipc}", unit="it", leave=False)
    try:
        for it in range(opts.iterations):
            e = int(torch.randint(len(trajectories), (1,), generator=generator))
            t = int(torch.randint(last + 1, (1,), generator=generator))
            starts.append([e, t])
            start, target = epoch_params(trajectories[e], t), epoch_params(trajectories[e], t + opts.expert_epochs)
            idx = student_batches(m, n, batch, generator)
            stats = {}
            opt.zero_grad(set_to_none=True)
            try:
                losses.append(match_gradient(net, images, labels, log_alpha, start, target, idx, opts, augment,
                                             generator, stats))
            except FloatingPointError as exc:
                raise DistillError(f"mtt: {exc} at iteration {it}; try a lower --mtt-lr-img or --mtt-lr-lr") from None
            opt.step()
            alphas.append(float(log_alpha.detach().exp()))
            peak = max(peak, stats["peak_state_bytes"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", alpha=f"{alphas[-1]:.4g}",
                                mem=f"{stats['peak_state_bytes'] / 2 ** 20:.1f}MB")
    finally:
        if bar is not None:
            bar.close()
    alpha = log_alpha.detach().exp()
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    meta = {"method": "mtt", "ipc": ipc, "options": dataclasses.asdict(opts), "losses": losses, "alphas": alphas,
            "starts": starts, "alpha": float(alpha), "experts": record, "peak_state_bytes": peak,
            "param_bytes": param_bytes, "steps": 1, "replay_steps": opts.replay_steps,
            "layout": "ipc images of class 0, then class 1, ...; lrs: alpha repeated replay_steps times, each a "
                      "plain SGD step on the whole set",
            "seconds": time.perf_counter() - t1, "expert_seconds": t1 - t0}
    return SyntheticSet(images.detach().clone(), labels, alpha.repeat(opts.replay_steps), meta)
