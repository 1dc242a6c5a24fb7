"""The distill driver under faults and races: real SIGKILLs mid-write, a second writer, a full disk,
read-only directories, two new runs racing for one name, two ranks.

Killed and concurrent runs are forked processes: real processes that die by a real SIGKILL, without
paying for a fresh interpreter's imports."""
import importlib
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import pytest
import torch

from tests.helpers.dist_helpers import free_port
from tests.distill.test_distill_run import TINY_ARGS
from torchopt_ext.cli import main
from torchopt_ext.distill.manifest import Manifest

FAST = TINY_ARGS + ["--strategy", "0", "--eval-arch", "1", "--no-plots"]
KILLED = -signal.SIGKILL


def _child(fn, args, env, log):
    os.environ.update(env)
    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(log, "w")
    sys.exit(fn(*args))


def fork(fn, *args, env=None, log=os.devnull):
    """Starts fn(*args) in a forked process; its exit code is fn's return value."""
    p = multiprocessing.get_context("fork").Process(target=_child, args=(fn, args, env or {}, log))
    p.start()
    return p


def join(processes, timeout):
    """Exit codes; a process still running after ``timeout`` seconds is killed (and gives None)."""
    codes = []
    for p in processes:
        p.join(timeout)
        codes.append(p.exitcode)
        if p.exitcode is None:
            p.kill()
            p.join()
    return codes


def run_in_child(fn, *args, env=None, log=os.devnull):
    return join([fork(fn, *args, env=env, log=log)], 300)[0]


def distill_main(args):
    return main(["distill"] + args)


