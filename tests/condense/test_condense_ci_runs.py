"""A CI-sized run of every registered method through ``python -m torchopt_ext condense``, end to end.

Each row is the smallest configuration that still runs the method's whole path (learned tensors, outer loop,
saving, evaluation, the table); the durations are reported by ``pytest --durations`` (docs/RESULTS.md), not
asserted. A method registered without a row here fails ``test_every_method_has_a_ci_run``.
"""
import json

import pytest

from torchopt_ext.cli import main
from torchopt_ext.condense.methods import load_methods

COMMON = ["--dataset", "digits", "--ipc", "1", "--width", "8", "--eval-models", "1", "--eval-epochs", "5",
          "--no-whole", "--threads", "1", "--no-progress"]
CI_RUNS = {
    "random": [],
    "herding": [],
    "whole": ["--whole-epochs", "2"],
    "dd": ["--dd-outer-iters", "3", "--dd-epochs", "2", "--dd-batch-real", "64"],
    "ld": ["--ld-outer-iters", "3", "--ld-epochs", "2", "--ld-batch-real", "64"],
    "gtn": ["--gtn-outer-iters", "3", "--gtn-epochs", "2", "--gtn-batch-real", "64", "--gtn-gen-width", "8"],
    "kip": ["--kip-iterations", "3", "--kip-target-batch", "64"],
    "dc": ["--dc-iterations", "2", "--dc-batch-real", "32"],
    "dsa": ["--dsa-iterations", "2", "--dsa-batch-real", "32"],
    "dm": ["--dm-iterations", "3", "--dm-batch-real", "32"],
    "mtt": ["--mtt-experts", "1", "--mtt-train-epochs", "3", "--mtt-iterations", "2", "--mtt-syn-steps", "2",
            "--mtt-expert-epochs", "1", "--mtt-max-start-epoch", "1"],
}


def test_every_method_has_a_ci_run():
    assert sorted(CI_RUNS) == sorted(load_methods())


@pytest.mark.parametrize("method", sorted(CI_RUNS))
def test_ci_sized_run(method, tmp_path):
    out = tmp_path / "out"
    assert main(["condense", "--method", method, *COMMON, *CI_RUNS[method], "--out", str(out)]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    (record,) = cells.values()
    assert record["method"] == method
    acc = record["eval"]["convnet"]["accuracies"]
    assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0
    assert (out / record["file"]).is_file() and (out / record["png"]).is_file()


def test_eval_augment_reaches_every_evaluation(tmp_path):
    out = tmp_path / "out"
    assert main(["condense", "--method", "random", *COMMON, "--eval-augment", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells"]["random_ipc1"]["eval"]["convnet"]["augment"]
    assert "augment" in res["protocol"].lower()
