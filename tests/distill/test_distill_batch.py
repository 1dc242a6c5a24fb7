"""Restarts distilled in batches: each restart equals its one-at-a-time run (float64, up to rounding),
a batched run resumes bitwise, and a batch with one restart left to distil reruns to the same bits.
Evaluation trains the nets of all restarts at once, as one-at-a-time training would."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from tests.distill.test_distill_faults import FAST, assert_matches_manifest, points
from torchopt_ext.cli import main
from torchopt_ext.distill import DistillConfig, DistillError, distill, distill_restarts
from torchopt_ext.distill.data import load_split
from torchopt_ext.distill.distill import batches
from torchopt_ext.distill.evaluate import train_on_set, train_on_sets

distill_mod = importlib.import_module("torchopt_ext.distill.distill")  # the module, not the function


def cfg(**kw):
    base = dict(steps=3, epochs=2, per_class=2, outer_epochs=2, batch_size=250, models=2, restarts=3,
                dtype="float64")
    base.update(kw)
    return DistillConfig(**base)


def same(a, b, rtol=1e-10):
    for key in ("points", "labels", "lrs"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=rtol, atol=rtol * 1e-3)
    assert a.meta["losses"] == pytest.approx(b.meta["losses"], rel=rtol)
    assert a.meta["restart"] == b.meta["restart"]


def test_batches_are_consecutive_runs_of_restarts():
    assert batches(cfg(restarts=5)) == [[0, 1, 2, 3, 4]]
    assert batches(cfg(restarts=5, batch_restarts=2)) == [[0, 1], [2, 3], [4]]
    assert batches(cfg(restarts=2, batch_restarts=7)) == [[0, 1]]


@pytest.mark.parametrize("kw", [
    {},
    {"soft_labels": True, "arch": [1, 2], "models": 3},       # Table 2: one unroll per architecture
    {"fixed_init": True, "checkpoint_every": 2, "arch": [4]},
    {"hypergrad": "implicit", "neumann_terms": 3},
], ids=["plain", "soft-mixed-arch", "fixed-checkpointed", "implicit"])
def test_batched_restarts_equal_one_at_a_time(kw):
    together = distill_restarts(cfg(**kw), progress=False)
    pairs = distill_restarts(cfg(batch_restarts=2, **kw), progress=False)
    for r in range(3):
        alone = distill(cfg(**kw), restart=r, progress=False)
        same(together[r], alone)
        same(pairs[r], alone)
    # the restarts really differ: equality above is not one restart compared with itself
    assert not torch.allclose(together[0].points, together[1].points)
    assert together[0].meta["losses"] != together[2].meta["losses"]


def test_outer_step_of_a_batch_is_each_restarts_own_bit_for_bit():
    """Softplus, softmax and Adam on R stacked restarts round as on each alone: the stack would move which
    elements fall into a vectorised kernel's scalar tail (9 rates: all of them alone, 11 of 27 stacked)."""
    config = cfg(steps=3, epochs=3, soft_labels=True)
    split = load_split(config, torch.float64)
    gens = [torch.Generator().manual_seed(distill_mod.restart_seed(config, r)) for r in range(3)]
    both = distill_mod._State(config, split, gens)
    alone = [distill_mod._State(config, split, [torch.Generator().manual_seed(distill_mod.restart_seed(config, r))])
             for r in range(3)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (both.points, both.onehot, both.lr_raw)]
        distill_mod._apply(config, both, *grads)
        for r, state in enumerate(alone):
            distill_mod._apply(config, state, *[t[r:r + 1] for t in grads])
    for r, state in enumerate(alone):
        for key in ("points", "label_logits", "lr_raw", "lrs"):
            assert torch.equal(getattr(both, key)[r], getattr(state, key)[0]), key
        assert torch.equal(both.targets()[r], state.targets()[0])


def test_in_mkl_reproducible_mode_batched_restarts_are_bit_for_bit_their_own():
    """With MKL_CBWR=AVX2 MKL's matrix products do not depend on where a matrix lies in memory, and restart r
    of a batch is bitwise the restart run alone. Without it (13 features: MKL's kernels) it differs in
    rounding, which test_batched_restarts_equal_one_at_a_time bounds."""
    code = (
        "import torch\n"
        "from torchopt_ext.distill import DistillConfig, distill, distill_restarts\n"
        "cfg = DistillConfig(dataset='wine', steps=3, epochs=2, per_class=3, hidden=7, outer_epochs=1,\n"
        "                    batch_size=40, models=2, restarts=3, soft_labels=True, arch=[1, 2])\n"
        "both = distill_restarts(cfg, progress=False)\n"
        "alone = [distill(cfg, restart=r, progress=False) for r in range(3)]\n"
        "print([torch.equal(getattr(b, k), getattr(a, k)) for b, a in zip(both, alone)\n"
        "       for k in ('points', 'labels', 'lrs')])\n")
    env = dict(os.environ, MKL_CBWR="AVX2")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str([True] * 9)


