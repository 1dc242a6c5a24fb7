"""The grid and its CLI on tiny configurations: files, tables, resume per cell, bad input writes nothing."""
import json
import os
import re

import pytest
import torch

from torchopt_ext.cli import build_parser, main
from torchopt_ext.condense.config import CondenseConfig, CondenseError, derive_seed
from torchopt_ext.condense.grid import run_grid
from torchopt_ext.condense.methods import METHODS, load_methods
from torchopt_ext.condense.types import SyntheticSet

from tests.helpers.image_files import write_idx_set

TINY = ["--dataset", "digits", "--width", "4", "--eval-models", "2", "--eval-epochs", "2", "--threads", "1",
        "--no-progress"]


def grid(out, *extra):
    return main(["condense", "--method", "random,herding", "--ipc", "1,2", *TINY, "--out", str(out), *extra])


@pytest.fixture
def counting(monkeypatch):
    """Counts the calls of each method during a test."""
    load_methods()
    calls = {}
    for name in ("random", "herding", "whole"):
        fn = METHODS[name]

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setitem(METHODS, name, wrapped)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "out"
    assert main(["condense", "--method", "random,herding", "--ipc", "1,2", *TINY, "--eval-nets", "convnet,mlp",
                 "--out", str(out)]) == 0
    return out


