"""The condense grid over two gloo ranks on 127.0.0.1 (forked processes with torchrun's environment): the
same numbers as one process, each unit of work computed once by whichever rank is free, rank 0 alone writing, and a failure on either rank
reaching both at once."""
import json
import os
import time

import pytest

from tests.helpers.dist_helpers import free_port
from tests.condense.test_condense_rundir import assert_matches_manifest, condense, numbers
from tests.distill.test_distill_faults import fork, join
from torchopt_ext.condense.config import CondenseError
from torchopt_ext.condense.ranks import my_share, run_queue

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
    # each unit computed once, on one rank or the other (which one is a matter of timing)
    every = [["condense", "random", 1], ["condense", "herding", 1], ["condense", "whole", None]]
    every += [["eval", m, "convnet", j] for m in ("random", "herding", "whole") for j in range(2)]
    assert sorted(units[0] + units[1], key=json.dumps) == sorted(every, key=json.dumps)
    assert "| random |" in open(f"{log}0").read() and "| random |" not in open(f"{log}1").read()


def _never_wait_out_a_peer():
    """A failing rank that waited for a peer's barrier would now wait two minutes: the tests see it."""
    from torchopt_ext import _distributed
    _distributed.FAILED_BARRIER_S = 120.0


def _slowed(fn, seconds):
    def slow(*a, **k):
        time.sleep(seconds)
        return fn(*a, **k)
    return slow


def _method_fails_on_rank1(rank, log):
    """Every method fails on rank 1; rank 0's are slowed, so that rank 1 claims a cell before rank 0 has
    taken them all."""
    from torchopt_ext.condense.methods import METHODS, load_methods
    _never_wait_out_a_peer()
    load_methods()
    for name, method in list(METHODS.items()):
        if rank == 1:
            def boom(*a, **k):
                raise CondenseError("--herding-space: boom")
            METHODS[name] = boom
        else:
            METHODS[name] = _slowed(method, 1.0)


def _evaluation_breaks_on_rank1(rank, log):
    from torchopt_ext.condense import grid
    _never_wait_out_a_peer()
    if rank == 1:
        def broken(*a, **k):
            raise RuntimeError("boom")
        grid.evaluate_detailed = broken
    else:
        grid.evaluate_detailed = _slowed(grid.evaluate_detailed, 1.0)


def test_a_failure_on_one_rank_stops_both_at_once(tmp_path, straight):
    out, log = tmp_path / "grid", str(tmp_path / "log")
    codes, seconds = two_ranks(out, log, _method_fails_on_rank1)
    assert codes == [2, 2] and seconds < 60
    assert open(f"{log}0").read().endswith("error: --herding-space: boom\n")
    assert open(f"{log}1").read().endswith("error: --herding-space: boom\n")
    # rank 0 finished the cell in hand, and kept it, before it saw rank 1's failure
    assert len(list((out / "cells").glob("*.pt"))) == 1
    # a bug (not a user error) in rank 1's evaluation: rank 1 shows it in full, rank 0 names it; the sets stay
    codes, seconds = two_ranks(out, log, _evaluation_breaks_on_rank1, extra=("--resume",))
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
    if rank == 0:   # the methods' preparation runs on every rank outside any agreed section
        def broken(*a, **k):
            raise RuntimeError("rank 0 alone")
        grid.PREPARE = {"random": broken}


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


def _queue_on_rank(rank, port, log, seconds):
    """One of two ranks running run_queue over units that sleep ``seconds[i]``; unit 3 needs unit 1. Logs
    what it computed and (unit, rank that computed it) in the order it collected them."""
    import torch.distributed as dist
    from tests.helpers.dist_helpers import close_gloo, init_gloo
    init_gloo(rank, 2, port)
    computed, collected = [], []

    def compute(i):
        if i == 3:
            assert 1 in [c[0] for c in collected], "unit 3 ran before the unit it needs was collected"
        time.sleep(seconds[i])
        computed.append(i)
        return {"unit": i, "by": rank}

    run_queue(list(range(len(seconds))), compute, lambda i, r: collected.append((i, r["by"])) or None,
              needs=lambda i: 1 if i == 3 else None)
    with open(f"{log}{rank}.json", "w") as fh:
        json.dump({"computed": computed, "collected": collected}, fh)
    close_gloo()
    assert dist.is_initialized() is False
    return 0


def test_the_queue_gives_a_free_rank_the_next_unit(tmp_path):
    """A long unit occupies one rank while the other takes every short one (dealt in rounds, the long unit's
    rank would also take unit 2 and the run would last 3 + 0.5 s); every rank collects every result."""
    seconds, log, port = [3.0, 0.5, 0.5, 0.5, 0.5], str(tmp_path / "q"), free_port()
    t0 = time.perf_counter()
    assert join([fork(_queue_on_rank, r, port, log, seconds, log=f"{log}{r}.log") for r in range(2)], 60) == [0, 0]
    wall = time.perf_counter() - t0
    runs = [json.load(open(f"{log}{r}.json")) for r in range(2)]
    long_rank = 0 if 0 in runs[0]["computed"] else 1
    assert runs[long_rank]["computed"] == [0]
    assert runs[1 - long_rank]["computed"] == [1, 2, 3, 4]
    for run in runs:
        assert sorted(run["collected"]) == sorted([i, long_rank if i == 0 else 1 - long_rank] for i in range(5))
    assert wall < 3.0 + 2.0 + 8.0   # the long unit plus the short ones, with start-up; not their sum twice


def test_the_queue_runs_units_in_order_in_one_process():
    order = []
    run_queue(["a", "b", "c"], str.upper, lambda i, r: order.append((i, r)), needs=lambda i: 0 if i == 2 else None)
    assert order == [(0, "A"), (1, "B"), (2, "C")]
