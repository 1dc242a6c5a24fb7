"""GTN: generative teaching network (Such, Rawal, Lehman, Stanley & Clune, 2020).

Learned: a small conditional generator G_phi(z, c) (noise z and one-hot class c -> image; a linear layer to
a (width, H/4, W/4) map, then two nearest-upsample + conv3x3 stages to (C, H, W); weight-normalised layers,
which the paper found essential for stable meta-gradients), the noise inputs z themselves (the paper's
"full curriculum": a learned sequence of generator inputs, one batch per inner step) and, by default, one
rate per inner step eta_k = softplus(rho_k). The meta-gradient is DD's: dL/dx~ from the reverse loop of
condense.unroll through n = steps * epochs SGD steps of a fresh learner, then backpropagated through G into
phi (and z). The SyntheticSet holds G's output for the final z: ipc images per class per step.

Options (``config.gtn_<name>``; the shared ones in _bilevel.BilevelOptions): noise_dim = 32,
gen_width = 64 (channels of G's first map), learn_noise = True, outer_lr = 0.001 (Adam on phi and z),
steps = 1, epochs = 10, outer_iters = 200, lr_init = 0.1, learn_lrs = True, soft_labels = False (labels
are G's conditioning classes), models = 1, fixed_init = False, batch_real = 256.

Differs from the paper: its learner is also weight-normalised and it learns the inner momentum; here the
learner is the pipeline's net as it is, plain SGD; the paper samples a new learner architecture per outer
step in its NAS experiments, here the run's single architecture; its inner loop takes many more steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import register
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError


class Generator(nn.Module):
    """G_phi(z, c): z (N, noise_dim) and one-hot classes (N, K) -> images (N, C, H, W)."""

    def __init__(self, shape, n_classes: int, noise_dim: int = 32, width: int = 64):
        super().__init__()
        C, H, W = shape
        self.shape, self.width = tuple(shape), width
        self.mid = (math.ceil(H / 2), math.ceil(W / 2))
        self.first = (math.ceil(H / 4), math.ceil(W / 4))
        self.fc = weight_norm(nn.Linear(noise_dim + n_classes, width * self.first[0] * self.first[1]))
        self.conv1 = weight_norm(nn.Conv2d(width, width // 2, 3, padding=1))
        self.conv2 = weight_norm(nn.Conv2d(width // 2, C, 3, padding=1))

    def forward(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        a = nn.functional.leaky_relu(self.fc(torch.cat([z, onehot], -1)), 0.2)
        a = a.view(-1, self.width, *self.first)
        a = nn.functional.leaky_relu(self.conv1(nn.functional.interpolate(a, size=self.mid)), 0.2)
        return self.conv2(nn.functional.interpolate(a, size=self.shape[1:]))


@dataclass
class GTNOptions(B.BilevelOptions):
    outer_lr: float = 0.001           # Adam's step on the generator (and its noise)
    noise_dim: int = 32              # z: noise inputs of the generator
    gen_width: int = 64              # channels of the generator's conv layers
    learn_noise: bool = True          # learn the noise too (the paper's full curriculum)

    def validate(self, prefix: str):
        super().validate(prefix)
        for name in ("noise_dim", "gen_width"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 2:
                raise DistillError(f"--{prefix}-{name.replace('_', '-')}: expected an integer >= 2, got {getattr(self, name)!r}")


@register("gtn", options=GTNOptions)
def gtn(data: ImageData, ipc: int, config, generator: torch.Generator, progress: bool = False) -> SyntheticSet:
    opts = GTNOptions.from_config(config, "gtn")
    dt = data.x_train.dtype
    classes = B.class_layout(data.n_classes, ipc, opts.steps)
    onehot = nn.functional.one_hot(classes, data.n_classes).to(dt)
    G = B.seeded(generator, lambda: Generator(data.shape, data.n_classes, opts.noise_dim, opts.gen_width)).to(dt)
    z = torch.randn(classes.shape + (opts.noise_dim,), generator=generator, dtype=torch.float64).to(dt)
    z.requires_grad_(opts.learn_noise)
    labels = B.Labels(classes, data.n_classes, opts.soft_labels, dt)
    rates = B.Rates(opts, dt)
    groups = [{"params": list(G.parameters()) + ([z] if opts.learn_noise else []), "lr": opts.outer_lr}]
    if labels.logits is not None:
        groups.append({"params": [labels.logits], "lr": opts.label_lr})

    def batches():
        x = G(z.reshape(-1, opts.noise_dim), onehot.reshape(-1, data.n_classes))
        return x.reshape(classes.shape + data.shape), labels()

    record = B.outer_loop(data, config, opts, generator, progress, "gtn", batches, groups, rates)
    with torch.no_grad():
        images = batches()[0]
    return SyntheticSet(B.flatten(images), B.flatten(labels()), rates.learned(),
                        B.meta("gtn", ipc, opts, data.n_classes, record))
