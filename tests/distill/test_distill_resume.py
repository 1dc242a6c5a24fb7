"""Careless input to the distill driver: every option checked before any work, --resume held to the
recorded configuration, damaged checkpoints and outputs found by their digests, a diverging state."""
import importlib
import json
import os
import shutil
import struct
import zipfile

import pytest
import torch

from tests.distill.test_distill_faults import FAST, assert_matches_manifest, points
from tests.distill.test_distill_run import tiny
from torchopt_ext.cli import main
from torchopt_ext.distill import DistillError, distill_restarts
from torchopt_ext.distill import io

distill_mod = importlib.import_module("torchopt_ext.distill.distill")  # the module, not the function

BAD_OPTIONS = [
    (["--lr-init", "-1"], "--lr-init: expected a finite number > 0, got -1.0"),
    (["--lr-init", "0"], "--lr-init: expected a finite number > 0, got 0.0"),
    (["--lr-init", "inf"], "--lr-init: expected a finite number > 0, got inf"),
    (["--outer-lr", "nan"], "--outer-lr: expected a finite number > 0, got nan"),
    (["--outer-lr", "inf"], "--outer-lr: expected a finite number > 0, got inf"),
    (["--outer-lr", "1e39"], "--outer-lr: expected a rate whose Adam step fits float32 (at most 3.4e+37), got 1e+39"),
    (["--lr-init", "1e39"], "--lr-init: expected a rate that fits float32 (at most 3.4e+38), got 1e+39"),
    (["--strategy2-decay", "0"], "--strategy2-decay: expected a number in (0, 1], got 0.0"),
    (["--strategy2-decay", "1.5"], "--strategy2-decay: expected a number in (0, 1], got 1.5"),
    (["--neumann-alpha", "inf"], "--neumann-alpha: expected a finite number > 0, got inf"),
    (["--noise", "-0.1"], "--noise: expected a finite number >= 0, got -0.1"),
    (["--noise", "nan"], "--noise: expected a finite number >= 0, got nan"),
    (["--test-fraction", "nan"], "--test-fraction: expected a number in (0, 1), got nan"),
    (["--strategy", ""], "--strategy: expected a non-empty list from 0,1,2,3, got []"),
    (["--eval-arch", ""], "--eval-arch: expected a non-empty list of layer counts from (1, 2, 4), got []"),
    (["--batch-restarts", "0"], "--batch-restarts: expected an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295], got -1"),
    (["--seed", "4294967296"], "--seed: expected an integer in [0, 4294967295], got 4294967296"),
    (["--plot-steps", "999"], "--plot-steps: expected a non-empty list of steps in [0, 3) (0-based, below "
                              "--steps), got [999]"),
    (["--out", ""], "--out: expected a directory path, got ''"),
    (["--out", "{tmp}/missing/run"], "--out: the parent directory {tmp}/missing of {tmp}/missing/run does not "
                                     "exist; create it first"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_any_directory_is_made(tmp_path, capsys, args, message):
    tmp = str(tmp_path)
    args = [a.replace("{tmp}", tmp) for a in args]
    assert main(["distill", "--out", f"{tmp}/run"] + FAST + args) == 2
    assert capsys.readouterr().err == f"error: {message.replace('{tmp}', tmp)}\n"
    assert os.listdir(tmp) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished --no-eval run; tests copy it before changing anything."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert main(["distill", "--out", out, "--no-eval"] + FAST) == 0
    return out


def copy_run(finished, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(finished, out)
    return out


def mtimes(out):
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n != "manifest.json"}


CONFLICTS = [
    (["--steps", "5"], "--steps 5 (recorded: 3)"),
    (["--seed", "1"], "--seed 1 (recorded: 0)"),
    (["--dtype", "float64"], "--dtype float64 (recorded: float32)"),
    (["--no-learn-lrs"], "--no-learn-lrs (recorded: learn_lrs = true)"),
    (["--arch", "1,2"], "--arch 1,2 (recorded: 2)"),
    (["--outer-lr", "0.5"], "--outer-lr 0.5 (recorded: 0.01)"),
    (["--batch-restarts", "1"], "--batch-restarts 1 (recorded: default)"),
    (["--steps", "5", "--seed", "1"], "--steps 5 (recorded: 3), --seed 1 (recorded: 0)"),
]


@pytest.mark.parametrize("args, named", CONFLICTS, ids=[" ".join(a) for a, _ in CONFLICTS])
def test_resume_refuses_options_that_change_the_result(finished, capsys, args, named):
    before = mtimes(finished)
    assert main(["distill", "--out", finished, "--resume", "--no-progress"] + args) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: {named} would change the result of the run recorded in {finished}/config.json; "
        "leave them out to continue that run, or choose a new --out for a new one\n")
    assert mtimes(finished) == before


def test_resume_takes_per_invocation_options_and_equal_values(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = mtimes(out)
    args = ["--no-progress", "--no-plots", "--no-eval", "--plot-steps", "0", "--steps", "3", "--seed", "0"]
    assert main(["distill", "--out", out, "--resume"] + args) == 0
    assert "every output matches manifest.json; nothing was rewritten" in capsys.readouterr().err
    assert mtimes(out) == before


def test_no_eval_applies_to_one_invocation(finished, tmp_path, capsys):
    """A --no-eval run resumed without it is evaluated; with it, evaluation outputs are left alone."""
    out = copy_run(finished, tmp_path)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0
    assert "rewrote results.md (by evaluating again)" in capsys.readouterr().err
    assert_matches_manifest(out)
    with open(os.path.join(out, "results.md"), "a") as fh:
        fh.write("edited\n")
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 0
    assert "results.md" not in capsys.readouterr().err
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0
    assert "results.md: its size or sha256 differs from manifest.json" in capsys.readouterr().err
    assert_matches_manifest(out)


def edit_config(out, **changes):
    path = os.path.join(out, "config.json")
    raw = json.load(open(path))
    raw.update(changes)
    open(path, "w").write(json.dumps(raw))


def test_hand_edited_config_is_refused_by_name(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    cfg = os.path.join(out, "config.json")
    edit_config(out, steps="3")
    assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: the run's configuration {cfg} is invalid or unreadable "
                                       "(steps: expected an integer, got '3'); restore it or start a new --out\n")
    edit_config(out, steps=4)
    assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --resume: {cfg} was changed after the run wrote it")
    # without a manifest to compare with, the files' shapes still disagree with the edited configuration
    os.remove(os.path.join(out, "manifest.json"))
    assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: --resume: {out}/distilled_r0.pt: points does not fit the configuration (expected "
                       "(4, 4, 2) float32); delete it to run that restart again, or start a new --out")
    os.remove(os.path.join(out, "distilled_r0.pt"))
    assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: {out}/checkpoint.pt: points is (1, 3, 4, 2) torch.float32, expected (1, 4, 4, 2) "
        f"torch.float32; it does not fit the configuration; delete {out}/checkpoint.pt to run restart 0 from the "
        "start, or start a new --out")


def flip_tensor_byte(path, nbytes):
    """Flips one bit inside the stored bytes of the first tensor of ``nbytes`` bytes in a torch zip."""
    raw = bytearray(open(path, "rb").read())
    entry = next(i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename and i.file_size == nbytes)
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len + 1] ^= 0x10
    open(path, "wb").write(raw)


