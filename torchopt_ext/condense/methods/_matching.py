"""What the matching methods (dc, dsa, dm) share: their options, the synthetic set's start, real batches per
class, fresh nets, the siamese draw of a class, and the count of the bytes their tensors hold.

The synthetic images are one tensor (K * ipc, C, H, W), class-major (ipc images of class 0, then class 1,
...), updated in place by SGD with momentum; labels are the fixed one-hot rows of their classes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

from torchopt_ext.condense import augment as A
from torchopt_ext.condense.memory import Held, nbytes  # noqa: F401  (the matching methods count through M.)
from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill.config import DistillError

INITS = ("real", "noise")


@dataclass
class MatchOptions:
    """The settings every matching method has; each is read from the config as ``<method>_<name>``."""
    iterations: int = 100          # outer iterations, a freshly initialised net each
    lr_img: float = 0.1            # SGD step on the synthetic images
    momentum_img: float = 0.5      # SGD momentum on the synthetic images
    batch_real: int = 256          # real images per class per matching step (all of a smaller class)
    init: str = "real"             # real | noise: what the images start from
    iterations_by_ipc = False      # a class constant, not an option: True where iterations None means "by ipc"

    @classmethod
    def from_config(cls, config, prefix: str):
        """Options from ``config.<prefix>_<name>`` where present, else the defaults; range-checked."""
        defaults = cls()
        opts = cls(**{f.name: getattr(config, f"{prefix}_{f.name}", getattr(defaults, f.name))
                      for f in dataclasses.fields(cls)})
        opts.validate(prefix)
        return opts

    def need(self, ok: bool, prefix: str, name: str, expected: str):
        if not ok:
            raise DistillError(f"--{prefix}-{name.replace('_', '-')}: expected {expected}, "
                               f"got {getattr(self, name)!r}")

    def positive_int(self, prefix: str, name: str, allow_none: bool = False):
        v = getattr(self, name)
        ok = (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        self.need(ok, prefix, name, "a positive integer" + (" or none" if allow_none else ""))

    def number(self, prefix: str, name: str, low_ok: bool = False):
        v = getattr(self, name)
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > 0 or (low_ok and v == 0)))
        self.need(ok, prefix, name, "a finite number " + (">= 0" if low_ok else "> 0"))

    def validate(self, prefix: str):
        self.positive_int(prefix, "iterations", allow_none=self.iterations_by_ipc)
        self.positive_int(prefix, "batch_real")
        self.number(prefix, "lr_img")
        self.number(prefix, "momentum_img", low_ok=True)
        self.need(self.init in INITS, prefix, "init", " or ".join(INITS))
        if "strategy" in self.__dataclass_fields__:   # checked here, before the grid writes anything
            A.parse_strategy(self.strategy, "", f"--{prefix}-strategy")


def families(opts, data: ImageData, prefix: str):
    """The augmentation families of ``opts.strategy`` for this data set (empty: no augmentation)."""
    return A.parse_strategy(opts.strategy, data.name, f"--{prefix}-strategy")


def initial_images(data: ImageData, ipc: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """(K * ipc, C, H, W) class-major: distinct random real images of each class, or N(0, 1) pixels."""
    classes = B.class_layout(data.n_classes, ipc, 1)[0]
    if init == "real":
        return B.real_images(data, classes, generator).clone()
    return torch.randn((classes.numel(),) + data.shape, generator=generator, dtype=torch.float64).to(
        data.x_train.dtype)


def class_pools(data: ImageData) -> List[torch.Tensor]:
    """The training indices of each class."""
    return [torch.nonzero(data.y_train == c).flatten() for c in range(data.n_classes)]


def real_batch(data: ImageData, pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """min(n, |pool|) distinct training images from ``pool``, in random order."""
    return data.x_train[pool[torch.randperm(pool.numel(), generator=generator)[:n]]]


def fresh_net(config, data: ImageData, generator: torch.Generator) -> torch.nn.Module:
    """A freshly initialised net (its own init) from ``generator``, in train mode: config.net, or with several
    --distill-nets one of them drawn uniformly (the generator is not touched for one net, so its runs stay as
    they were)."""
    names = config.train_nets if hasattr(config, "train_nets") else [config.net]
    name = names[0] if len(names) == 1 else names[int(torch.randint(len(names), (1,), generator=generator))]
    return B.seeded(generator, lambda: B.build_net(config, data, name=name)).train()


def siamese(xs: Sequence[torch.Tensor], fams: Sequence[str], generator: torch.Generator) -> List[torch.Tensor]:
    """The batches ``xs`` under ONE draw of A_w (one family, one w for every image of every batch)."""
    d = A.draw(fams, 1, xs[0].shape[2:], generator)
    return [A.apply(x, d) for x in xs]


def class_slice(c: int, ipc: int) -> slice:
    return slice(c * ipc, (c + 1) * ipc)


def result(images: torch.Tensor, data: ImageData, ipc: int, name: str, opts, record: dict) -> SyntheticSet:
    labels = torch.nn.functional.one_hot(B.class_layout(data.n_classes, ipc, 1)[0], data.n_classes)
    meta = {"method": name, "ipc": ipc, "options": dataclasses.asdict(opts)}
    meta.update(record)
    return SyntheticSet(images.detach().clone(), labels.to(images.dtype), None, meta)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar (None when disabled), closed on exit."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="it", leave=False)
    try:
        yield bar
    finally:
        bar.close()


def tick(bar, loss: float, held: int):
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", held=f"{held / 2 ** 20:.1f}MiB")


def check_finite(value: float, name: str, it: int):
    if not math.isfinite(value):
        raise DistillError(f"{name}: non-finite matching loss at iteration {it}; try a lower --{name}-lr-img")
