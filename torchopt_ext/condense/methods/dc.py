"""DC: dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021), and DSA, the same with
differentiable siamese augmentation (Zhao & Bilen, ICML 2021).

Learned: the synthetic images x~ (ipc per class, one-hot labels). Each outer iteration initialises a fresh
``config.net`` theta and alternates ``outer_loop`` times: (1) one matching step, in which for every class c
the real batch T_c (``batch_real`` images, all of a smaller class) and S_c give the gradients
g_T = grad_theta CE(f_theta(T_c), c) and g_S = grad_theta CE(f_theta(S_c), c), and x~ takes one SGD step
(``lr_img``, momentum ``momentum_img``) on sum_c D(g_S, g_T), with

    D = sum over weight tensors W of sum over output channels i of 1 - <g_S[i], g_T[i]> / (|g_S[i]| |g_T[i]| + 1e-6)

(g[i] the gradient of output channel i's weights flattened; biases and normalisation parameters, the 1-d
tensors, left out: the reference code's 'ours' distance, :func:`gradient_distance`); (2) except after the
last matching step, ``inner_loop`` epochs of SGD (``lr_net``, batches of ``batch_train``) on S train theta.
DSA applies one draw of A_w (condense/augment.py, ``strategy``) to T_c and S_c alike, and augments the
net's training batches per image.

Defaults: (outer_loop, inner_loop) by ipc as the reference code's get_loops, 1 -> (1, 1), 10 -> (10, 50),
20 -> (20, 25), 30 -> (30, 20), 40 -> (40, 15), 50 -> (50, 10), and iterations by ipc, 1 -> 80, 10 -> 3,
20 and more -> 1, another ipc taking the nearest tabulated one's; lr_img 0.1, momentum 0.5, lr_net 0.01
without momentum, batch_real 256, batch_train 256, init from real images; DSA's strategy "auto" (all six
families, flip left out on digit datasets).

Differs from the papers: 80 iterations at ipc 1 and 3 at ipc 10 instead of 1000 (so a digits cell fits the
CPU budget of the calibration grid, docs/CONDENSE.md: at ipc 10 one iteration is 10 matching steps and 450
training steps, about half a minute on one core); init from real images by default (the DC code's default
is noise); a batch-norm net's statistics are frozen at the exact batch statistics of 16 real images per
class before each matching step (the reference takes a running average). The per-class distance is
back-propagated class by class into x~ (the same gradient as the reference's sum, less memory).
meta: per iteration the mean distance per class and matching step (``losses``) and the peak bytes of
tensors held (``held_bytes``: images, their momentum, the net, both gradients and what autograd saves for
the double backward, counted by _matching.Held), the wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext.condense import augment as A
from torchopt_ext.condense.methods import _matching as M
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet

# ipc -> (outer_loop, inner_loop) of the reference code, and the default iterations that keep a digits cell
# within the CPU budget (docs/CONDENSE.md)
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
ITERATIONS = {1: 80, 10: 3, 20: 1, 30: 1, 40: 1, 50: 1}
BN_IMAGES = 16          # real images per class that set a batch-norm net's frozen statistics
EPS = 1e-6              # the reference's guard in the cosine's denominator


@dataclass
class DCOptions(M.MatchOptions):
    iterations: Optional[int] = None   # outer iterations, a fresh net each (none: by ipc, 80 at 1, 3 at 10, 1 from 20)
    outer_loop: Optional[int] = None   # matching steps per net (none: by ipc, 1 at 1, 10 at 10, 50 at 50)
    inner_loop: Optional[int] = None   # epochs training the net on S between them (none: by ipc, 1 at 1, 50 at 10)
    lr_net: float = 0.01               # SGD step of the net trained on S
    batch_train: int = 256             # batch of that training
    iterations_by_ipc = True

    def validate(self, prefix: str):
        super().validate(prefix)
        self.positive_int(prefix, "outer_loop", allow_none=True)
        self.positive_int(prefix, "inner_loop", allow_none=True)
        self.positive_int(prefix, "batch_train")
        self.number(prefix, "lr_net")


@dataclass
class DSAOptions(DCOptions):
    strategy: str = "auto"             # families joined by _ (color crop cutout flip scale rotate), auto, none


def schedule(ipc: int, opts: DCOptions) -> Tuple[int, int, int]:
    """(iterations, outer_loop, inner_loop): the options where set, else those of the nearest tabulated ipc
    (ties: the smaller)."""
    key = min(LOOPS, key=lambda k: (abs(k - ipc), k))
    outer, inner = LOOPS[key]
    return (opts.iterations or ITERATIONS[key]), (opts.outer_loop or outer), (opts.inner_loop or inner)


def matched(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors whose gradients are matched: weights (2-d and up); biases and norm parameters are 1-d."""
    return [p for p in params if p.dim() > 1]


