"""The condense grid over two gloo ranks on 127.0.0.1 (forked processes with torchrun's environment): the
same numbers as one process, the work dealt round-robin, rank 0 alone writing, and a failure on either rank
reaching both at once."""
import json
import os
import time

import pytest

from tests.helpers.dist_helpers import free_port
from tests.condense.test_condense_rundir import assert_matches_manifest, condense, numbers
from tests.distill.test_distill_faults import fork, join
from torchopt_ext.condense.config import CondenseError
from torchopt_ext.condense.ranks import my_share

def _as_rank(rank, port, out, log, patch=None, extra=()):
    """One rank of a 2-process grid; ``patch(rank, log)`` changes this process before it starts."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if patch is not None:
        patch(rank, log)
    return condense(out, *extra)


def two_ranks(out, log, patch=None, extra=(), timeout=100):
    """Exit codes of both ranks (None: still running after ``timeout`` s) and the seconds they took."""
    port, t0 = free_port(), time.perf_counter()
    codes = join([fork(_as_rank, r, port, out, log, patch, extra, log=f"{log}{r}") for r in range(2)], timeout)
    return codes, time.perf_counter() - t0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One process, the same --threads 1 as each rank."""
    out = tmp_path_factory.mktemp("one") / "grid"
    assert condense(out) == 0
    return out


def _log_units_and_forbid_writes_off_rank0(rank, log):
    """Each rank logs the cells it condenses and the nets it trains; rank 1 may not create a file."""
    import tempfile
    from torchopt_ext.condense import grid

    def note(*unit):
        with open(f"{log}units{rank}", "a") as fh:
            fh.write(json.dumps(unit) + "\n")
    condense_cell, evaluate = grid._condense_cell, grid.evaluate_detailed

    def logged_cell(config, data, methods, cell, progress):
        note("condense", *cell)
        return condense_cell(config, data, methods, cell, progress)

    def logged_eval(syn, data, net, *a, models, **k):
        note("eval", syn.meta["method"], net, *models)
        return evaluate(syn, data, net, *a, models=models, **k)
    grid._condense_cell, grid.evaluate_detailed = logged_cell, logged_eval
    if rank == 1:
        def refuse(*a, **k):
            raise AssertionError("rank 1 wrote a file")
        tempfile.mkstemp = refuse


def test_two_ranks_give_one_process_numbers_and_only_rank0_writes(tmp_path, straight):
    out, log = tmp_path / "grid", str(tmp_path / "log")
    codes, _ = two_ranks(out, log, _log_units_and_forbid_writes_off_rank0)
    assert codes == [0, 0], [open(f"{log}{r}").read()[-2000:] for r in range(2)]
    assert numbers(out) == numbers(straight)   # bitwise: each net trained whole on one rank, one thread
    for name in ("random_ipc1", "herding_ipc1", "whole"):
        pt = f"cells/{name}.pt"
        assert (out / pt).read_bytes() == (straight / pt).read_bytes()
    assert_matches_manifest(out)
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
    units = [[json.loads(line) for line in open(f"{log}units{r}")] for r in range(2)]
    # cells dealt round-robin, then the (cell, net, j) units: j = 0 on rank 0, j = 1 on rank 1
    assert units[0] == [["condense", "random", 1], ["condense", "whole", None], ["eval", "random", "convnet", 0],
                        ["eval", "herding", "convnet", 0], ["eval", "whole", "convnet", 0]]
    assert units[1] == [["condense", "herding", 1], ["eval", "random", "convnet", 1],
                        ["eval", "herding", "convnet", 1], ["eval", "whole", "convnet", 1]]
    assert "| random |" in open(f"{log}0").read() and "| random |" not in open(f"{log}1").read()


def _never_wait_out_a_peer():
    """A failing rank that waited for a peer's barrier would now wait two minutes: the tests see it."""
    from torchopt_ext import _distributed
    _distributed.FAILED_BARRIER_S = 120.0


