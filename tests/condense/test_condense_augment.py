"""torchopt_ext/condense/augment.py: each family against a hand-computed case, siamese draws, gradients into the input,
the strategy option, and the evaluation protocol's --eval-augment."""
import math

import pytest
import torch

from torchopt_ext.condense import augment as A
from torchopt_ext.distill.config import DistillError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fixed(family, hw, **values):
    """A Draw with the given parameters, one image's worth each (n = 1)."""
    return A.Draw(family, {k: torch.tensor([v], dtype=torch.float64 if isinstance(v, float) else torch.int64)
                           for k, v in values.items()}, hw)


def images(b=2, c=3, h=6, w=5, dtype=torch.float64, seed=0):
    return torch.randn(b, c, h, w, generator=gen(seed), dtype=dtype)


def shifted(x, tx, ty):
    """out[i, j] = x[i + tx, j + ty], zero outside: torch.roll, then the wrapped rows and columns zeroed."""
    out = torch.roll(x, shifts=(-tx, -ty), dims=(2, 3)).clone()
    H, W = x.shape[2:]
    if tx > 0:
        out[:, :, H - tx:] = 0
    elif tx < 0:
        out[:, :, :-tx] = 0
    if ty > 0:
        out[:, :, :, W - ty:] = 0
    elif ty < 0:
        out[:, :, :, :-ty] = 0
    return out


def test_flip_is_torch_flip_below_p_and_identity_above():
    x = images()
    assert torch.equal(A.apply(x, fixed("flip", (6, 5), u=0.2)), torch.flip(x, [3]))
    assert torch.equal(A.apply(x, fixed("flip", (6, 5), u=0.7)), x)


@pytest.mark.parametrize("tx, ty", [(0, 0), (1, 0), (0, -1), (-1, 1), (2, 2)])
def test_crop_is_a_shift_with_zeros(tx, ty):
    x = images()
    got = A.apply(x, fixed("crop", (6, 5), tx=tx, ty=ty))
    assert torch.equal(got, shifted(x, tx, ty))


def test_cutout_zeroes_the_clipped_square():
    x = images(h=8, w=8)
    got = A.apply(x, fixed("cutout", (8, 8), ox=1, oy=6))   # side round(0.5 * 8) = 4: rows -1..2, columns 4..7
    want = x.clone()
    want[:, :, 0:3, 4:8] = 0
    assert torch.equal(got, want)


def test_color_by_hand():
    x = images(b=1, c=2, h=2, w=2)
    b, s, c = 0.8, 0.25, 0.1
    y = x + (b - 0.5) * 1.0
    m = y.mean(1, keepdim=True)
    y = (y - m) * (s * 2.0) + m
    m = y.mean()
    y = (y - m) * (c + 0.5) + m
    torch.testing.assert_close(A.apply(x, fixed("color", (2, 2), b=b, s=s, c=c)), y)
    gray = images(b=1, c=1, h=3, w=3)   # one channel: saturation changes nothing
    d = fixed("color", (3, 3), b=0.5, s=0.9, c=0.5)
    torch.testing.assert_close(A.apply(gray, d), gray)


def test_rotate_zero_and_scale_one_are_the_identity():
    x = images()
    torch.testing.assert_close(A.apply(x, fixed("rotate", (6, 5), a=0.0)), x)
    torch.testing.assert_close(A.apply(x, fixed("scale", (6, 5), sx=1.0, sy=1.0)), x)


def test_rotate_quarter_turn_is_rot90():
    x = images(h=5, w=5)
    got = A.apply(x, fixed("rotate", (5, 5), a=math.pi / 2))
    torch.testing.assert_close(got, torch.rot90(x, 1, dims=(2, 3)))


def test_scale_resamples_a_ramp_at_the_scaled_coordinates():
    """Bilinear sampling of a ramp along the columns is exact: out[i, j] = u(j), the source column of j."""
    W = 6
    x = torch.arange(W, dtype=torch.float64).expand(1, 1, 4, W).clone()
    sx = 0.5                                             # zoom in: every sample stays inside
    got = A.apply(x, fixed("scale", (4, W), sx=sx, sy=1.0))
    j = torch.arange(W, dtype=torch.float64)
    u = ((sx * ((2 * j + 1) / W - 1) + 1) * W - 1) / 2   # normalised X of column j, scaled, back to pixels
    torch.testing.assert_close(got, u.expand(1, 1, 4, W))
    mirrored = A.apply(x, fixed("scale", (4, W), sx=-1.0, sy=1.0))
    torch.testing.assert_close(mirrored, torch.flip(x, [3]))


@pytest.mark.parametrize("family", A.FAMILIES)
def test_siamese_draw_gives_two_batches_the_same_transform(family):
    """One draw (n = 1) on two batches equals that draw on their concatenation and on each image alone."""
    a, b = images(b=3, seed=1), images(b=2, seed=2)
    d = A.draw([family], 1, (6, 5), gen(3))
    assert d.family == family and d.n == 1
    ya, yb = A.apply(a, d), A.apply(b, d)
    torch.testing.assert_close(torch.cat([ya, yb]), A.apply(torch.cat([a, b]), d))
    torch.testing.assert_close(ya[1:2], A.apply(a[1:2], d))
    again = A.draw([family], 1, (6, 5), gen(3))           # the same generator state gives the same draw
    assert all(torch.equal(again.values[k], v) for k, v in d.values.items())