def gradient_distance(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """D(g_S, g_T): sum over the 2-d-and-up pairs of sum over output channels of 1 - cos (module docstring);
    pairs of 1-d tensors (biases, norms) contribute nothing."""
    total = None
    for gs, gr in zip(g_syn, g_real):
        if gs.shape != gr.shape:
            raise ValueError(f"g_syn, g_real: expected equal shapes, got {tuple(gs.shape)} and {tuple(gr.shape)}")
        if gs.dim() < 2:
            continue
        a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        d = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)).sum()
        total = d if total is None else total + d
    if total is None:
        raise ValueError("g_syn: expected at least one weight gradient (2-d or more)")
    return total


def _bn_layers(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norm(net, x: torch.Tensor):
    """Set every batch-norm layer's running statistics to x's batch statistics and put it in eval mode."""
    bns = _bn_layers(net)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # a cumulative average: after one batch, exactly its statistics
        m.train()
    with torch.no_grad():
        net(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        m.eval()


def matching_step(net, images: torch.Tensor, data: ImageData, ipc: int, pools, opts: DCOptions,
                  fams: Sequence[str], generator: torch.Generator, held: M.Held) -> float:
    """Add d(sum_c D)/dx~ to images.grad, class by class; returns sum_c D."""
    weights = matched(list(net.parameters()))
    total = 0.0
    for c in range(data.n_classes):
        real = M.real_batch(data, pools[c], opts.batch_real, generator)
        with held.step([images, real] + list(net.parameters())) as hold:
            xr, xs = M.siamese([real, images[M.class_slice(c, ipc)]], fams, generator)
            g_real = [g.detach() for g in torch.autograd.grad(
                F.cross_entropy(net(xr), torch.full((xr.shape[0],), c)), weights)]
            hold(g_real)
            g_syn = torch.autograd.grad(F.cross_entropy(net(xs), torch.full((xs.shape[0],), c)), weights,
                                        create_graph=True)
            d = gradient_distance(g_syn, g_real)
            torch.autograd.backward(d, inputs=[images])
        total += float(d.detach())
    return total


def train_on_set(net, images: torch.Tensor, labels: torch.Tensor, epochs: int, opts: DCOptions,
                 fams: Sequence[str], generator: torch.Generator):
    """``epochs`` passes of SGD (lr_net) over (images, labels) in shuffled batches, each augmented per image
    when ``fams`` is not empty."""
    opt = torch.optim.SGD(net.parameters(), lr=opts.lr_net)
    x, y = images.detach(), labels
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator)
        for i in range(0, x.shape[0], opts.batch_train):
            xb, yb = x[perm[i:i + opts.batch_train]], y[perm[i:i + opts.batch_train]]
            if fams:
                xb = A.augment(xb, fams, generator)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()


def condense(name: str, opts: DCOptions, fams: Sequence[str], data: ImageData, ipc: int, config,
             generator: torch.Generator, progress: bool) -> SyntheticSet:
    """The loop of the module docstring for dc (``fams`` empty) and dsa; images (K * ipc, C, H, W) class-major."""
    t0 = time.perf_counter()
    iterations, outer_loop, inner_loop = schedule(ipc, opts)
    images = M.initial_images(data, ipc, opts.init, generator).requires_grad_()
    labels = torch.arange(data.n_classes).repeat_interleave(ipc)
    pools = M.class_pools(data)
    opt = torch.optim.SGD([images], lr=opts.lr_img, momentum=opts.momentum_img)
    held, losses, held_bytes = M.Held(), [], []
    with M.progress_bar(progress, iterations, f"{name} ipc {ipc}") as bar:
        for it in range(iterations):
            net = M.fresh_net(config, data, generator)
            loss = 0.0
            for ol in range(outer_loop):
                if _bn_layers(net):
                    freeze_batch_norm(net, torch.cat([M.real_batch(data, p, BN_IMAGES, generator) for p in pools]))
                opt.zero_grad(set_to_none=True)
                loss += matching_step(net, images, data, ipc, pools, opts, fams, generator, held)
                opt.step()
                if ol < outer_loop - 1:
                    net.train()
                    train_on_set(net, images, labels, inner_loop, opts, fams, generator)
            losses.append(loss / (data.n_classes * outer_loop))
            M.check_finite(losses[-1], name, it)
            held_bytes.append(held.take() + M.nbytes(t for t in opt.state[images].values() if torch.is_tensor(t)))
            M.tick(bar, losses[-1], held_bytes[-1])
    return M.result(images, data, ipc, name, opts, {
        "iterations": iterations, "outer_loop": outer_loop, "inner_loop": inner_loop, "augment": list(fams),
        "losses": losses, "held_bytes": held_bytes, "seconds": time.perf_counter() - t0})


@register("dc", options=DCOptions)
def dc(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    """ipc images per class by gradient matching (module docstring)."""
    return condense("dc", DCOptions.from_config(config, "dc"), (), data, ipc, config, generator, progress)


@register("dsa", options=DSAOptions)
def dsa(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    """dc with one siamese draw of A_w on T_c and S_c per class and matching step (module docstring)."""
    opts = DSAOptions.from_config(config, "dsa")
    return condense("dsa", opts, M.families(opts, data, "dsa"), data, ipc, config, generator, progress)