def test_checkpoint_with_a_flipped_byte_is_refused_and_the_advice_works(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    ckpt = os.path.join(out, "checkpoint.pt")
    os.remove(os.path.join(out, "distilled_r0.pt"))  # restart 0 unfinished: resume needs the checkpoint
    flip_tensor_byte(ckpt, 3 * 4 * 2 * 4)             # the points (or their Adam moments), float32
    assert torch.load(ckpt, weights_only=True)       # torch itself does not notice
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: checkpoint {ckpt} is corrupt: its tensors do not match the sha256 stored in it; "
        f"delete {ckpt} to run the restarts it belongs to from their start (finished restarts are kept), or "
        "start a new --out")
    os.remove(ckpt)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 0
    assert torch.equal(points(out, "distilled_r0.pt"), points(finished, "distilled_r0.pt"))
    assert_matches_manifest(out)


def test_checkpoint_of_an_earlier_version_is_refused_with_the_advice(finished, tmp_path, capsys):
    """One restart per checkpoint, points s x B x d: the layout before restarts ran in batches."""
    out = copy_run(finished, tmp_path)
    ckpt = os.path.join(out, "checkpoint.pt")
    os.remove(os.path.join(out, "distilled_r0.pt"))
    state = torch.load(ckpt, weights_only=True)
    state = {**state, "restart": 0, "points": state["points"][0], "lr_raw": state["lr_raw"][0]}
    del state["restarts"]
    io.save_torch(state, ckpt)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: checkpoint {ckpt} holds one restart in the layout of an earlier version, which batched "
        f"runs cannot continue; delete {ckpt} to run the restarts it belongs to from their start (finished "
        "restarts are kept), or start a new --out")