def assert_matches_manifest(out):
    """Every file the manifest lists is on disk as recorded, and no temporary is left."""
    manifest, note = Manifest.load(out)
    assert note is None and manifest.complete
    assert {n: manifest.problem(n) for n in manifest.files} == {n: None for n in manifest.files}
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def points(out, name="distilled.pt"):
    return torch.load(os.path.join(out, name), weights_only=True)["points"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of the configuration the kill tests use."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    assert main(["distill", "--out", out] + FAST + ["--outer-epochs", "2"]) == 0
    return out


@pytest.mark.parametrize("kill_at, plots, rewritten", [
    ("checkpoint.pt@2", False, None),          # the epoch-1 checkpoint survives and is continued
    ("distilled_r0.csv", False, "distilled_r0.csv"),
    ("results.md", False, "results.md"),
    ("learned_rates.png", True, "learned_rates.png"),
    ("manifest.json@4", False, "results.md"),  # the last manifest lost: evaluation is not trusted
])
def test_sigkill_mid_write_then_resume_repairs(tmp_path, straight, kill_at, plots, rewritten, capsys):
    out = str(tmp_path / "run")
    args = ["--out", out] + FAST + ["--outer-epochs", "2"]
    no_plots = [] if plots else ["--no-plots"]
    if plots:  # iris: two figures to draw, not four
        args = [a for a in args if a != "--no-plots"] + ["--dataset", "iris"]
        import matplotlib.pyplot  # noqa: F401  (imported once here, not again in the child)
    code = run_in_child(distill_main, args, env={"TORCHOPT_EXT_TEST_KILL_AT": kill_at})
    assert code == KILLED
    name = kill_at.split("@")[0]
    half = [n for n in os.listdir(out) if n.startswith(f".{name}.") and n.endswith(".tmp")]
    assert len(half) == 1  # the killed write's temporary, half written; the file itself untouched
    if name == "checkpoint.pt":
        assert torch.load(os.path.join(out, name), weights_only=True)["epoch"] == 1
    capsys.readouterr()
    # the dead run's lock is free: the kernel dropped it with the process
    assert main(["distill", "--out", out, "--resume", "--no-progress"] + no_plots) == 0
    err = capsys.readouterr().err
    assert f"removed {half[0]}" in err
    if rewritten:
        assert rewritten in err.split("rewrote")[-1]
    assert_matches_manifest(out)
    if not plots:
        assert torch.equal(points(out), points(straight))
        assert torch.equal(points(out, "distilled_r0.pt"), points(straight, "distilled_r0.pt"))


def test_sigkill_between_the_restarts_of_a_batch(tmp_path, monkeypatch, capsys):
    """Killed while writing restart 1 of a batch of 3: restart 0's file is kept, and the checkpoint (the
    batch after its last epoch) gives restarts 1 and 2 without distilling again, to the same bits."""
    args = FAST + ["--restarts", "3", "--no-eval"]
    straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
    assert main(["distill", "--out", straight] + args) == 0
    code = run_in_child(distill_main, ["--out", out] + args, env={"TORCHOPT_EXT_TEST_KILL_AT": "distilled_r1.pt"})
    assert code == KILLED
    assert os.path.exists(os.path.join(out, "distilled_r0.pt"))
    assert not os.path.exists(os.path.join(out, "distilled_r1.pt"))
    distill_mod = importlib.import_module("torchopt_ext.distill.distill")

    def no_distilling(*a, **k):
        raise AssertionError("the finished batch was distilled again")
    monkeypatch.setattr(distill_mod, "hypergradient", no_distilling)
    capsys.readouterr()
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-eval"]) == 0
    for r in range(3):
        assert torch.equal(points(out, f"distilled_r{r}.pt"), points(straight, f"distilled_r{r}.pt"))
    assert_matches_manifest(out)


def _pause_in_distillation(out, ready):
    """A real run that stops inside its first outer step, holding --out, until it is killed."""
    distill_mod = importlib.import_module("torchopt_ext.distill.distill")  # the module, not the function

    def wait(*a, **k):
        open(ready, "w").close()
        time.sleep(300)
    distill_mod.hypergradient = wait
    return main(["distill", "--out", out] + FAST)


def test_second_writer_refused_then_sigkilled_holder_releases(tmp_path, straight, capsys):
    out, ready = str(tmp_path / "run"), str(tmp_path / "ready")
    holder = fork(_pause_in_distillation, out, ready)
    try:
        for _ in range(600):
            if os.path.exists(ready) or not holder.is_alive():
                break
            time.sleep(0.1)
        assert os.path.exists(ready)
        capsys.readouterr()
        in_use = (f"error: --out: {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}, "
                  "started ")
        assert main(["distill", "--out", out, "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(in_use) and err.strip().endswith("wait for it or choose another --out"), err
        assert main(["distill", "--out", out] + FAST) == 2
        assert capsys.readouterr().err.startswith(in_use)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots", "--outer-epochs", "1"]) == 0
    assert not os.path.exists(os.path.join(out, ".lock.info"))  # released: the holder's note is gone
    assert_matches_manifest(out)


def test_new_runs_racing_for_one_name_get_the_clean_error(tmp_path, monkeypatch, capsys):
    """The other run creates the directory between our check and our mkdir."""
    from torchopt_ext.distill import data
    out = str(tmp_path / "run")
    real = data.load_split

    def rival_wins(*a, **k):
        os.mkdir(out)
        return real(*a, **k)
    monkeypatch.setattr(data, "load_split", rival_wins)
    assert main(["distill", "--out", out] + FAST) == 2
    assert capsys.readouterr().err == (f"error: --out: {out} already exists; expected a new directory (nothing was "
                                       "overwritten). Pass --resume to continue that run, or choose another --out\n")
    assert os.listdir(out) == []


def _full_disk_for(name):
    """mkstemp whose file for ``name`` is /dev/full: every write to it fails with ENOSPC."""
    real = tempfile.mkstemp

    def mkstemp(*a, prefix="", **k):
        fd, path = real(*a, prefix=prefix, **k)
        if prefix == f".{name}.":
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path
    return mkstemp


def test_disk_full_names_the_file_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    monkeypatch.setattr(tempfile, "mkstemp", _full_disk_for("results.md"))
    assert main(["distill", "--out", out] + FAST) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {out}/results.md: no space left on device; once that is fixed, continue with "
        f"--resume --out {out}")
    assert not os.path.exists(os.path.join(out, "results.md"))
    monkeypatch.undo()
    assert main(["distill", "--out", out, "--resume", "--no-progress", "--no-plots"]) == 0
    assert_matches_manifest(out)


def test_disk_full_before_the_first_checkpoint_removes_the_new_directory(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    monkeypatch.setattr(tempfile, "mkstemp", _full_disk_for("checkpoint.pt"))
    assert main(["distill", "--out", out] + FAST) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{out} was removed, as nothing worth keeping had been written",
                   f"error: cannot write {out}/checkpoint.pt: no space left on device"]
    assert not os.path.exists(out)


def _as_nobody(fn, *args):
    if os.geteuid() == 0:  # root writes anywhere: drop to an ordinary user to meet a read-only directory
        os.setgid(65534)
        os.setuid(65534)
    return fn(*args)


def test_read_only_parent_and_read_only_run_directory():
    top = tempfile.mkdtemp()  # not under tmp_path: its parents are closed to other users
    run = os.path.join(top, "run")
    try:
        os.chmod(top, 0o755)
        assert main(["distill", "--out", run, "--no-eval"] + FAST) == 0
        before = sorted(os.listdir(run))
        os.chmod(run, 0o555)
        log = os.path.join(top, "log")
        assert run_in_child(_as_nobody, distill_main, ["--out", os.path.join(run, "new")] + FAST, log=log) == 2
        assert open(log).read() == (f"error: --out: cannot create {run}/new: the parent directory {run} is not "
                                    "writable\n")
        assert run_in_child(_as_nobody, distill_main, ["--out", run, "--resume", "--no-progress"], log=log) == 2
        assert open(log).read() == f"error: --out: {run} is not writable; --resume needs to write there\n"
        assert sorted(os.listdir(run)) == before
    finally:
        if os.path.exists(run):
            os.chmod(run, 0o755)
        shutil.rmtree(top)


def _rank(rank, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return main(["distill"] + args)


def two_ranks(args, log_stem):
    port = free_port()
    return join([fork(_rank, r, port, args, log=f"{log_stem}{r}") for r in range(2)], 60)


def test_two_ranks_only_rank0_writes_and_its_refusal_reaches_both(tmp_path):
    from torchopt_ext.distill.rundir import RunLock
    out, log = str(tmp_path / "run"), str(tmp_path / "rank")
    assert two_ranks(["--out", out, "--no-eval"] + FAST, log) == [0, 0]
    assert_matches_manifest(out)
    lock = RunLock(out).acquire()  # another run holds --out: only rank 0 looks, rank 1 must not hang
    try:
        assert two_ranks(["--out", out, "--resume", "--no-progress"], log) == [2, 2]
    finally:
        lock.release()
    for r in range(2):
        assert f"error: --out: {out} is in use by another run (pid {os.getpid()}" in open(f"{log}{r}").read()


def _rank_with_full_disk(rank, port, args, name, barrier_s):
    from torchopt_ext import _distributed
    _distributed.FAILED_BARRIER_S = barrier_s
    tempfile.mkstemp = _full_disk_for(name)  # only rank 0 writes
    return _rank(rank, port, args)


@pytest.mark.parametrize("name, barrier_s, codes", [
    ("checkpoint.pt", 1.0, [2, 1]),   # rank 1 is in the next epoch's all-reduce: it fails when rank 0 leaves
    ("results.md", 120.0, [2, 0]),    # rank 1 is done and waits to leave: the two barriers meet at once
])
def test_rank0_failing_alone_does_not_leave_rank1_waiting(tmp_path, name, barrier_s, codes):
    out, log = str(tmp_path / "run"), str(tmp_path / "rank")
    port, t0 = free_port(), time.perf_counter()
    args = ["--out", out] + FAST + ["--outer-epochs", "2"]
    got = join([fork(_rank_with_full_disk, r, port, args, name, barrier_s, log=f"{log}{r}") for r in range(2)], 100)
    assert got == codes and time.perf_counter() - t0 < 60  # gloo's own timeout is 30 minutes
    assert f"error: cannot write {out}/{name}: no space left on device" in open(f"{log}0").read()
