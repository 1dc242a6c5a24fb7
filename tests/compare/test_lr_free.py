"""torchopt_ext.compare.lr_free: the --tiny grid end to end, the dead-network detector, resuming,
and the verdict's criteria on hand-made numbers."""
import json
import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torchopt_ext.compare import lr_free  # noqa: E402
from torchopt_ext.compare.data import digits  # noqa: E402

COMPETITORS = {"dadapt_sgd": "dadaptation", "prodigy": "prodigyopt", "schedulefree_sgd": "schedulefree",
               "dog": "dog"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("lr_free_tiny")
    assert lr_free.main(["--tiny", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "runs.json").read_text())["runs"]


def test_tiny_writes_runs_results_and_plots(tiny):
    out, runs = tiny
    opts = [o for o in lr_free.OPTIMIZERS if lr_free.available(o)]
    assert {"adaptive", "sgd"} <= set(opts)
    assert len(runs) == len(lr_free.MODELS) * len(opts) * len(lr_free.TINY_LRS)
    for r in runs:
        assert r["steps"] == lr_free.TINY_STEPS == len(r["eta"]) == len(r["loss"])
        assert all(math.isfinite(e) and e > 0 for e in r["eta"]), r["config"]
    md = (out / "results.md").read_text()
    for m in lr_free.MODELS:
        assert f"## {m}" in md
        assert f"### Verdict for `adaptive` on {m}" in md
        assert (out / f"adaptive_{m}.png").stat().st_size > 1000
    assert "max/min ratio" in md  # the logistic zone line
    assert md.count("already dead (constant argmax) at init") == len(lr_free.MODELS)
    assert not [f for f in os.listdir(out) if f.startswith(".runs-")]  # no temp file left behind


def test_tiny_same_init_and_batches_across_optimizers(tiny):
    _, runs = tiny
    for m in lr_free.MODELS:
        first = {r["loss"][0] for r in lr_free.select(runs, m)}
        assert len(first) == 1, (m, first)  # step 0's batch loss: same weights, same batch


@pytest.mark.parametrize("name", sorted(COMPETITORS))
def test_tiny_has_competitor(tiny, name):
    pytest.importorskip(COMPETITORS[name])
    _, runs = tiny
    rs = lr_free.select(runs, optimizer=name)
    assert len(rs) == len(lr_free.MODELS) * len(lr_free.TINY_LRS)
    assert rs[0]["config"]["code"].startswith(lr_free.OPTIMIZERS[name].dist + "==")


def _trained_logistic():
    x, y, _, _ = digits()
    net = lr_free.logistic(0)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x


def test_dead_detector():
    net, x = _trained_logistic()
    assert lr_free.is_dead(net, x) is False
    for m in lr_free.MODELS:
        dead = lr_free.MODELS[m](0)
        last = [mod for mod in dead.modules() if isinstance(mod, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        assert lr_free.is_dead(dead, x) is True, m
    with torch.no_grad():  # logits vary across samples but one class always wins
        net.bias.zero_()
        net.bias[3] = 1e3
    assert lr_free.is_dead(net, x) is True
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    assert lr_free.dead_logits(logits) is False
    logits[3, 5] = float("nan")  # one broken sample: the argmax still varies, the std is NaN
    assert lr_free.dead_logits(logits) is True


def test_resume_skips_done_runs_and_reruns_changed_configs(tmp_path, monkeypatch):
    kw = dict(models=["logistic"], optimizers=["sgd", "adaptive"], seeds=[0], epochs=1, max_steps=2, progress=False,
              plots=False)
    assert lr_free.run(str(tmp_path), lrs=[0.1], **kw)["new"] == 2
    before = (tmp_path / "runs.json").read_bytes()
    real = lr_free.train_run
    calls = []

    def counting(config, data):
        calls.append((config["optimizer"], config["lr"], config["kwargs"]))
        return real(config, data)

    monkeypatch.setattr(lr_free, "train_run", counting)
    res = lr_free.run(str(tmp_path), lrs=[0.1], **kw)
    assert (res["new"], calls, len(res["runs"])) == (0, [], 2)
    assert (tmp_path / "runs.json").read_bytes() == before
    res = lr_free.run(str(tmp_path), lrs=[0.1, 1.0], **kw)
    assert sorted(calls) == [("adaptive", 1.0, {}), ("sgd", 1.0, {})] and len(res["runs"]) == 4
    calls.clear()
    res = lr_free.run(str(tmp_path), lrs=[0.1], adaptive_kwargs={"eps": 1e-3}, **kw)
    assert calls == [("adaptive", 0.1, {"eps": 1e-3})] and len(res["runs"]) == 2  # report: this grid only
    assert len(lr_free.load_runs(str(tmp_path / "runs.json"))) == 5
    calls.clear()
    monkeypatch.setattr(lr_free, "ADAPTIVE_KWARGS", {"eps": 1e-3})  # as the CLI's above: nothing new
    assert lr_free.run(str(tmp_path), lrs=[0.1], **kw)["new"] == 0
    monkeypatch.setattr(lr_free, "ADAPTIVE_KWARGS", {"eps": 2e-3})
    assert lr_free.run(str(tmp_path), lrs=[0.1], **kw)["new"] == 1 and calls == [("adaptive", 0.1, {"eps": 2e-3})]


def test_adaptive_kwargs_come_from_one_place(monkeypatch):
    make = lr_free.OPTIMIZERS["adaptive"].make
    assert make(nn.Linear(2, 2).parameters(), 0.5, {"eps": 1e-3}).param_groups[0]["eps"] == 1e-3
    monkeypatch.setattr(lr_free, "ADAPTIVE_KWARGS", {"delta": 1e-4})
    group = make(nn.Linear(2, 2).parameters(), 0.5, {}).param_groups[0]
    assert (group["lr"], group["delta"]) == (0.5, 1e-4)


def test_registry_entry_hooks_run_around_training(tmp_path, monkeypatch):
    events = []

    def step(opt, closure):
        events.append(("step", closure().shape))  # per-sample losses
        opt.step()
        return 0.1

    spec = lr_free.OptimizerSpec(make=lambda p, lr, kw: torch.optim.SGD(p, lr=lr), step=step, knob="lr",
                                 train=lambda opt: events.append("train"), eval=lambda opt: events.append("eval"))
    monkeypatch.setitem(lr_free.OPTIMIZERS, "fake", spec)
    res = lr_free.run(str(tmp_path), models=["logistic"], optimizers=["fake"], lrs=[0.1], seeds=[0], epochs=1,
                      max_steps=2, progress=False, plots=False)
    assert events == ["train", ("step", (64,)), ("step", (64,)), "eval"]
    assert res["runs"][0]["eta"] == [0.1, 0.1]


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert lr_free.main(["--tiny", "--out", out, "--adaptive-kwargs", "{nope"]) == 2
    assert lr_free.main(["--tiny", "--out", out, "--adaptive-kwargs", '{"rule_that_does_not_exist": 1}']) == 2
    assert "AdaptiveLRSGD rejects" in capsys.readouterr().err
    assert lr_free.main(["--tiny", "--out", out, "--optimizers", "adam"]) == 2
    assert lr_free.main(["--tiny", "--out", out, "--models", "resnet"]) == 2
    assert not os.path.exists(out)


# -- the verdict on hand-made numbers ------------------------------------------------------------

def _r(opt, lr, seed, loss, acc=0.9, dead=False, eta=1.0, model="logistic"):
    return {"config": {"model": model, "optimizer": opt, "lr": lr, "seed": seed}, "final_loss": loss,
            "train_acc": acc, "dead": dead, "settled_eta": eta}


def _grid(ad_losses, sgd_losses, model="logistic"):
    """ad_losses / sgd_losses: {lr: [loss per seed]}."""
    runs = [_r("adaptive", lr, s, v, model=model) for lr, vs in ad_losses.items() for s, v in enumerate(vs)]
    return runs + [_r("sgd", lr, s, v, model=model) for lr, vs in sgd_losses.items() for s, v in enumerate(vs)]


SGD = {0.01: [2.0, 2.0, 2.0], 0.1: [0.1, 5.0, 5.0], 1.0: [0.3, 0.3, 0.3]}  # best by median: lr 1 (0.3)


def test_verdict_passes():
    v = lr_free.verdict(_grid({0.01: [0.4, 0.4, 9.0], 1.0: [0.45, 0.2, 0.2]}, SGD), "logistic")
    assert (v["a"], v["b"], v["c"], v["passed"]) == (True, True, True, True)
    assert (v["best_sgd_lr"], v["best_sgd_loss"]) == (1.0, 0.3)  # by median, not by the lucky seed's 0.1
    assert v["c_ratio"][0.01] == pytest.approx(0.4 / 0.3)  # the median, not the mean (3.27)
    assert (v["zone_ratio"], v["one_zone"]) == (1.0, True)


def test_verdict_fails_each_criterion():
    v = lr_free.verdict(_grid({0.01: [0.4, 0.4, 0.4], 1.0: [0.46, 0.46, 0.46]}, SGD, model="mlp"), "mlp")
    assert v["c_per_lr"] == {0.01: True, 1.0: False} and v["c"] is False and not v["passed"]
    assert "settled_eta" not in v  # the zone check is for logistic regression only
    runs = _grid({0.01: [0.2, 0.2]}, SGD)
    runs[0]["dead"] = True
    v = lr_free.verdict(runs, "logistic")
    assert (v["a"], v["dead"], v["b"], v["passed"]) == (False, 1, True, False)
    runs = _grid({0.01: [0.2, 0.2]}, SGD)
    runs[1]["train_acc"] = 0.49
    runs[0]["train_acc"] = 0.5  # the floor itself passes
    v = lr_free.verdict(runs, "logistic")
    assert (v["a"], v["b"], v["below_acc"], v["passed"]) == (True, False, 1, False)
    v = lr_free.verdict(_grid({0.01: [float("nan")] * 3}, SGD), "logistic")  # diverged: no finite loss
    assert v["c"] is False
    v = lr_free.verdict(_grid({0.01: [0.375] * 3, 1.0: [0.38] * 3}, {0.1: [0.25] * 3}), "logistic")
    assert v["c_per_lr"] == {0.01: True, 1.0: False}  # exactly 1.5x is within 1.5x
    v = lr_free.verdict(_grid({0.01: [0.4] * 3}, {0.01: [float("nan")] * 3, 1.0: [0.3] * 3}), "logistic")
    assert (v["best_sgd_lr"], v["c"]) == (1.0, True)  # a diverged SGD lr is never the best one
    v = lr_free.verdict(_grid({0.01: [9.0]}, {}), "logistic")
    assert v["c"] is None and v["passed"]  # nothing to compare with: (c) not judged


def test_verdict_zone_ratio():
    runs = [_r("adaptive", 0.01, s, 0.2, eta=e) for s, e in enumerate([1.0, 1.1, 5.0])]
    runs += [_r("adaptive", 1.0, s, 0.2, eta=e) for s, e in enumerate([3.0, 3.3, 0.1])]
    v = lr_free.verdict(runs, "logistic")
    assert v["settled_eta"] == {0.01: 1.1, 1.0: 3.0}
    assert v["zone_ratio"] == pytest.approx(3.0 / 1.1) and v["one_zone"] is False
    assert lr_free.verdict(runs, "logistic", zone_ratio=3.0 / 1.1)["one_zone"] is True  # the threshold itself passes
    assert lr_free.settled([9.0] * 8 + [1.0, 2.0]) == 1.5  # median of the last 20% of steps
