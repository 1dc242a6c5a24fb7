"""The condense grid's --out under faults and races: real SIGKILLs mid-write, a second live writer, a
damaged cell, a full disk, a new grid that fails early. Killed and concurrent runs are forked processes
(real processes, real SIGKILLs, without paying for a fresh interpreter's imports)."""
import json
import os
import shutil
import signal
import socket
import time

import pytest

from tests.distill.test_distill_faults import KILLED, _full_disk_for, fork, run_in_child
from tests.distill.test_distill_resume import flip_tensor_byte
from torchopt_ext.cli import main
from torchopt_ext.condense.config import CondenseError
from torchopt_ext.condense.methods import METHODS, load_methods
from torchopt_ext.distill.manifest import Manifest

FAST = ["--method", "random,herding", "--ipc", "1", "--dataset", "digits", "--width", "4", "--eval-models", "2",
        "--eval-epochs", "2", "--threads", "1", "--no-progress"]


def condense(out, *extra):
    return main(["condense", *FAST, "--out", str(out), *extra])


def numbers(out):
    """Every evaluation number of results.json: cell -> net -> (accuracies, mean, std)."""
    cells = json.loads(open(os.path.join(out, "results.json")).read())["cells"]
    return {name: {net: (e["accuracies"], e["mean"], e["std"]) for net, e in c["eval"].items()}
            for name, c in cells.items()}