def test_grid_writes_every_cell(finished):
    names = ["random_ipc1", "random_ipc2", "herding_ipc1", "herding_ipc2", "whole"]
    for name in names:
        for ext in (".pt", ".png"):
            assert (finished / "cells" / (name + ext)).is_file(), name + ext
        assert (finished / "cells" / (name + ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    syn = SyntheticSet.from_state(torch.load(finished / "cells" / "herding_ipc2.pt", weights_only=True))
    assert syn.images.shape == (20, 1, 8, 8) and syn.labels.shape == (20, 10) and syn.meta["method"] == "herding"
    whole = torch.load(finished / "cells" / "whole.pt", weights_only=True)
    assert whole["images"].shape[0] == 0 and whole["meta"]["whole"]   # T itself is not copied
    assert CondenseConfig.from_json((finished / "config.json").read_text()).eval_nets == ["convnet", "mlp"]


def test_results_json_holds_every_number_and_the_table_shows_them(finished):
    res = json.loads((finished / "results.json").read_text())
    assert set(res["cells"]) == {"random_ipc1", "random_ipc2", "herding_ipc1", "herding_ipc2", "whole"}
    ev = res["cells"]["random_ipc2"]["eval"]["mlp"]
    assert len(ev["accuracies"]) == 2 and len(ev["wall_s"]) == 2 and ev["epochs"] == 2
    assert ev["mean"] == pytest.approx(sum(ev["accuracies"]) / 2)
    assert res["cells"]["random_ipc1"]["method_wall_s"] > 0 and res["data"]["n_train"] == 1198
    md = (finished / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | convnet, ipc 1 | convnet, ipc 2 | mlp, ipc 1 | mlp, ipc 2 |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| random", "| herding", "| whole (1198 images)"]
    cells = rows[1].split(" | ")[1:]
    assert cells[3].rstrip(" |") == f"{100 * ev['mean']:.1f} ± {100 * ev['std']:.1f}"
    w = res["cells"]["whole"]["eval"]["convnet"]
    assert rows[3].split(" | ")[1:3] == [f"{100 * w['mean']:.1f} ± {100 * w['std']:.1f}"] * 2
    assert "SGD (lr 0.01, momentum 0.9, weight decay 0.0005, batch 256, lr x0.1 from epoch 2 of 2)" in md
    assert re.search(r"Command: `python -m torchopt_ext condense --method random,herding --ipc 1,2 .*--out ", md)


def test_the_command_in_results_reproduces_the_config(finished):
    res = json.loads((finished / "results.json").read_text())
    words = res["command"].split()[3:]
    from torchopt_ext.condense.cli import config_from_args
    args = build_parser().parse_args(words)
    assert config_from_args(args) == CondenseConfig(**res["config"]) and args.out == str(finished)


def test_cells_are_seeded_by_seed_method_and_ipc(finished, tmp_path):
    cfg = CondenseConfig(methods=["random"], ipcs=[2], whole=False, width=4, eval_models=1, eval_epochs=1)
    run_grid(cfg, str(tmp_path / "again"), progress=False)
    a = torch.load(finished / "cells" / "random_ipc2.pt", weights_only=True)
    b = torch.load(tmp_path / "again" / "cells" / "random_ipc2.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"])
    assert derive_seed(0, "random", 2) != derive_seed(0, "random", 1) != derive_seed(1, "random", 1)


def test_resume_reuses_finished_cells(tmp_path, counting, capsys):
    out = tmp_path / "g"
    assert grid(out) == 0
    assert counting == {"random": 2, "herding": 2, "whole": 1}
    before = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert grid(out, "--resume") == 0
    assert counting == {"random": 2, "herding": 2, "whole": 1}   # nothing re-run
    assert capsys.readouterr().err == ("resume: reused random_ipc1, random_ipc2, herding_ipc1, herding_ipc2, "
                                       "whole\n")
    after = json.loads((out / "results.json").read_text())
    assert after["cells"]["random_ipc2"] == dict(before["cells"]["random_ipc2"], reused=True)
    # a corrupt set is rebuilt; an edited results.json is not trusted: every saved set is evaluated again;
    # a lost PNG is drawn again; a new ipc adds its cells only
    (out / "cells" / "herding_ipc1.pt").write_bytes(b"garbage")
    os.remove(out / "cells" / "random_ipc1.png")
    del after["cells"]["random_ipc2"]
    (out / "results.json").write_text(json.dumps(after))
    assert main(["condense", "--method", "random,herding", "--ipc", "1,2,3", *TINY, "--out", str(out),
                 "--resume"]) == 0
    assert counting == {"random": 3, "herding": 4, "whole": 1}
    err = capsys.readouterr().err
    assert "resume: results.json: its size or sha256 differs from manifest.json: every cell is evaluated again" in err
    assert "resume: cells/random_ipc1.png is missing: drawn again" in err
    assert f"resume: {out}/cells/herding_ipc1.pt is unreadable or corrupt (" in err
    assert err.strip().splitlines()[-1] == ("resume: evaluated the saved sets of random_ipc1, random_ipc2, "
                                            "herding_ipc2, whole; condensed again herding_ipc1; condensed "
                                            "random_ipc3, herding_ipc3")
    final = json.loads((out / "results.json").read_text())
    redone, first = final["cells"]["random_ipc2"]["eval"]["convnet"], before["cells"]["random_ipc2"]["eval"]["convnet"]
    assert redone["accuracies"] == first["accuracies"] and redone["wall_s"] != first["wall_s"]   # same seeds
    assert (out / "cells" / "random_ipc1.png").is_file() and "ipc 3" in (out / "results.md").read_text()
    # only the whole-data row's epochs changed: only it is evaluated again
    assert grid(out, "--resume", "--whole-epochs", "1") == 0
    again = json.loads((out / "results.json").read_text())["cells"]
    assert again["whole"]["eval"]["convnet"]["epochs"] == 1 and "reused" not in again["whole"]
    assert again["random_ipc1"]["reused"] and counting == {"random": 3, "herding": 4, "whole": 1}


def test_resume_refuses_changed_options(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["condense", "--method", "random", "--ipc", "1", *TINY, "--no-whole", "--out", str(out)]) == 0
    assert main(["condense", "--method", "random", "--ipc", "1", *TINY, "--no-whole", "--out", str(out)]) == 2
    assert "--out: " in capsys.readouterr().err
    assert grid(out, "--resume", "--eval-epochs", "3") == 2
    assert "--resume: --eval-epochs differ" in capsys.readouterr().err
    assert grid(tmp_path / "none", "--resume") == 2
    assert "is not a run directory (no config.json)" in capsys.readouterr().err


def _bad_idx(tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 3)
    return ["--dataset", "mnist", "--data-root", str(tmp_path)]


@pytest.mark.parametrize("args,match", [
    (["--method", "random,nope"], "--method: expected names from"),
    (["--net", "resnet"], "--net: expected one of"),
    (["--eval-nets", "convnet,vit"], "--eval-nets: expected names from"),
    (["--dataset", "svhn"], "--dataset: expected one of"),
    (["--ipc", "1,200"], r"--ipc: expected images per class between 1 and 116"),
    (["--ipc", "0"], "--ipc: expected integers >= 1"),
    (["--dataset", "mnist"], "--data-root: --dataset mnist reads its files from a folder"),
    (["--dataset", "cifar10", "--data-root", "{tmp}"], "--data-root: .* lacks data_batch_1"),
    ("bad_idx", "train-images-idx3-ubyte: truncated in the header"),
    (["--depth", "4"], r"--net convnet: images of shape \(1, 8, 8\) are too small for 4 conv blocks"),
    ("tiny_idx", r"--eval-nets lenet: images of shape \(1, 3, 3\) are too small"),
    (["--eval-models", "0"], "--eval-models: expected an integer >= 1"),
    (["--whole-epochs", "0"], "--whole-epochs"),
    (["--eval-optimizer", "adam"], None),   # argparse's own choices error
    (["--method", "dd", "--dd-outer-iters", "0"], "--dd-outer-iters: expected a positive integer"),
    (["--method", "kip", "--kip-kernel", "rbf"], "--kip-kernel: expected one of nngp, ntk"),
    (["--method", "gtn", "--gtn-learn-noise", "maybe"], None),   # not a bool: argparse's type error
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    if args == "bad_idx":
        args = _bad_idx(tmp_path)
    elif args == "tiny_idx":   # 3x3 images: mlp takes them, lenet does not
        write_idx_set(str(tmp_path), side=3)
        args = ["--dataset", "mnist", "--data-root", str(tmp_path), "--net", "mlp", "--eval-nets", "mlp,lenet",
                "--ipc", "1"]
    else:
        args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["condense", "--width", "4", "--eval-models", "1", "--eval-epochs", "1", "--no-progress", "--out", str(out)]
    if match is None:
        with pytest.raises(SystemExit) as info:
            main(base + args)
        assert info.value.code == 2
    else:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(match, err), err
    assert not out.exists()


def test_help_explains_options_protocol_and_outputs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["condense", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--method", "--ipc", "--dataset", "--data-root", "--eval-nets", "--eval-models", "--eval-optimizer",
                   "--resume", "momentum 0.9", "weight decay 5e-4", "results.md", "results.json", ".png",
                   "herding", "random", "whole", "t10k-images-idx3-ubyte", "data_batch_1..5", "manifest.json",
                   ".lock.info", "sha256", "torchrun", "rank 0 alone writes"):
        assert needle in text, needle


def test_config_validation_and_round_trip():
    cfg = CondenseConfig(methods=["random", "herding"], ipcs=[1, 10], eval_nets=["convnet", "lenet"]).validate()
    assert CondenseConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(CondenseError, match="config: unknown keys"):
        CondenseConfig.from_json('{"nope": 1}')
    for kw, flag in [(dict(ipcs=[1, 1]), "--ipc"), (dict(methods=[]), "--method"), (dict(width=0), "--width"),
                     (dict(test_fraction=1.0), "--test-fraction"), (dict(dtype="float16"), "--dtype"),
                     (dict(threads=0), "--threads"), (dict(herding_space="x"), "--herding-space"),
                     (dict(seed=-1), "--seed"), (dict(methods=["random", "random"]), "--method")]:
        with pytest.raises(CondenseError, match=flag):
            CondenseConfig(**kw).validate()


def test_method_flags_reach_the_method_and_the_recorded_command():
    args = build_parser().parse_args(["condense", "--method", "dd,kip", "--dd-outer-iters", "7", "--dd-init",
                                      "noise", "--kip-learn-labels", "true", "--dd-checkpoint-every", "none"])
    from torchopt_ext.condense.cli import config_from_args
    from torchopt_ext.condense.methods import OPTIONS
    cfg = config_from_args(args)
    assert cfg.options == {"dd_outer_iters": 7, "dd_init": "noise", "kip_learn_labels": True,
                           "dd_checkpoint_every": None}
    dd = OPTIONS["dd"].from_config(cfg, "dd")
    assert (dd.outer_iters, dd.init, dd.checkpoint_every, dd.epochs) == (7, "noise", None, 10)
    assert OPTIONS["kip"].from_config(cfg, "kip").learn_labels is True
    assert CondenseConfig.from_json(cfg.to_json()) == cfg
    assert "--dd-outer-iters 7" in cfg.command("o") and "--kip-learn-labels True" in cfg.command("o")
    with pytest.raises(CondenseError, match="--dd-nope"):
        CondenseConfig(methods=["dd"], options={"dd_nope": 1}).validate()
