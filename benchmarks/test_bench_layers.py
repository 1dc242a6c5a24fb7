"""pytest-benchmark versions of torchopt_ext.bench.layers (not in the default test run).

Run: python -m pytest benchmarks/test_bench_layers.py --benchmark-only -q
Each case times one forward+backward+step; compare groups "act-n" across eb / ib / naive.
test_ratio_table prints the side-by-side ratio table (one run, interleaved rounds).
"""
import pytest
import torch

from torchopt_ext.bench.layers import ACTIVATIONS, _steppers, format_table, run

SIZES = (100, 300, 1000)


@pytest.mark.parametrize("method", ["eb", "ib", "naive"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_layer_step(benchmark, act, n, method):
    benchmark.group = f"{act}-{n}"
    step = _steppers(n, n, 256, act, torch.float32)[method]
    step()
    benchmark(step)


def test_ratio_table(capsys):
    rows = run(sizes=SIZES, repeats=5)
    with capsys.disabled():
        print("\n" + format_table(rows))
    assert all(r["ib_over_eb"] > 0 for r in rows)