def test_checkpoint_with_non_finite_points_is_refused(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    ckpt = os.path.join(out, "checkpoint.pt")
    os.remove(os.path.join(out, "distilled_r0.pt"))
    state = torch.load(ckpt, weights_only=True)
    state["points"][0, 0, 0] = float("nan")
    state[io.DIGEST_KEY] = io.tensor_digest(state)  # a consistent digest: only the values are wrong
    torch.save(state, ckpt)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 2
    assert f"checkpoint {ckpt} holds non-finite points; delete {ckpt}" in capsys.readouterr().err
    with pytest.raises(DistillError, match="refusing to write checkpoint .* non-finite points"):
        io.save_checkpoint(state, os.path.join(out, "new.pt"))
    assert not os.path.exists(os.path.join(out, "new.pt"))


def test_tensor_digest_sees_every_byte_and_survives_a_round_trip(tmp_path):
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": [torch.zeros(2, dtype=torch.float64), 3],
             "s": torch.tensor(1.0)}
    torch.save(state, tmp_path / "x.pt")
    again = torch.load(tmp_path / "x.pt", weights_only=True)
    assert io.tensor_digest(again) == io.tensor_digest(dict(reversed(list(state.items()))))
    again["b"][1, 2] += 1e-6
    assert io.tensor_digest(again) != io.tensor_digest(state)
    for same_bytes in (state["b"].view(torch.int32), state["b"].reshape(3, 2)):  # dtype and shape count too
        assert io.tensor_digest({**state, "b": same_bytes}) != io.tensor_digest(state)


def test_resume_rewrites_what_is_damaged_and_says_so(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0  # now evaluated
    capsys.readouterr()
    os.remove(os.path.join(out, "distilled_r0.csv"))
    os.remove(os.path.join(out, "distilled.pt"))
    open(os.path.join(out, "split.json"), "w").close()
    with open(os.path.join(out, "results.md"), "a") as fh:
        fh.write("x")
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "resume: rewrote split.json (from the configuration), distilled_r0.csv (from distilled_r0.pt), "
        "distilled.pt (from distilled_r0.pt), results.md (by evaluating again)")
    assert_matches_manifest(out)
    # a damaged finished restart is distilled again, to the same bits
    flip_tensor_byte(os.path.join(out, "distilled_r0.pt"), 3 * 4 * 2 * 4)
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0
    assert "distilled_r0.pt: its size or sha256 differs from manifest.json" in capsys.readouterr().err
    assert torch.equal(points(out, "distilled_r0.pt"), points(finished, "distilled_r0.pt"))
    assert_matches_manifest(out)


def test_resume_refuses_data_that_changed(tmp_path, capsys):
    table = tmp_path / "t.csv"
    rows = [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(60)]
    table.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    assert main(["distill", "--out", out, "--csv", str(table), "--target", "y", "--no-eval"] + FAST) == 0
    table.write_text("a,b,y\n" + "\n".join(rows[:-1] + ["9,9,1"]) + "\n")
    assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: --csv {table}: the data differ from those the run in {out} started with (split.json records "
        "another split or standardisation); restore the data, or start a new --out\n")


@pytest.mark.parametrize("call, name, kept", [
    (8, "points", "the last good checkpoint, {ckpt}, holds restart 0 after 1 outer epoch(s)"),
    (2, "learning rates", "no checkpoint of restart 0 was written yet"),
])
def test_non_finite_state_stops_before_anything_is_written(tmp_path, monkeypatch, call, name, kept):
    """The 8th step is the last of the last epoch: its state would have been written as the result."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    real = distill_mod._apply
    calls = {"n": 0}

    def overflow(config, state, *a):
        real(config, state, *a)
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                (state.points if name == "points" else state.lr_raw).view(-1)[0] = float("inf")
    monkeypatch.setattr(distill_mod, "_apply", overflow)
    ckpt = os.path.join(out, "checkpoint.pt")
    epoch, it = divmod(call - 1, 4)
    with pytest.raises(DistillError) as e:
        distill_restarts(tiny(), out, progress=False)
    assert str(e.value).startswith(f"non-finite {name} after the outer step at restart 0, outer epoch {epoch}, "
                                   f"iteration {it}; {kept.format(ckpt=ckpt)}; nothing was written")
    assert not os.path.exists(os.path.join(out, "distilled_r0.pt"))
    if call == 8:
        state = io.load_checkpoint(ckpt)
        assert state["epoch"] == 1 and torch.isfinite(state["points"]).all()
    else:
        assert os.listdir(out) == []


def test_diverging_run_stops_and_removes_its_new_directory(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["distill", "--out", out] + FAST + ["--outer-lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite hypergradient at restart 0, outer epoch 0, iteration 1 (outer loss "
                          "nan); no checkpoint of restart 0 was written yet; nothing was written from the diverged "
                          "state.") and err.count("\n") == 1
    assert err.endswith(f"in a new --out; {out} was removed, as nothing worth keeping had been written\n")
    assert not os.path.exists(out)
