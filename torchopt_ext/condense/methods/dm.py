"""DM: dataset condensation with distribution matching (Zhao & Bilen, "Dataset Condensation with Distribution
Matching", WACV 2023).

Learned: the synthetic images x~ (ipc per class, one-hot labels). Each iteration samples a fresh
``config.net`` theta (its own initialisation, never trained) and takes one SGD step (``lr_img``, momentum
``momentum_img``) on

    L = sum_c || mean psi_theta(A_w_c(T_c)) - mean psi_theta(A_w_c(S_c)) ||^2

psi_theta the net without its head (nets.net_features), T_c ``batch_real`` random real images of class c (all
of a smaller class), A_w_c one siamese draw of the augmentation (condense/augment.py, ``strategy``) for both
batches of class c, a new draw per class and iteration. The real side is computed without gradients.

Defaults: lr_img 1 and momentum 0.5 (the reference code's), batch_real 256, init from real images, strategy
"auto" (all six families, flip left out on digit datasets), 200 iterations.

Differs from the paper: 200 iterations instead of 20,000 by default (so a digits cell at ipc 10 fits the CPU
budget of the calibration grid, docs/CONDENSE.md). A batch-norm net embeds all classes in one forward pass,
in train mode, as the reference code's batch-norm branch does (per class, batch norm would centre each
class's features and hide the class means).
meta: the loss per iteration (``losses``), the peak bytes of tensors held per iteration (``held_bytes``:
images, their momentum, the net, the real and synthetic batches and what autograd saves, counted by
_matching.Held), the wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from torchopt_ext.condense.methods import _matching as M
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.nets import net_features
from torchopt_ext.condense.types import ImageData, SyntheticSet


@dataclass
class DMOptions(M.MatchOptions):
    iterations: int = 200              # iterations, a freshly sampled (untrained) net each
    lr_img: float = 1.0                # SGD step on the synthetic images
    strategy: str = "auto"             # families joined by _ (color crop cutout flip scale rotate), auto, none


def embedding_means(net, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, F): mean psi_theta(x) over each of the K batches; a batch-norm net embeds their concatenation in one
    forward (batch statistics of all classes, as the reference code), any other net each batch on its own
    (the same numbers, and cache-sized batches are faster)."""
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        feats = net_features(net, torch.cat(list(batches))).split([b.shape[0] for b in batches])
    else:
        feats = [net_features(net, b) for b in batches]
    return torch.stack([f.mean(0) for f in feats])


def mean_distance(mean_real: torch.Tensor, mean_syn: torch.Tensor) -> torch.Tensor:
    """sum_c ||mean_real[c] - mean_syn[c]||^2 for (K, F) class means."""
    return ((mean_real - mean_syn) ** 2).sum()


@register("dm", options=DMOptions)
def dm(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    """ipc images per class by distribution matching (module docstring)."""
    t0 = time.perf_counter()
    opts = DMOptions.from_config(config, "dm")
    fams = M.families(opts, data, "dm")
    images = M.initial_images(data, ipc, opts.init, generator).requires_grad_()
    pools = M.class_pools(data)
    opt = torch.optim.SGD([images], lr=opts.lr_img, momentum=opts.momentum_img)
    held, losses, held_bytes = M.Held(), [], []
    with M.progress_bar(progress, opts.iterations, f"dm ipc {ipc}") as bar:
        for it in range(opts.iterations):
            net = M.fresh_net(config, data, generator).requires_grad_(False)
            with held.step([images] + list(net.parameters())) as hold:
                reals, syns = [], []
                for c in range(data.n_classes):
                    xr, xs = M.siamese([M.real_batch(data, pools[c], opts.batch_real, generator),
                                        images[M.class_slice(c, ipc)]], fams, generator)
                    reals.append(xr)
                    syns.append(xs)
                hold(reals)
                with torch.no_grad():
                    mean_real = embedding_means(net, reals)
                loss = mean_distance(mean_real, embedding_means(net, syns))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            M.check_finite(losses[-1], "dm", it)
            held_bytes.append(held.take() + M.nbytes(t for t in opt.state[images].values() if torch.is_tensor(t)))
            M.tick(bar, losses[-1], held_bytes[-1])
    return M.result(images, data, ipc, "dm", opts, {"augment": list(fams), "losses": losses,
                                                     "held_bytes": held_bytes, "seconds": time.perf_counter() - t0})