@pytest.mark.parametrize("where", ["hypergradient", "_apply"])
def test_ctrl_c_in_a_batch_resumes_bitwise(tmp_path, monkeypatch, where):
    straight = distill_restarts(cfg(soft_labels=True), progress=False)
    out = str(tmp_path / "run")
    os.makedirs(out)
    real = getattr(distill_mod, where)
    calls = {"n": 0}

    def interrupt_on_sixth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(distill_mod, where, interrupt_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        distill_restarts(cfg(soft_labels=True), out, progress=False)
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (state["restarts"], state["epoch"], state["iteration"]) == ([0, 1, 2], 1, 1)
    assert state["points"].shape == (3, 3, 4, 2) and len(state["generator"]) == 3
    monkeypatch.setattr(distill_mod, where, real)
    resumed = distill_restarts(cfg(soft_labels=True), out, progress=False, resume=True)
    for a, b in zip(resumed, straight):
        same(a, b, rtol=0)


@pytest.mark.parametrize("where, r", [("hypergradient", 2), ("_apply", 1)])
def test_a_diverging_restart_of_a_batch_is_named(tmp_path, monkeypatch, where, r):
    out = str(tmp_path / "run")
    os.makedirs(out)
    real = getattr(distill_mod, where)

    def poison(*a):
        got = real(*a)
        if where == "hypergradient":
            got[1][r, 0, 0, 0] = float("nan")
        else:
            with torch.no_grad():
                a[1].points[r, 0, 0, 0] = float("inf")
        return got
    monkeypatch.setattr(distill_mod, where, poison)
    what = "non-finite hypergradient" if where == "hypergradient" else "non-finite points after the outer step"
    with pytest.raises(DistillError, match=f"^{what} at restart {r}, outer epoch 0, iteration 0"):
        distill_restarts(cfg(), out, progress=False)


def test_damaged_restart_reruns_its_batch_to_the_same_bits(tmp_path, capsys):
    """Batches [0, 1], [2]: the checkpoint belongs to batch [2] when restart 1 is found damaged."""
    out = str(tmp_path / "run")
    args = FAST + ["--restarts", "3", "--batch-restarts", "2", "--no-eval"]
    assert main(["distill", "--out", out] + args) == 0
    before = {r: points(out, f"distilled_r{r}.pt") for r in range(3)}
    stamp = {r: os.stat(os.path.join(out, f"distilled_r{r}.pt")).st_mtime_ns for r in (0, 2)}
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["restarts"] == [2]
    os.remove(os.path.join(out, "distilled_r1.pt"))
    capsys.readouterr()
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 0
    assert "distilled_r1.pt is missing" in capsys.readouterr().err
    for r in range(3):
        assert torch.equal(points(out, f"distilled_r{r}.pt"), before[r])
    assert stamp == {r: os.stat(os.path.join(out, f"distilled_r{r}.pt")).st_mtime_ns for r in (0, 2)}
    assert_matches_manifest(out)


@pytest.mark.parametrize("strategy", [0, 1, 2, 3])
def test_evaluation_of_all_restarts_at_once_equals_one_at_a_time(strategy):
    """train_on_sets: R x eval_models nets in one stacked SGD loop, each set with its own rates."""
    config = cfg(outer_epochs=1)
    split = load_split(config, torch.float64)
    sets = distill_restarts(config, progress=False, split=split)
    g_batch, g_one = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    accs, curve, params = train_on_sets(sets, split, 2, 6, 3, strategy, g_batch, 0.9, record_every=7)
    for r, ds in enumerate(sets):
        acc, c, p = train_on_set(ds, split, 2, 6, 3, strategy, g_one, "sgd", 0.9, 7 if r == 0 else 0)
        assert accs[r] == acc
        if r == 0:
            assert [t for t, _, _ in curve] == [t for t, _, _ in c]
            assert [(a, l) for _, a, l in curve] == pytest.approx([(a, l) for _, a, l in c], rel=1e-12)
            for a, b in zip(params, p):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert torch.equal(g_batch.get_state(), g_one.get_state())  # the same draws, in the same order
