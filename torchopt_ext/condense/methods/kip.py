"""KIP, kernel inducing points (Nguyen, Chen & Lee, "Dataset Meta-Learning from Kernel Ridge-Regression",
ICLR 2021): learn the support images (and optionally their labels) so that kernel ridge regression (KRR) on
them predicts the real training set.

Per iteration, for a uniformly drawn real target batch (X_T, y_T) (without replacement, ``target_batch``
images; the whole training set when it is smaller):

    L(S) = 1/2 mean_{i, k} (y_T - K_TS (K_SS + lam_hat I)^-1 y_S)_{ik}^2,   lam_hat = reg tr(K_SS) / |S|

i.e. the paper's 1/2 ||.||^2 averaged over the |T| x K entries (the reference code's 0.5 * mean; only the
scale of L changes, Adam does not see it), with the ridge scaled by the mean diagonal of K_SS as the
reference code does, so ``reg`` is independent of the kernel's scale. K is the closed-form NNGP or NTK of an
infinitely wide fully connected relu net (condense/kernels.py, derivation in docs/KIP.md); the kernel and
the ridge solve (Cholesky) run in float64. Adam (lr ``lr``) updates the support images, and the labels
when ``learn_labels``.

Labels: the regression targets are one-hot rows centred by -1/K (the reference code's ``one_hot(...,
center=True)``), fixed unless ``learn_labels``. The returned SyntheticSet's ``labels`` are the one-hot
class of each support image in both cases, and learned targets go to ``meta["krr_labels"]`` for
:func:`krr_accuracy`: a learned target's scale and cross-class terms only mean something to the ridge
solve, and as probabilities they ruined network training (docs/KIP.md, calibration).

What is learned: the support images x~ (ipc per class, class-major order), and y~ with ``learn_labels``.
Defaults (:class:`KIPOptions`): NTK of depth 3 (FC3), sigma_w^2 = 2, sigma_b^2 = 0.01 (the reference code's
W_std = sqrt(2), b_std = 0.1), reg 1e-6, Adam lr 0.01, 1000 iterations, target batch 1000, support
initialised from real images drawn with the generator (``init="noise"``: standard normal pixels). The
reference code's default is FC1; deeper FC kernels transferred better to ConvNets on digits (and worse
to an MLP at ipc 10: docs/KIP.md, calibration), and depth 3 stays within the paper's FC1-3.

Differences from the paper: a fully connected kernel only (the paper's best CIFAR numbers use conv
kernels); ZCA only when the data already has it (ImageData.zca); no augmentation of the target batch, no
corruption (KIP_p), no sampling of kernels or support sub-batches (the whole support is used each step);
target batches are uniform, not class-balanced.

``meta`` holds the options, the loss curve (at most about 200 points), the wall time, and the KRR test
accuracy of the initial and of the learned support (``krr_acc_init``, ``krr_acc``): KIP's own evaluator,
beside the network evaluation of the pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from torchopt_ext.condense.kernels import KERNELS, relu_kernel
from torchopt_ext.condense.memory import Held
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.models import one_thread

INITS = ("real", "noise")
KRR_DTYPE = torch.float64
ONE_THREAD_WORK = 1 << 26    # target batch x support x features below which a step runs on one thread


@dataclass
class KIPOptions:
    """KIP's settings; each is read from the run config as ``kip_<name>`` (CLI ``--kip-<name>``)."""
    kernel: str = "ntk"          # nngp | ntk of the infinite fully connected relu net
    depth: int = 3               # hidden relu layers of that net
    iterations: int = 1000       # Adam steps on the support
    lr: float = 0.01             # Adam learning rate (images are standardised)
    target_batch: int = 1000     # real images per step (all of them if fewer)
    reg: float = 1e-6            # ridge, times tr(K_SS)/|S|
    learn_labels: bool = False   # also learn the support's regression targets
    init: str = "real"           # real | noise
    w_var: float = 2.0           # sigma_w^2
    b_var: float = 0.01          # sigma_b^2

    @classmethod
    def from_config(cls, config, prefix: str = "kip") -> "KIPOptions":
        defaults = cls()
        return cls(**{f.name: getattr(config, f"{prefix}_{f.name}", getattr(defaults, f.name))
                      for f in dataclasses.fields(cls)}).validate()

    def validate(self) -> "KIPOptions":
        def need(ok, name, expected, got):
            if not ok:
                raise DistillError(f"--kip-{name.replace('_', '-')}: expected {expected}, got {got!r}")
        need(self.kernel in KERNELS, "kernel", f"one of {', '.join(KERNELS)}", self.kernel)
        need(self.init in INITS, "init", f"one of {', '.join(INITS)}", self.init)
        for name in ("depth", "iterations", "target_batch"):
            v = getattr(self, name)
            low = 0 if name == "depth" else 1
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, name, f"an integer >= {low}", v)
        for name in ("lr", "reg", "w_var"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, "a finite number > 0", v)
        need(isinstance(self.b_var, (int, float)) and math.isfinite(self.b_var) and self.b_var >= 0, "b_var",
             "a finite number >= 0", self.b_var)
        need(isinstance(self.learn_labels, bool), "learn_labels", "true or false", self.learn_labels)
        return self

    def kernel_fn(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return relu_kernel(a, b, kind=self.kernel, depth=self.depth, w_var=self.w_var, b_var=self.b_var)


def centred_one_hot(y: torch.Tensor, n_classes: int, dtype=KRR_DTYPE) -> torch.Tensor:
    """(N,) class indices -> (N, K) regression targets one-hot - 1/K."""
    return torch.nn.functional.one_hot(y, n_classes).to(dtype) - 1.0 / n_classes


def krr_fit(k_ss: torch.Tensor, y_s: torch.Tensor, reg: float) -> torch.Tensor:
    """alpha = (K_SS + reg tr(K_SS)/|S| I)^-1 y_S by Cholesky; k_ss (M, M), y_s (M, K) -> (M, K)."""
    m = k_ss.shape[0]
    ridge = reg * torch.diagonal(k_ss).sum() / m
    chol, info = torch.linalg.cholesky_ex(k_ss + ridge * torch.eye(m, dtype=k_ss.dtype, device=k_ss.device))
    if int(info) != 0:
        raise DistillError(f"--kip-reg: K_SS + ridge is not positive definite at reg={reg!r} (non-finite "
                           "support?); expected a larger reg")
    return torch.cholesky_solve(y_s, chol)


def kip_loss(x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, y_t: torch.Tensor,
             opts: KIPOptions) -> torch.Tensor:
    """L(S) above; x_s (M, ...), y_s (M, K), x_t (N, ...), y_t (N, K) -> scalar, differentiable in x_s, y_s."""
    alpha = krr_fit(opts.kernel_fn(x_s), y_s, opts.reg)
    pred = opts.kernel_fn(x_t, x_s) @ alpha
    return 0.5 * ((y_t - pred) ** 2).mean()


@torch.no_grad()
def krr_predict(x_s: torch.Tensor, y_s: torch.Tensor, x: torch.Tensor, opts: KIPOptions,
                chunk: int = 1024) -> torch.Tensor:
    """KRR predictions (N, K) at x (N, ...) from the support (x_s (M, ...), y_s (M, K)), in float64."""
    x_s = x_s.to(KRR_DTYPE)
    alpha = krr_fit(opts.kernel_fn(x_s), y_s.to(KRR_DTYPE), opts.reg)
    return torch.cat([opts.kernel_fn(x[i:i + chunk].to(KRR_DTYPE), x_s) @ alpha for i in range(0, len(x), chunk)])


def krr_accuracy(support: SyntheticSet, data: ImageData, opts: Optional[KIPOptions] = None) -> float:
    """Test accuracy of KRR with ``support`` as the training set, on data.x_test.

    The kernel settings are ``opts``, else those KIP recorded in support.meta["kip"], else the defaults;
    the regression targets are meta["krr_labels"] when KIP learned them, else the label rows centred
    (labels - 1/K), so any method's SyntheticSet (e.g. random real images) can be scored the same way.
    """
    meta = support.meta or {}
    if opts is None:
        opts = KIPOptions(**meta["kip"]).validate() if "kip" in meta else KIPOptions()
    if "krr_labels" in meta:
        y_s = torch.tensor(meta["krr_labels"], dtype=KRR_DTYPE)
    else:
        y_s = support.labels.to(KRR_DTYPE) - 1.0 / support.labels.shape[1]
    pred = krr_predict(support.images, y_s, data.x_test, opts)
    return float((pred.argmax(1) == data.y_test).to(KRR_DTYPE).mean())


def initial_support(data: ImageData, ipc: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """(K * ipc, C, H, W), class-major: ipc real images per class drawn without replacement, or N(0, 1) noise."""
    sizes = [int((data.y_train == c).sum()) for c in range(data.n_classes)]
    if not (isinstance(ipc, int) and 1 <= ipc <= min(sizes)):
        raise DistillError(f"--ipc: expected an integer in [1, {min(sizes)}] (the smallest class of "
                           f"{data.name} has {min(sizes)} training images), got {ipc!r}")
    if init == "noise":
        return torch.randn((data.n_classes * ipc,) + data.shape, generator=generator, dtype=data.x_train.dtype)
    return torch.cat([data.class_part(c)[torch.randperm(sizes[c], generator=generator)[:ipc]]
                      for c in range(data.n_classes)])


@register("kip", options=KIPOptions)
def kip(data: ImageData, ipc: int, config=None, generator: Optional[torch.Generator] = None,
        progress: bool = False) -> SyntheticSet:
    """Learn ipc images per class by KIP (module docstring: loss, defaults, meta).

    Returns images (K * ipc, C, H, W) class-major in data.x_train's dtype and labels (K * ipc, K).
    """
    opts = KIPOptions.from_config(config)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    k = data.n_classes
    x_s = initial_support(data, ipc, opts.init, generator).to(KRR_DTYPE).requires_grad_()
    classes = torch.arange(k).repeat_interleave(ipc)
    y_s = centred_one_hot(classes, k).requires_grad_(opts.learn_labels)
    one_hot = torch.nn.functional.one_hot(classes, k).to(data.x_train.dtype)
    # a small step is a few hundred tiny ops: on a shared machine OpenMP barriers, not flops, dominate
    small = min(opts.target_batch, data.x_train.shape[0]) * x_s.shape[0] * x_s[0].numel() <= ONE_THREAD_WORK
    with one_thread() if small else contextlib.nullcontext():
        init = SyntheticSet(x_s.detach().to(data.x_train.dtype), one_hot, meta={"kip": dataclasses.asdict(opts)})
        krr_acc_init = krr_accuracy(init, data)
        start = time.perf_counter()
        steps, losses, peak_held = _learn(data, x_s, y_s, opts, generator, progress, ipc)
        wall = time.perf_counter() - start
        syn = SyntheticSet(x_s.detach().to(data.x_train.dtype), one_hot,
                           meta={"method": "kip", "ipc": ipc, "kip": dataclasses.asdict(opts),
                                 "loss_steps": steps, "losses": losses, "wall_s": wall,
                                 "peak_held_bytes": peak_held})
        if opts.learn_labels:
            syn.meta["krr_labels"] = y_s.detach().tolist()
        syn.meta["krr_acc_init"] = krr_acc_init
        syn.meta["krr_acc"] = krr_accuracy(syn, data)
    return syn


def _learn(data: ImageData, x_s: torch.Tensor, y_s: torch.Tensor, opts: KIPOptions,
           generator: torch.Generator, progress: bool, ipc: int):
    """Adam on the support x_s (and y_s when learned), in place; returns the recorded steps and losses."""
    y_train = centred_one_hot(data.y_train, data.n_classes)
    n = data.x_train.shape[0]
    optimizer = torch.optim.Adam([x_s] + ([y_s] if opts.learn_labels else []), lr=opts.lr)
    every = max(1, opts.iterations // 200)
    steps, losses, held = [], [], Held()
    iterator = range(1, opts.iterations + 1)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"kip ipc {ipc}", unit="step")
    for step in iterator:
        idx = torch.randperm(n, generator=generator)[:opts.target_batch] if opts.target_batch < n else slice(None)
        with held.step([x_s, y_s] + [t for s in optimizer.state.values() for t in s.values()
                                     if torch.is_tensor(t) and t.dim() > 0]):
            loss = kip_loss(x_s, y_s, data.x_train[idx].to(KRR_DTYPE), y_train[idx], opts)
        if not torch.isfinite(loss):
            raise DistillError(f"kip diverged at step {step} (loss {float(loss)}): expected a smaller --kip-lr "
                               f"than {opts.lr!r}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == 1 or step == opts.iterations:
            steps.append(step)
            losses.append(float(loss.detach()))
    return steps, losses, held.take()