def assert_matches_manifest(out):
    """Every file of the grid is in the manifest as on disk, and no temporary is left."""
    manifest, note = Manifest.load(str(out))
    assert note is None and manifest.complete
    files = {"config.json", "results.json", "results.md"}
    files |= {f"cells/{n}" for n in os.listdir(os.path.join(out, "cells"))}   # a temporary would show here
    assert set(manifest.files) == files
    assert {n: manifest.problem(n) for n in files} == {n: None for n in files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted grid of the configuration every test here uses."""
    out = tmp_path_factory.mktemp("straight") / "grid"
    assert condense(out) == 0
    assert_matches_manifest(out)
    return out


@pytest.fixture
def counting(monkeypatch):
    """Counts the calls of each method in this process."""
    load_methods()
    calls = {}
    for name in ("random", "herding", "whole"):
        def wrapped(*a, _fn=METHODS[name], _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setitem(METHODS, name, wrapped)
    return calls


@pytest.mark.parametrize("kill_at, temporary, summary", [
    ("random_ipc1.pt", "cells/.random_ipc1.pt.", "condensed random_ipc1, herding_ipc1, whole"),
    ("herding_ipc1.pt", "cells/.herding_ipc1.pt.", "evaluated the saved sets of random_ipc1; condensed herding_ipc1, "
                                                   "whole"),
    ("results.json@2", ".results.json.", "reused whole; evaluated the saved sets of random_ipc1, herding_ipc1"),
])
def test_sigkill_mid_write_then_resume_gives_the_same_numbers(tmp_path, straight, capsys, kill_at, temporary,
                                                              summary):
    out = tmp_path / "grid"
    assert run_in_child(condense, out, env={"TORCHOPT_EXT_TEST_KILL_AT": kill_at}) == KILLED
    folder, _, stem = temporary.rpartition("/")
    half = [n for n in os.listdir(out / folder) if n.startswith(stem) and n.endswith(".tmp")]
    assert len(half) == 1   # the killed write's temporary, half written; the file itself untouched
    capsys.readouterr()
    assert condense(out, "--resume") == 0   # the dead run's lock went with it
    err = capsys.readouterr().err
    gone = os.path.join(folder, half[0]) if folder else half[0]
    assert f"resume: removed {gone}, the temporary file of a write that never finished" in err
    assert err.strip().splitlines()[-1] == f"resume: {summary}"
    assert numbers(out) == numbers(straight)
    assert_matches_manifest(out)


def _pause_in_condensation(out, ready):
    """A real grid that stops inside its first method, holding --out, until it is killed."""
    load_methods()

    def wait(*a, **k):
        open(ready, "w").close()
        time.sleep(300)
    METHODS["random"] = wait
    return condense(out)


def test_second_writer_refused_then_sigkilled_holder_releases(tmp_path, straight, capsys):
    out, ready = tmp_path / "grid", tmp_path / "ready"
    holder = fork(_pause_in_condensation, out, ready)
    try:
        for _ in range(600):
            if ready.exists() or not holder.is_alive():
                break
            time.sleep(0.1)
        assert ready.exists()
        info = json.loads((out / ".lock.info").read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        capsys.readouterr()
        in_use = (f"error: --out: {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}, "
                  f"started {info['started']}); wait for it or choose another --out\n")
        assert condense(out, "--resume") == 2
        assert capsys.readouterr().err == in_use
        assert condense(out) == 2
        assert capsys.readouterr().err == in_use
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert condense(out) == 2   # a new grid still may not take the directory, now that it is free
    assert "already exists" in capsys.readouterr().err
    assert condense(out, "--resume") == 0
    assert not (out / ".lock.info").exists()   # released: the holder's note is gone
    assert numbers(out) == numbers(straight)
    assert_matches_manifest(out)


def test_flipped_byte_in_a_cell_is_found_and_only_that_cell_recomputed(tmp_path, straight, counting, capsys):
    out = tmp_path / "grid"
    shutil.copytree(straight, out)
    pt = out / "cells" / "herding_ipc1.pt"
    flip_tensor_byte(str(pt), 10 * 64 * 4)   # the ten 1x8x8 float32 images
    capsys.readouterr()
    assert condense(out, "--resume") == 0
    assert counting == {"herding": 1}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"resume: {pt} is corrupt: its tensors do not match the sha256 stored in it; cell herding_ipc1 "
                   "is condensed again",
                   "resume: reused random_ipc1, whole; condensed again herding_ipc1"]
    assert numbers(out) == numbers(straight)
    assert (out / "cells" / "herding_ipc1.pt").read_bytes() == (straight / "cells" / "herding_ipc1.pt").read_bytes()
    assert_matches_manifest(out)


def test_hand_edited_config_is_refused(tmp_path, straight, capsys):
    out = tmp_path / "grid"
    shutil.copytree(straight, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, eval_epochs=3)))
    assert condense(out, "--resume", "--eval-epochs", "3") == 2
    assert capsys.readouterr().err == (f"error: --resume: {out}/config.json was changed after the grid wrote it (its "
                                       "sha256 differs from manifest.json); restore it, or start a new --out\n")


def test_disk_full_names_the_file_and_the_grid_resumes(tmp_path, straight, monkeypatch, capsys):
    import tempfile
    out = tmp_path / "grid"
    monkeypatch.setattr(tempfile, "mkstemp", _full_disk_for("results.json"))
    assert condense(out) == 2
    assert capsys.readouterr().err == (f"error: cannot write {out}/results.json: no space left on device; once that "
                                       f"is fixed, continue with --resume --out {out}\n")
    assert not (out / "results.json").exists() and (out / "cells" / "whole.pt").exists()
    monkeypatch.undo()
    assert condense(out, "--resume") == 0
    assert numbers(out) == numbers(straight)
    assert_matches_manifest(out)


def _boom(*a, **k):
    raise CondenseError("--method: boom")


@pytest.mark.parametrize("fail", ["first set", "disk full", "second set"])
def test_a_new_grid_failing_before_any_set_was_saved_leaves_nothing(tmp_path, monkeypatch, capsys, fail):
    import tempfile
    out = tmp_path / "grid"
    load_methods()
    if fail == "disk full":
        monkeypatch.setattr(tempfile, "mkstemp", _full_disk_for("random_ipc1.pt"))
    else:
        monkeypatch.setitem(METHODS, "random" if fail == "first set" else "herding", _boom)
    assert condense(out) == 2
    err = capsys.readouterr().err
    removed = f"{out} was removed, as nothing worth keeping had been written"
    if fail == "first set":
        assert err == f"error: --method: boom; {removed}\n" and not out.exists()
    elif fail == "disk full":
        assert err == f"{removed}\nerror: cannot write {out}/cells/random_ipc1.pt: no space left on device\n"
        assert not out.exists()
    else:   # random_ipc1's set is saved: the directory is worth resuming
        assert err == "error: --method: boom\n"
        assert sorted(os.listdir(out / "cells")) == ["random_ipc1.png", "random_ipc1.pt"]
        assert not (out / ".lock.info").exists()


def test_a_cell_that_does_not_fit_the_data_is_condensed_again(tmp_path, straight, counting, capsys):
    import torch
    from torchopt_ext.condense.outputs import save_set
    out = tmp_path / "grid"
    shutil.copytree(straight, out)
    pt = out / "cells" / "random_ipc1.pt"
    state = torch.load(pt, weights_only=True)
    save_set({k: v for k, v in state.items() if k != "sha256"} | {"images": state["images"][:, :, :4, :4]}, str(pt))
    capsys.readouterr()
    assert condense(out, "--resume") == 0
    assert counting == {"random": 1}
    assert capsys.readouterr().err.splitlines()[0] == (
        f"resume: {pt} does not fit the data: expected images (M, 1, 8, 8) and labels (M, 10); cell random_ipc1 is "
        "condensed again")
    assert numbers(out) == numbers(straight)
