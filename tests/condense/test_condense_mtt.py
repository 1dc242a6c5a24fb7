"""MTT on tiny digits: the normalised distance and its gradient through the student against create_graph
autograd and finite differences, checkpointing, options, the set's layout and a smoke test against random."""
import dataclasses
import math
import types

import pytest
import torch

from tests.helpers import condense_fixtures as F
from torchopt_ext.condense import experts as E
from torchopt_ext.condense import unroll as U
from torchopt_ext.condense.config import CondenseConfig
from torchopt_ext.condense.evaluate import evaluate_set
from torchopt_ext.condense.methods import METHODS, load_methods
from torchopt_ext.condense.methods import mtt as T
from torchopt_ext.distill.config import DistillError

load_methods()
FAST = dict(experts=2, train_epochs=4, expert_lr=0.1, expert_batch=64, syn_steps=4, expert_epochs=2,
            max_start_epoch=2, iterations=3)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory):
    """One cache for the module: the experts of a setting are trained once."""
    return str(tmp_path_factory.mktemp("experts"))


def config(experts_dir, **opts):
    opts = {**FAST, "experts_dir": experts_dir, **opts}
    return types.SimpleNamespace(net="convnet", width=8, depth=None, seed=0,
                                 **{f"mtt_{k}": v for k, v in opts.items()})


def run(data, experts_dir, ipc=1, seed=0, **opts):
    return METHODS["mtt"](data, ipc, config(experts_dir, **opts), torch.Generator().manual_seed(seed), False)


def random_params(net, gen, scale=1.0):
    return {k: scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in net.named_parameters()}


