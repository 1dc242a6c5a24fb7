"""The outer loop shared by the unroll methods (dd, ld, gtn): Adam on whatever makes the synthetic batches.

Each outer iteration draws ``models`` initialisations theta_0 (or reuses fixed ones) and a real batch, builds
the synthetic batches x~ (s, B, C, H, W), y~ (s, B, K) from the method's learned tensors with autograd on,
takes the hypergradient of L = mean_j CE(f_{theta_n^(j)}(x_real), y_real) from condense.unroll and pushes it
back through x~, y~ and eta = softplus(rho) into the learned tensors (images, label logits, a generator).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from torchopt_ext.condense import unroll as U
from torchopt_ext.condense.types import ImageData
from torchopt_ext.distill.config import DistillError


_UNSET = object()


@dataclass
class BilevelOptions:
    """What the three methods share; each reads them from the config as ``<method>_<name>``."""
    steps: int = 1                 # s: synthetic batches, each with ipc images per class
    epochs: int = 10               # passes over the s batches: n = steps * epochs inner steps
    outer_iters: int = 200         # outer (Adam) iterations
    outer_lr: float = 0.01         # Adam's step on the images (or the generator)
    label_lr: float = 0.01         # Adam's step on the label logits
    lr_lr: float = 0.01            # Adam's step on rho, eta = softplus(rho)
    lr_init: float = 0.1           # eta of every inner step at the start
    learn_lrs: bool = True         # learn one eta per inner step
    soft_labels: bool = False      # learn labels: y~ = softmax(logits), logits start near one-hot
    models: int = 1                # internal nets per outer iteration (L averaged over them)
    fixed_init: bool = False       # draw the nets' theta_0 once and keep them
    batch_real: int = 256          # real images per outer iteration (all when the set is smaller)
    checkpoint_every: Optional[int] = None   # K of the unroll's checkpointing (None: keep every theta_k)
    width: Optional[int] = 64      # channels (mlp: units) of the inner net that learns; None: --width

    @classmethod
    def from_config(cls, config, prefix: str):
        """Options from ``config.<prefix>_<name>`` where present, else the defaults above."""
        values = {f.name: getattr(config, f"{prefix}_{f.name}", _UNSET) for f in dataclasses.fields(cls)}
        opts = cls(**{k: v for k, v in values.items() if v is not _UNSET})   # an explicit None is kept
        opts.validate(prefix)
        return opts

    def validate(self, prefix: str):
        for name in ("steps", "epochs", "outer_iters", "models", "batch_real"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DistillError(f"--{prefix}-{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("outer_lr", "label_lr", "lr_lr", "lr_init"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise DistillError(f"--{prefix}-{name.replace('_', '-')}: expected a positive number, got {v!r}")
        for name in ("checkpoint_every", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DistillError(f"--{prefix}-{name.replace('_', '-')}: expected a positive integer or None, "
                                   f"got {v!r}")

    @property
    def n(self) -> int:
        return self.steps * self.epochs


def build_net(config, data: ImageData, width: Optional[int] = None, name: Optional[str] = None) -> torch.nn.Module:
    """Architecture ``name`` (None: config.net; its .depth) with ``width`` channels (None: config.width), in the
    data's dtype."""
    from torchopt_ext.condense.nets import make_net
    net = make_net(name or getattr(config, "net", "convnet"), data.shape, data.n_classes,
                   width=width or getattr(config, "width", 128), depth=getattr(config, "depth", None))
    return net.to(data.x_train.dtype)


def seeded(generator: torch.Generator, make: Callable):
    """make() with the global RNG seeded from ``generator``: module inits become reproducible."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def draw_params(config, data: ImageData, generator: torch.Generator, m: int,
                width: Optional[int] = None) -> List[dict]:
    """m initialisations theta_0 ~ p(theta_0), the architecture's own init, from ``generator``."""
    return [{k: p.detach() for k, p in seeded(generator, lambda: build_net(config, data, width)).named_parameters()}
            for _ in range(m)]


def class_layout(n_classes: int, ipc: int, steps: int) -> torch.Tensor:
    """(s, ipc * K) class of every synthetic image: each step holds ipc images of class 0, then 1, ..."""
    if not isinstance(ipc, int) or ipc < 1:
        raise DistillError(f"--ipc: expected a positive integer (images per class), got {ipc!r}")
    return torch.arange(n_classes).repeat_interleave(ipc).expand(steps, -1).contiguous()