def test_per_image_draws_differ_and_one_family_per_call():
    x = images(b=1).expand(16, -1, -1, -1)
    d = A.draw(["rotate"], 16, (6, 5), gen(0))
    y = A.apply(x, d)
    assert not torch.allclose(y[0], y[1])
    picked = {A.draw(A.FAMILIES, 1, (6, 5), gen(s)).family for s in range(60)}
    assert picked == set(A.FAMILIES)
    assert A.draw((), 4, (6, 5), gen(0)) is None and A.apply(x, None) is x


def test_drawn_ranges():
    g = gen(0)
    for _ in range(30):
        s = A.draw(["scale"], 8, (8, 8), g).values
        r = A.draw(["rotate"], 8, (8, 8), g).values["a"]
        c = A.draw(["crop"], 8, (8, 8), g).values
        o = A.draw(["cutout"], 8, (8, 8), g).values
        assert all(bool(((v >= 1 / 1.2) & (v <= 1.2)).all()) for v in s.values())
        assert bool((r.abs() <= math.radians(15)).all())
        assert all(bool((v.abs() <= 1).all()) for v in c.values())      # round(0.125 * 8) = 1
        assert all(bool(((v >= 0) & (v <= 8)).all()) for v in o.values())


@pytest.mark.parametrize("family", A.FAMILIES)
def test_gradients_flow_into_the_input(family):
    x = images(b=2, c=2, h=4, w=4).requires_grad_()
    for seed in range(3):
        d = A.draw([family], 2, (4, 4), gen(seed))
        assert torch.autograd.gradcheck(lambda t: A.apply(t, d), (x,))
    g, = torch.autograd.grad(A.apply(x, A.draw([family], 2, (4, 4), gen(0))).sum(), x)
    assert g.abs().sum() > 0


def test_apply_refuses_a_draw_for_other_images():
    d = A.draw(["crop"], 3, (6, 5), gen(0))
    with pytest.raises(ValueError, match="x: a draw for 3 images"):
        A.apply(images(b=2), d)
    with pytest.raises(ValueError, match=r"x: expected \(B, C, 6, 5\)"):
        A.apply(images(b=3, h=5), d)


def test_strategy_parsing_and_flip_off_for_digits():
    assert A.parse_strategy("auto", "digits", "--dsa-strategy") == ("color", "crop", "cutout", "scale", "rotate")
    assert A.parse_strategy("auto", "mnist", "--dsa-strategy") == A.default_strategy("mnist")
    assert "flip" not in A.default_strategy("mnist")
    assert A.parse_strategy("auto", "cifar10", "--dsa-strategy") == A.FAMILIES
    assert A.parse_strategy("crop_flip", "digits", "--dsa-strategy") == ("crop", "flip")   # explicit wins
    assert A.parse_strategy("color,rotate", "digits", "x") == ("color", "rotate")
    assert A.parse_strategy("none", "digits", "x") == ()
    for bad in ("blur", "crop_crop", 3):
        with pytest.raises(DistillError, match="--dsa-strategy: expected 'auto', 'none'"):
            A.parse_strategy(bad, "digits", "--dsa-strategy")


def test_eval_augment_draws_per_batch_seeded_and_stated(monkeypatch):
    """--eval-augment: every training batch of every evaluation net goes through augment() with the data set's
    families and a per-net seeded generator; the numbers differ from plain training and repeat exactly."""
    from torchopt_ext.condense import evaluate as E
    from torchopt_ext.condense.data import load_images
    from torchopt_ext.condense.methods import load_methods
    data = load_images("digits")
    syn = load_methods()["random"](data, 30, None, gen(0))      # 300 images: two batches per epoch
    calls = []

    def recording(x, fams, generator):
        calls.append((x.shape[0], tuple(fams)))
        return A.augment(x, fams, generator)

    monkeypatch.setattr(E, "augment_batch", recording)
    run = dict(net="convnet", n_models=2, epochs=2, width=4)
    plain = E.evaluate_detailed(syn, data, **run)
    assert calls == [] and plain["augment"] == []
    a = E.evaluate_detailed(syn, data, augment=True, **run)
    assert calls == [(256, A.default_strategy("digits")), (44, A.default_strategy("digits"))] * 4
    assert a["augment"] == ["color", "crop", "cutout", "scale", "rotate"]
    from torchopt_ext.condense.nets import seeded_net

    def trained(augment):
        net = seeded_net("convnet", data.shape, 10, seed=1, width=4)
        aug = (A.default_strategy("digits"), gen(5)) if augment else None
        E.train_protocol(net, syn.images, syn.labels, 1, gen(2), augment=aug)
        return torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(trained(True), trained(True)) and not torch.allclose(trained(True), trained(False))
    assert "augmented by DSA" in E.protocol_text(5, 300, augment=True)
    assert "no augmentation" in E.protocol_text(5, 300)


def test_eval_augment_flag_reaches_the_config_and_the_command():
    import argparse
    from torchopt_ext.condense.cli import add_parser, config_from_args
    from torchopt_ext.condense.config import CondenseConfig
    from torchopt_ext.condense.report import results_markdown
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["condense", "--eval-augment"]))
    assert cfg.eval_augment is True and "--eval-augment" in cfg.command("out")
    assert config_from_args(parser.parse_args(["condense"])).eval_augment is False
    assert CondenseConfig.from_json(cfg.to_json()).eval_augment is True
    with pytest.raises(DistillError, match="--eval-augment: expected true or false"):
        CondenseConfig(eval_augment="yes").validate()
    import dataclasses
    results = {"config": dataclasses.asdict(cfg), "cells": {}, "command": "c",
               "data": {"name": "digits", "n_train": 1, "n_test": 1, "shape": [1, 8, 8], "zca": False, "split": {}}}
    assert "augmented by DSA" in results_markdown(results)