def test_normalised_distance_is_the_flat_ratio():
    """The reference's form: mse(sum) of the flattened vectors over num_params, twice, divided."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 1, 3)}
    theta, start, target = ({k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
                            for _ in range(3))
    flat = [torch.cat([d[k].reshape(-1) for k in shapes]) for d in (theta, start, target)]
    p = flat[0].numel()
    want = (torch.nn.functional.mse_loss(flat[0], flat[2], reduction="sum") / p) / (
        torch.nn.functional.mse_loss(flat[1], flat[2], reduction="sum") / p)
    torch.testing.assert_close(T.normalised_distance(theta, start, target), want, rtol=1e-14, atol=0)
    assert float(T.normalised_distance(start, start, target)) == 1.0
    assert float(T.normalised_distance(target, start, target)) == 0.0


def _problem(steps=2, m=6, batch=4, width=3, dtype=torch.float64):
    """A tiny ConvNet, a start and a target near it, images, labels, batch indices and log alpha."""
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = F.make_net("convnet", (1, 8, 8), 10, width).to(dtype)
    start = {k: p.detach().clone() for k, p in net.named_parameters()}
    target = {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in start.items()}
    images = torch.randn(m, 1, 8, 8, generator=gen, dtype=dtype).requires_grad_()
    labels = torch.nn.functional.one_hot(torch.arange(m) % 10, 10).to(dtype)
    idx = T.student_batches(m, steps, batch, gen)
    log_alpha = torch.tensor(math.log(0.3), dtype=dtype).requires_grad_()
    return net, start, target, images, labels, idx, log_alpha


def _reference(net, start, target, images, labels, idx, log_alpha):
    """L and (dL/dimages, dL/dlog_alpha) by autograd through the student with create_graph=True."""
    theta = {k: v.clone().requires_grad_() for k, v in start.items()}
    for k in range(idx.shape[0]):
        x, y = images[idx[k]], labels[idx[k]]
        with U.train_mode(net):
            loss = torch.nn.functional.cross_entropy(torch.func.functional_call(net, theta, (x,)), y.argmax(-1))
        g = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta = {name: t - log_alpha.exp() * gk for (name, t), gk in zip(theta.items(), g)}
    L = T.normalised_distance(theta, start, target)
    return L, torch.autograd.grad(L, [images, log_alpha])


def test_match_gradient_through_two_student_steps_equals_create_graph_and_finite_differences():
    net, start, target, images, labels, idx, log_alpha = _problem()
    assert idx.shape == (2, 4) and sorted(idx.flatten()[:6].tolist()) == list(range(6))
    opts = T.MTTOptions()
    stats = {}
    L = T.match_gradient(net, images, labels, log_alpha, start, target, idx, opts, stats=stats)
    L_ref, (g_img, g_lr) = _reference(net, start, target, images, labels, idx, log_alpha)
    assert math.isclose(L, float(L_ref.detach()), rel_tol=1e-12)
    torch.testing.assert_close(images.grad, g_img, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(log_alpha.grad, g_lr, rtol=1e-10, atol=1e-13)
    assert bool(images.grad.abs().sum() > 0) and stats["n"] == 2
    # the reference against central differences of L, in the step size and in one pixel of an image used twice
    h = 1e-6

    def L_at(images_=images, log_alpha_=log_alpha):
        return float(_reference(net, start, target, images_, labels, idx, log_alpha_)[0].detach())
    fd = (L_at(log_alpha_=(log_alpha + h).detach().requires_grad_())
          - L_at(log_alpha_=(log_alpha - h).detach().requires_grad_())) / (2 * h)
    assert math.isclose(fd, float(g_lr), rel_tol=1e-6)
    twice = int(torch.bincount(idx.flatten()).argmax())
    assert int((idx == twice).sum()) == 2
    e = torch.zeros_like(images)
    e[twice, 0, 3, 4] = h
    fd = (L_at(images_=(images + e).detach().requires_grad_())
          - L_at(images_=(images - e).detach().requires_grad_())) / (2 * h)
    assert math.isclose(fd, float(g_img[twice, 0, 3, 4]), rel_tol=1e-5)


def test_match_gradient_with_checkpointing_is_the_same():
    grads = []
    for every in (None, 1, 2, 3):
        net, start, target, images, labels, idx, log_alpha = _problem(steps=5)
        opts = T.MTTOptions(checkpoint_every=every)
        T.match_gradient(net, images, labels, log_alpha, start, target, idx, opts)
        grads.append((images.grad, log_alpha.grad))
    for g in grads[1:]:
        torch.testing.assert_close(g[0], grads[0][0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g[1], grads[0][1], rtol=1e-12, atol=1e-15)


def test_the_method_with_checkpointing_gives_the_same_set_and_holds_fewer_copies(tiny, experts_dir):
    plain = run(tiny, experts_dir, syn_steps=9, iterations=2)
    ckpt = run(tiny, experts_dir, syn_steps=9, iterations=2, checkpoint_every=3)
    torch.testing.assert_close(ckpt.images, plain.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ckpt.lrs, plain.lrs, rtol=1e-5, atol=0)
    one = plain.meta["param_bytes"]
    assert one == sum(p.numel() * 4 for p in F.make_net("convnet", (1, 8, 8), 10, 8).parameters())
    assert plain.meta["peak_state_bytes"] == 9 * one          # theta_0 .. theta_8
    assert ckpt.meta["peak_state_bytes"] == (2 + 3) * one     # 2 checkpoints left + one segment of 3


def test_set_layout_lrs_meta_and_seeding(tiny, experts_dir):
    a = run(tiny, experts_dir, ipc=2)
    assert a.images.shape == (20, 1, 8, 8) and torch.equal(a.hard_labels, torch.arange(10).repeat_interleave(2))
    torch.testing.assert_close(a.labels.sum(1), torch.ones(20))
    R = math.ceil(4 * 4 / 2)
    assert a.meta["replay_steps"] == R and a.lrs.shape == (R,) and a.meta["steps"] == 1
    assert bool((a.lrs == a.meta["alpha"]).all()) and a.meta["alpha"] == a.meta["alphas"][-1]
    assert len(a.meta["losses"]) == 3 and all(math.isfinite(v) and v > 0 for v in a.meta["losses"])
    assert a.meta["experts"]["trained"] + a.meta["experts"]["reused"] == 2 and "key" not in a.meta["experts"]
    b = run(tiny, experts_dir, ipc=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.lrs, b.lrs) and b.meta["experts"]["reused"] == 2
    c = run(tiny, experts_dir, ipc=2, seed=1)
    assert not torch.equal(a.images, c.images)
    accs = evaluate_set(a, tiny, "convnet", n_models=1, epochs=1, use_learned_lrs=True, width=8)
    assert 0.0 <= accs[0] <= 1.0


def test_every_expert_and_start_epoch_is_drawn(tiny, experts_dir):
    s = run(tiny, experts_dir, iterations=16, syn_steps=1, lr_img=1e-12, lr_lr=1e-12)
    assert {e for e, _ in s.meta["starts"]} == {0, 1} and {t for _, t in s.meta["starts"]} == {0, 1, 2}


def test_images_move_and_real_init_is_a_real_image(tiny, experts_dir):
    still = run(tiny, experts_dir, iterations=1, lr_img=1e-12, lr_lr=1e-12)
    flat = tiny.x_train.reshape(len(tiny.y_train), -1)
    for i, row in enumerate(still.images.reshape(10, -1)):
        d = (flat - row).abs().amax(1)
        assert float(d.min()) < 1e-6 and int(tiny.y_train[d.argmin()]) == i
    moved = run(tiny, experts_dir, iterations=1)
    assert float((moved.images - still.images).abs().max()) > 1e-3
    noise = run(tiny, experts_dir, iterations=1, init="noise", lr_img=1e-12)
    assert abs(float(noise.images.std()) - 1) < 0.2


def test_student_augment_hook_sees_every_step(tiny, experts_dir):
    calls = []

    def augment(x, gen):
        calls.append(tuple(x.shape))
        return x.flip(-1)
    cfg = config(experts_dir, iterations=2, batch_syn=4)
    T.distill(tiny, 1, cfg, torch.Generator().manual_seed(0), False, augment=augment, augment_name="flip")
    experts = [c for c in calls if c[0] != 4]
    assert calls[len(experts):] == [(4, 1, 8, 8)] * (2 * 4)    # N student batches per iteration, after the experts
    assert experts and all(c[1:] == (1, 8, 8) for c in experts)


def test_smoke_beats_random_real_images(tiny, experts_dir):
    """Seeded: ipc 1 on the tiny split, learned images against the random real ones they start from."""
    opts = dict(experts=3, train_epochs=6, syn_steps=8, expert_epochs=2, max_start_epoch=3, iterations=80)
    cfg = config(experts_dir, **opts)
    gen = torch.Generator().manual_seed(0)
    syn = METHODS["mtt"](tiny, 1, cfg, gen, False)
    start = METHODS["mtt"](tiny, 1, config(experts_dir, **{**opts, "iterations": 1, "lr_img": 1e-12}),
                           torch.Generator().manual_seed(0), False)
    acc = evaluate_set(syn, tiny, "convnet", n_models=2, epochs=60, width=8)
    base = evaluate_set(start, tiny, "convnet", n_models=2, epochs=60, width=8)
    assert sum(acc) / 2 > sum(base) / 2 + 0.08, (acc, base)   # measured: 60.2% against 42.9%


@pytest.mark.parametrize("name, value, expected", [
    ("experts", 0, "an integer >= 1"), ("syn_steps", 1.5, "an integer >= 1"), ("iterations", True, "an integer"),
    ("max_start_epoch", -1, "an integer >= 0 or none"), ("batch_syn", 0, "an integer >= 1 or none"),
    ("checkpoint_every", 0, "an integer >= 1 or none"), ("lr_img", 0.0, "a finite number > 0"),
    ("expert_lr", float("nan"), "a finite number > 0"), ("lr_init", -1.0, "a finite number > 0 or none"),
    ("init", "zeros", "real or noise"), ("experts_dir", 3, "a folder"),
])
def test_bad_options_name_their_flag(name, value, expected):
    flag = "--mtt-" + name.replace("_", "-")
    with pytest.raises(DistillError, match=f"^{flag}: expected {expected}"):
        T.MTTOptions.from_config(types.SimpleNamespace(**{f"mtt_{name}": value}))


def test_start_plus_expert_epochs_must_fit_the_trajectory():
    T.MTTOptions(train_epochs=7, max_start_epoch=5, expert_epochs=2).validate()
    with pytest.raises(DistillError, match="--mtt-max-start-epoch \\+ --mtt-expert-epochs: expected at most "
                                           "--mtt-train-epochs \\(7\\).*got 6 \\+ 2"):
        T.MTTOptions(train_epochs=7, max_start_epoch=6, expert_epochs=2).validate()


def test_default_last_start_epoch_grows_with_ipc_within_the_trajectory():
    opts = T.MTTOptions()
    assert [opts.max_start(k) for k in (1, 3, 5, 7, 10, 50)] == [5, 5, 5, 7, 10, 10]
    assert T.MTTOptions(train_epochs=6, expert_epochs=2).max_start(10) == 4
    assert T.MTTOptions(max_start_epoch=1).max_start(10) == 1
    with pytest.raises(DistillError, match="--mtt-max-start-epoch \\+ --mtt-expert-epochs.*got 0 \\+ 3"):
        T.MTTOptions(train_epochs=2, expert_epochs=3).validate()


def test_grid_config_checks_and_defaults():
    with pytest.raises(DistillError, match="--mtt-iterations: expected an integer >= 1"):
        CondenseConfig(methods=["mtt"], options={"mtt_iterations": 0}).validate()
    defaults = T.MTTOptions.from_config(CondenseConfig(methods=["mtt"]).validate())
    assert defaults == T.MTTOptions() and defaults.alpha0 == defaults.expert_lr
    assert dataclasses.replace(defaults, lr_init=0.02).alpha0 == 0.02


def test_flags_parse_to_typed_options():
    from torchopt_ext.cli import build_parser
    from torchopt_ext.condense.cli import config_from_args
    args = build_parser().parse_args(["condense", "--method", "mtt", "--mtt-max-start-epoch", "3", "--mtt-lr-init",
                                      "0.02", "--mtt-checkpoint-every", "none", "--mtt-experts-dir", "/tmp/x",
                                      "--mtt-lr-img", "50"])
    opts = T.MTTOptions.from_config(config_from_args(args))
    assert (opts.max_start_epoch, opts.lr_init, opts.checkpoint_every, opts.experts_dir, opts.lr_img) == (
        3, 0.02, None, "/tmp/x", 50.0)


def test_experts_dir_defaults_to_the_grids_out(tmp_path):
    opts = T.MTTOptions()
    assert T.experts_root(opts, types.SimpleNamespace(out=str(tmp_path))) == str(tmp_path / "experts")
    assert T.experts_root(dataclasses.replace(opts, experts_dir="/x"), types.SimpleNamespace(out="/y")) == "/x"
    with pytest.raises(DistillError, match="^--mtt-experts-dir: expected a folder"):
        T.experts_root(opts, CondenseConfig())


def test_a_diverging_run_names_the_options(tiny, experts_dir):
    with pytest.raises(DistillError, match="mtt: non-finite hypergradient .* at iteration \\d+; try a lower "
                                           "--mtt-lr-img"):
        run(tiny, experts_dir, iterations=5, lr_img=1e30)


def test_expert_record_in_meta(tiny, experts_dir):
    s = run(tiny, experts_dir, iterations=1)
    rec = s.meta["experts"]
    key = E.expert_key(tiny, config(experts_dir), 4, 0.1, 64)
    assert rec["folder"] == E.key_folder(experts_dir, key) and len(rec["test_acc"]) == 2
