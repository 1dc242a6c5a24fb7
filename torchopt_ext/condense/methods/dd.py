"""DD: dataset distillation by unrolling the learner's training (Wang et al., 2018; soft labels: SLDD).

Learned: the synthetic images x~ (s steps x ipc per class each), optionally soft labels y~ = softmax(logits)
(Sucholutsky & Schonlau's SLDD) and one step size per inner step eta_k = softplus(rho_k). Each outer
iteration draws ``models`` fresh theta_0 from the net's own initialisation (or reuses fixed ones with
``fixed_init``, the paper's fixed-init variant), runs n = steps * epochs SGD steps on the synthetic
batches in order, and follows the hypergradient of the cross-entropy on a random real batch (reverse loop
of condense.unroll) with Adam.

Options (``config.dd_<name>``; see _bilevel.BilevelOptions for the shared ones):
    init          "real" (default): start from random real images of each class; "noise": N(0, 1) in the
                  standardised space.
    steps = 1, epochs = 10: one batch of ipc images per class, seen 10 times with 10 learned rates, so the
                  set holds ipc images per class like every other method (steps > 1 multiplies the
                  budget: each step has its own ipc per class, as in the paper's MNIST setting).
    outer_iters = 200, outer_lr = 0.01 (Adam), lr_init = 0.1 (the rates start at eta = 0.1), models = 1,
    batch_real = 256, soft_labels = False, learn_lrs = True, checkpoint_every = None, width = 64 (the inner
    ConvNet's channels: half the evaluation nets' 128, a third of the time per outer iteration).

Differs from the paper: x~ starts from random real images by default (``init="noise"`` is the paper's
start); the default is one step of ipc images per class seen 10 times, so the budget equals the other
methods' ipc; the inner net's normalisation layers run in train mode with batch statistics; the inner net is
narrower than the nets the set is evaluated on (``width``; None: the grid's --width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError


@dataclass
class DDOptions(B.BilevelOptions):
    init: str = "real"             # "real" | "noise": what x~ starts from

    def validate(self, prefix: str):
        super().validate(prefix)
        if self.init not in ("real", "noise"):
            raise DistillError(f"--{prefix}-init: expected 'real' or 'noise', got {self.init!r}")


@register("dd", options=DDOptions)
def dd(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    opts = DDOptions.from_config(config, "dd")
    dt = data.x_train.dtype
    classes = B.class_layout(data.n_classes, ipc, opts.steps)
    if opts.init == "real":
        x0 = B.real_images(data, classes, generator)
    else:
        x0 = torch.randn(classes.shape + data.shape, generator=generator, dtype=torch.float64).to(dt)
    images = x0.requires_grad_()
    labels = B.Labels(classes, data.n_classes, opts.soft_labels, dt)
    rates = B.Rates(opts, dt)
    groups = [{"params": [images], "lr": opts.outer_lr}]
    if labels.logits is not None:
        groups.append({"params": [labels.logits], "lr": opts.label_lr})
    record = B.outer_loop(data, config, opts, generator, progress, "dd", lambda: (images, labels()), groups, rates)
    return SyntheticSet(B.flatten(images), B.flatten(labels()), rates.learned(),
                        B.meta("dd", ipc, opts, data.n_classes, record))
