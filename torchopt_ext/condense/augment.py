"""Differentiable siamese augmentation A_w (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021): the DSA reference code's six families, written with plain torch ops so that
gradients flow through A_w into the images.

One call draws ONE family, uniformly from the strategy's families (the reference's single mode, 'S'), and
then its parameters w from a torch.Generator: :func:`draw` returns them as a :class:`Draw`, and
:func:`apply` applies a Draw to any number of batches. A siamese draw has n = 1 and applies the same w to
every image of every batch it is given (the reference copies its first image's w to the whole batch in
siamese mode); a draw with n = B gives each image of one B-image batch its own w (the reference's
non-siamese mode, used to train networks).

The families and their ranges (the reference's ParamDiffAug), for x (B, C, H, W) in the standardised space:

    color    x + (b - 0.5) * 1.0, then (x - mean_C x) * 2 s + mean_C x (saturation; the identity for one
             channel), then (x - mean_CHW x) * (c + 0.5) + mean_CHW x; b, s, c ~ U(0, 1)
    crop     translate by integers (tx, ty) ~ U{-p, ..., p}, p = round(0.125 side), zeros shifted in
    cutout   zero a round(0.5 side) square centred at (ox, oy) ~ U{0, ..., side - (size odd)}, clipped
    flip     mirror left-right when u < 0.5, u ~ U(0, 1)
    scale    resample at (sx X, sy Y), sx, sy ~ U(1/1.2, 1.2) (bilinear, zeros outside)
    rotate   resample at R(a) (X, Y), a ~ U(-15, 15) degrees (bilinear, zeros outside)

(X, Y) are the output pixel's normalised coordinates (F.affine_grid, align_corners=False): a factor above 1
shrinks the content. Flip is left out for digit datasets (DIGIT_DATASETS), where a mirrored digit is
another shape or no digit at all (2 and 5, 3 and E); the reference leaves it out for MNIST likewise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from torchopt_ext.distill.config import DistillError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DIGIT_DATASETS = ("digits", "mnist")   # datasets whose classes a left-right mirror changes


@dataclass(frozen=True)
class Ranges:
    """How strong each family may be (the reference's ParamDiffAug)."""
    brightness: float = 1.0    # b - 0.5 times this is added
    saturation: float = 2.0    # the chroma is scaled by s times this
    contrast: float = 0.5      # the deviation from the image mean is scaled by c + this
    crop_pad: float = 0.125    # largest shift, as a share of the side
    cutout: float = 0.5        # side of the cut square, as a share of the image side
    flip_p: float = 0.5        # probability of a mirror
    scale: float = 1.2         # factors in [1/scale, scale]
    rotate: float = 15.0       # angles in [-rotate, rotate] degrees


RANGES = Ranges()


@dataclass
class Draw:
    """One drawn transform: ``family`` and its parameters, each an (n,) tensor (n = 1: the same for every image
    of any batch; n = B: one per image of a B-image batch), for images of side ``hw`` = (H, W).

    color: b, s, c; crop: tx, ty (row and column shifts, int64); cutout: ox, oy (centre row and column, int64);
    flip: u; scale: sx, sy; rotate: a (radians).
    """
    family: str
    values: Dict[str, torch.Tensor]
    hw: Tuple[int, int]
    ranges: Ranges = RANGES

    @property
    def n(self) -> int:
        return next(iter(self.values.values())).shape[0]


def default_strategy(dataset: str) -> Tuple[str, ...]:
    """All six families, without flip for a digit dataset."""
    return tuple(f for f in FAMILIES if not (f == "flip" and dataset in DIGIT_DATASETS))


def parse_strategy(text: str, dataset: str, arg: str) -> Tuple[str, ...]:
    """The families named by ``text``: "auto" (:func:`default_strategy` of ``dataset``), "none" (no augmentation:
    the empty tuple), or family names joined by '_' or ',' (the reference's 'color_crop_cutout')."""
    if not isinstance(text, str):
        raise DistillError(f"{arg}: expected 'auto', 'none' or families from {', '.join(FAMILIES)}, got {text!r}")
    low = text.strip().lower()
    if low == "auto":
        return default_strategy(dataset)
    if low in ("none", ""):
        return ()
    names = [w for w in low.replace(",", "_").split("_") if w]
    bad = [w for w in names if w not in FAMILIES]
    if bad or len(set(names)) != len(names):
        raise DistillError(f"{arg}: expected 'auto', 'none' or distinct families from {', '.join(FAMILIES)} joined "
                           f"by '_' or ',', got {text!r}")
    return tuple(names)


def _sizes(hw: Tuple[int, int], ranges: Ranges):
    """Largest crop shift and cutout side per axis, rounded half up as the reference does."""
    shift = tuple(int(s * ranges.crop_pad + 0.5) for s in hw)
    cut = tuple(int(s * ranges.cutout + 0.5) for s in hw)
    return shift, cut


def draw(families: Sequence[str], n: int, hw: Sequence[int], generator: torch.Generator,
         ranges: Ranges = RANGES) -> Optional[Draw]:
    """One family, uniformly from ``families``, and its parameters for n images of side hw = (H, W), all from
    ``generator``; None when ``families`` is empty (no augmentation)."""
    if not families:
        return None
    hw = (int(hw[0]), int(hw[1]))
    family = families[int(torch.randint(len(families), (1,), generator=generator))]

    def u():
        return torch.rand(n, generator=generator, dtype=torch.float64)

    shift, cut = _sizes(hw, ranges)
    if family == "color":
        values = {"b": u(), "s": u(), "c": u()}
    elif family == "crop":
        values = {k: torch.randint(-p, p + 1, (n,), generator=generator) for k, p in zip(("tx", "ty"), shift)}
    elif family == "cutout":
        values = {k: torch.randint(0, s + 1 - c % 2, (n,), generator=generator)
                  for k, s, c in zip(("ox", "oy"), hw, cut)}
    elif family == "flip":
        values = {"u": u()}
    elif family == "scale":
        values = {k: u() * (ranges.scale - 1 / ranges.scale) + 1 / ranges.scale for k in ("sx", "sy")}
    elif family == "rotate":
        values = {"a": (u() - 0.5) * 2 * math.radians(ranges.rotate)}
    else:
        raise ValueError(f"families: expected names from {', '.join(FAMILIES)}, got {family!r}")
    return Draw(family, values, hw, ranges)


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An (n,) parameter as (n, 1, 1, 1) in x's dtype, broadcasting over x's images."""
    return v.to(x.dtype).reshape(-1, 1, 1, 1)


def _color(x, d):
    r = d.ranges
    x = x + (_per_image(d.values["b"], x) - 0.5) * r.brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (_per_image(d.values["s"], x) * r.saturation) + m
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (_per_image(d.values["c"], x) + r.contrast) + m


def _crop(x, d):
    """out[i, j] = x[i + tx, j + ty], zero where that falls outside (the reference's pad-by-one and clamp)."""
    B, C, H, W = x.shape
    rows = (torch.arange(H) + d.values["tx"].reshape(-1, 1) + 1).clamp(0, H + 1).expand(B, H)
    cols = (torch.arange(W) + d.values["ty"].reshape(-1, 1) + 1).clamp(0, W + 1).expand(B, W)
    xp = F.pad(x, (1, 1, 1, 1))
    xp = xp.gather(2, rows.reshape(B, 1, H, 1).expand(B, C, H, W + 2))
    return xp.gather(3, cols.reshape(B, 1, 1, W).expand(B, C, H, W))


def _cutout(x, d):
    """Zero rows [ox - k//2, ox - k//2 + k) x columns [oy - l//2, oy - l//2 + l), clipped to the image."""
    _, cut = _sizes(d.hw, d.ranges)
    H, W = x.shape[2:]

    def inside(o, k, n):
        lo = o.reshape(-1, 1) - k // 2
        i = torch.arange(n)
        return (i >= lo) & (i < lo + k)

    hole = inside(d.values["ox"], cut[0], H)[:, :, None] & inside(d.values["oy"], cut[1], W)[:, None, :]
    return x * (~hole).to(x.dtype).unsqueeze(1)


def _flip(x, d):
    return torch.where(_per_image(d.values["u"], x) < d.ranges.flip_p, x.flip(3), x)


def _affine(x, a, b, c, e):
    """Resample x at (a X + b Y, c X + e Y) per image (each an (n,) tensor), bilinear, zeros outside."""
    B = x.shape[0]
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], -1), torch.stack([c, e, zero], -1)], -2).to(x.dtype)
    grid = F.affine_grid(theta.expand(B, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale(x, d):
    sx, sy = d.values["sx"], d.values["sy"]
    return _affine(x, sx, torch.zeros_like(sx), torch.zeros_like(sy), sy)


def _rotate(x, d):
    a = d.values["a"]
    return _affine(x, torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a))


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def apply(x: torch.Tensor, d: Optional[Draw]) -> torch.Tensor:
    """A_w(x) for x (B, C, H, W) and the drawn w (``d``; None: x itself), differentiable in x."""
    if d is None:
        return x
    if x.dim() != 4 or tuple(x.shape[2:]) != d.hw:
        raise ValueError(f"x: expected (B, C, {d.hw[0]}, {d.hw[1]}) images for this draw, got {tuple(x.shape)}")
    if d.n not in (1, x.shape[0]):
        raise ValueError(f"x: a draw for {d.n} images applies to batches of 1 or {d.n}, got {x.shape[0]}")
    return _APPLY[d.family](x, d)


def augment(x: torch.Tensor, families: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) with one fresh family for the batch and fresh parameters for each image (non-siamese)."""
    return apply(x, draw(families, x.shape[0], x.shape[2:], generator))
