"""pytest-benchmark timings of ib_alpha (run: pytest benchmarks --benchmark-only -s).

Each case times the kernel; the printed table times it against a same-bytes elementwise op
(torch.add(pre, grad_out)) and the pure-PyTorch reference, interleaved in the same run."""
import pytest
import torch

from torchopt_ext.bench import kernels
from torchopt_ext.ops import ib_alpha

ROWS, M = 4096, 1024


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(ROWS, M, generator=g) * 2, torch.randn(ROWS, M, generator=g) * 1e-2,
            torch.rand(ROWS, generator=g) * 100 + 1)


@pytest.mark.parametrize("name", ["relu", "hardtanh", "smoothstep", "arctan"])
def test_ib_alpha(benchmark, data, name):
    pre, grad, zsq = data
    benchmark(ib_alpha, pre, grad, zsq, 0.1, 1e-4, name)


def test_add_same_bytes(benchmark, data):
    pre, grad, _ = data
    benchmark(torch.add, pre, grad)


def test_ratio_table(capsys):
    rows = kernels.run(rows=ROWS, m=M, rounds=5)
    with capsys.disabled():
        print("\n" + kernels.format_table(rows))