def real_images(data: ImageData, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Distinct random training images of the requested classes (any shape of class indices)."""
    flat = classes.reshape(-1)
    out = torch.empty((flat.numel(),) + data.shape, dtype=data.x_train.dtype)
    for c in flat.unique().tolist():
        where = torch.nonzero(flat == c).flatten()
        pool = torch.nonzero(data.y_train == c).flatten()
        if pool.numel() < where.numel():
            raise DistillError(f"--ipc: class {data.classes[c]} has {pool.numel()} training images, "
                               f"{where.numel()} requested")
        out[where] = data.x_train[pool[torch.randperm(pool.numel(), generator=generator)[:where.numel()]]]
    return out.reshape(classes.shape + data.shape)


class Labels:
    """y~ of every synthetic image: fixed one-hot, or softmax of learned logits that start near one-hot."""

    def __init__(self, classes: torch.Tensor, n_classes: int, learned: bool, dtype):
        onehot = torch.nn.functional.one_hot(classes, n_classes).to(dtype)
        self.onehot = onehot
        # SLDD initialises y~ from the one-hot encoding; the 0.1 mass keeps softmax's gradient alive
        self.logits = torch.log(onehot * 0.9 + 0.1 / n_classes).requires_grad_() if learned else None

    def __call__(self) -> torch.Tensor:
        return self.onehot if self.logits is None else torch.softmax(self.logits, -1)


class Rates:
    """eta_k = softplus(rho_k): positive rates, and Adam's fixed step on rho is relative for small rates."""

    def __init__(self, opts: BilevelOptions, dtype):
        eta0 = torch.tensor(opts.lr_init, dtype=torch.float64)
        self.rho = torch.full((opts.n,), float(eta0 + torch.log(-torch.expm1(-eta0))), dtype=dtype)
        self.rho.requires_grad_(opts.learn_lrs)

    def __call__(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.rho)

    def learned(self) -> Optional[torch.Tensor]:
        """The SyntheticSet's lrs: the learned rates, None when they stayed at lr_init."""
        return self().detach().clone() if self.rho.requires_grad else None


def hypergradient(net: torch.nn.Module, thetas: List[dict], outer: Callable, batches: Callable,
                  rates: Rates, opts: BilevelOptions, need_x: bool = True, stats: Optional[dict] = None) -> float:
    """L for these theta_0 and this outer loss; adds dL/d(learned tensor) to the .grad of each learned tensor.

    ``stats``, when given, is updated with the unroll's stats (peak_state_bytes, n, checkpoint_every).
    Raises FloatingPointError when L or a hypergradient is not finite.
    """
    with torch.enable_grad():
        x, y = batches()
        eta = rates()
    h = U.unroll_hypergrad(net, thetas, x.detach(), y.detach(), eta.detach(), outer,
                           checkpoint_every=opts.checkpoint_every, need_x=need_x)
    if stats is not None:
        stats.update(h.stats)
    pairs = [(t, g) for t, g in ((x, h.x), (y, h.y), (eta, h.lrs)) if g is not None and t.requires_grad]
    if not (math.isfinite(h.loss) and all(bool(torch.isfinite(g).all()) for _, g in pairs)):
        raise FloatingPointError(f"non-finite hypergradient (outer loss {h.loss})")
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return h.loss


def outer_loop(data: ImageData, config, opts: BilevelOptions, generator: torch.Generator, progress: bool,
               name: str, batches: Callable[[], Tuple[torch.Tensor, torch.Tensor]],
               groups: List[dict], rates: Rates, need_x: bool = True) -> dict:
    """Run ``opts.outer_iters`` Adam steps; returns the meta fields (losses, seconds).

    batches() -> (x~ (s, B, C, H, W), y~ (s, B, K)) built from the learned tensors with autograd on;
    groups: Adam parameter groups of those tensors (rho is added here when rates are learned).
    """
    t0 = time.perf_counter()
    net = build_net(config, data, opts.width)
    if rates.rho.requires_grad:
        groups = groups + [{"params": [rates.rho], "lr": opts.lr_lr}]
    opt = torch.optim.Adam(groups)
    fixed = draw_params(config, data, generator, opts.models, opts.width) if opts.fixed_init else None
    N = data.x_train.shape[0]
    losses, stats, peak = [], {}, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.outer_iters, desc=f"{name}", unit="it", leave=False)
    try:
        for it in range(opts.outer_iters):
            thetas = fixed if fixed is not None else draw_params(config, data, generator, opts.models, opts.width)
            idx = torch.randperm(N, generator=generator)[:opts.batch_real]
            outer = U.cross_entropy_outer(net, data.x_train[idx], data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            try:
                losses.append(hypergradient(net, thetas, outer, batches, rates, opts, need_x, stats))
                peak = max(peak, stats.get("peak_state_bytes", 0))
            except FloatingPointError as e:
                raise DistillError(f"{name}: {e} at outer iteration {it}; try a lower --{name}-outer-lr or "
                                   f"--{name}-lr-init") from None
            opt.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return {"losses": losses, "seconds": time.perf_counter() - t0, "peak_state_bytes": peak}


def meta(name: str, ipc: int, opts: BilevelOptions, n_classes: int, extra: dict) -> dict:
    """What evaluation needs to replay the distilled steps, plus the options and the run's record."""
    out = {"method": name, "ipc": ipc, "steps": opts.steps, "epochs": opts.epochs, "n_inner": opts.n,
           "per_step": ipc * n_classes,
           "layout": "images[k*per_step:(k+1)*per_step] is inner step k's batch (k < steps); step i uses "
                     "batch i % steps with lrs[i]; within a batch ipc images of class 0, then class 1, ...",
           "options": dataclasses.asdict(opts)}
    out.update(extra)
    return out


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(s, B, ...) -> (s * B, ...), detached: the SyntheticSet layout (step-major)."""
    return x.detach().reshape((-1,) + tuple(x.shape[2:])).clone()
