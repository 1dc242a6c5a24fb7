"""LD: label distillation (Bohdal, Yang & Hospedales, 2020, "Flexible Dataset Distillation: Learn Labels
Instead of Images").

Learned: only the soft labels y~ = softmax(logits) of fixed real base images (ipc per class per step, drawn
with the run's generator); the images never change. The hypergradient is DD's unroll (condense.unroll,
without the image derivative): n = steps * epochs SGD steps from a fresh theta_0 per outer iteration, at
fixed rates lr_init unless ``ld_learn_lrs``; cross-entropy on a random real batch as the outer loss.

Options (``config.ld_<name>``; the shared ones in _bilevel.BilevelOptions): steps = 1, epochs = 10,
outer_iters = 200, label_lr = 0.05 (Adam on the logits), lr_init = 0.1, learn_lrs = False, models = 1,
fixed_init = False, batch_real = 256, checkpoint_every = None. soft_labels must stay True.

Differs from the paper: the paper's second-order version takes one inner step per label update and keeps
training the base model across outer steps (resetting it when the real loss stops improving), and its
labels start uniform; here every outer step unrolls n steps from a fresh initialisation and the labels
start near one-hot. The paper's first-order variant, a ridge-regression last layer whose closed-form
solution gives a pseudo-gradient for the labels (its Algorithm 1), is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError


@dataclass
class LDOptions(B.BilevelOptions):
    label_lr: float = 0.05
    learn_lrs: bool = False
    soft_labels: bool = True

    def validate(self, prefix: str):
        super().validate(prefix)
        if self.soft_labels is not True:
            raise DistillError(f"--{prefix}-soft-labels: label distillation learns the labels; expected True, "
                               f"got {self.soft_labels!r}")


@register("ld", options=LDOptions)
def ld(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    opts = LDOptions.from_config(config, "ld")
    dt = data.x_train.dtype
    classes = B.class_layout(data.n_classes, ipc, opts.steps)
    images = B.real_images(data, classes, generator)
    labels = B.Labels(classes, data.n_classes, True, dt)
    rates = B.Rates(opts, dt)
    groups = [{"params": [labels.logits], "lr": opts.label_lr}]
    record = B.outer_loop(data, config, opts, generator, progress, "ld", lambda: (images, labels()), groups, rates,
                          need_x=False)
    return SyntheticSet(B.flatten(images), B.flatten(labels()), rates.learned(),
                        B.meta("ld", ipc, opts, data.n_classes, record))