def _method_fails_on_rank1(rank, log):
    from torchopt_ext.condense.methods import METHODS, load_methods
    _never_wait_out_a_peer()
    load_methods()
    if rank == 1:
        def boom(*a, **k):
            raise CondenseError("--herding-space: boom")
        METHODS["herding"] = boom


def _evaluation_breaks_on_rank1(rank, log):
    from torchopt_ext.condense import grid
    _never_wait_out_a_peer()
    if rank == 1:
        def broken(*a, **k):
            raise RuntimeError("boom")
        grid.evaluate_detailed = broken


def test_a_failure_on_one_rank_stops_both_at_once(tmp_path, straight):
    out, log = tmp_path / "grid", str(tmp_path / "log")
    codes, seconds = two_ranks(out, log, _method_fails_on_rank1)
    assert codes == [2, 2] and seconds < 60
    removed = f"{out} was removed, as nothing worth keeping had been written"
    assert open(f"{log}0").read().endswith(f"error: --herding-space: boom; {removed}\n")
    assert open(f"{log}1").read().endswith("error: --herding-space: boom\n")
    assert not out.exists()
    # a bug (not a user error) in rank 1's evaluation: rank 1 shows it in full, rank 0 names it; the sets stay
    codes, seconds = two_ranks(out, log, _evaluation_breaks_on_rank1)
    assert codes == [2, 1] and seconds < 60
    assert open(f"{log}0").read().endswith("error: rank 1 failed (RuntimeError: boom)\n")
    assert "RuntimeError: boom" in open(f"{log}1").read()
    assert condense(out, "--resume") == 0
    assert numbers(out) == numbers(straight)


def _rank0_fails_alone(rank, log):
    """Rank 0 raises outside any agreed section while rank 1 waits in an all-gather."""
    from torchopt_ext import _distributed
    from torchopt_ext.condense import grid
    _distributed.FAILED_BARRIER_S = 1.0
    if rank == 0:
        def broken(*a, **k):
            raise RuntimeError("rank 0 alone")
        grid.set_from_state = broken


def test_a_rank_failing_alone_does_not_leave_the_other_waiting(tmp_path):
    out, log = tmp_path / "grid", str(tmp_path / "log")
    codes, seconds = two_ranks(out, log, _rank0_fails_alone, timeout=60)
    assert codes == [1, 1] and seconds < 30   # gloo's own timeout is 30 minutes
    assert "RuntimeError: rank 0 alone" in open(f"{log}0").read()
    assert "Connection closed by peer" in open(f"{log}1").read()


def test_my_share_deals_round_robin():
    items = list(range(7))
    shares = [my_share(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert my_share(items) == items   # one process computes everything


def test_nets_trained_apart_merge_into_one_evaluation(straight):
    """The grid trains each net j on its own (models=[j]); joined, they are evaluate_detailed of all nets."""
    import torch
    from torchopt_ext.condense.data import load_images
    from torchopt_ext.condense.evaluate import compute_threads, evaluate_detailed, merge_evaluations
    from torchopt_ext.condense.outputs import load_set
    data = load_images("digits", None, 0, 1 / 3, False, torch.float32)
    syn, _ = load_set(str(straight / "cells" / "herding_ipc1.pt"), data)
    with compute_threads(1):
        together = evaluate_detailed(syn, data, "convnet", 2, 2, 0, width=4)
        apart = merge_evaluations([evaluate_detailed(syn, data, "convnet", 2, 2, 0, width=4, models=[j])
                                   for j in (0, 1)])
    assert together["accuracies"][0] != together["accuracies"][1]
    assert {k: v for k, v in apart.items() if k != "wall_s"} == {k: v for k, v in together.items() if k != "wall_s"}
    grid = json.loads((straight / "results.json").read_text())["cells"]["herding_ipc1"]["eval"]["convnet"]
    assert (grid["accuracies"], grid["mean"], grid["std"]) == (together["accuracies"], together["mean"],
                                                               together["std"])
