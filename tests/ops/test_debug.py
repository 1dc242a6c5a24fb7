"""torchopt_ext.debug: each switch does what its docstring says and is restored, each counter
counts the elements its path handed on, and describe() reports them."""
import subprocess
import sys
import textwrap

import pytest
import torch

import torchopt_ext
from torchopt_ext import debug
from torchopt_ext.ops import ib_alpha

pytestmark = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")
ORDER = ["baseline", "avx2", "avx512"]


def test_the_isa_cap_gives_the_best_loop_at_or_below_it_and_is_restored():
    available = debug.cpu_isas()
    assert available[0] == "baseline" and available == [isa for isa in ORDER if isa in available]
    best = debug.cpu_isa()
    assert best == available[-1]
    for cap in ORDER + ["default", "auto"]:
        with debug.kernel_settings(cpu_isa=cap):
            top = ORDER.index({"default": "baseline", "auto": "avx512"}.get(cap, cap))
            assert debug.cpu_isa() == [isa for isa in available if ORDER.index(isa) <= top][-1]
        assert debug.cpu_isa() == best
    with pytest.raises(RuntimeError, match="isa must be 'auto', 'avx512', 'avx2', 'baseline' or 'default'"):
        debug.set_cpu_isa("sse9")
    assert debug.cpu_isa() == best


def test_the_float32_switch_sends_every_kind_to_the_double_solver_and_is_restored():
    g = torch.Generator().manual_seed(4)
    q, b = torch.randn(16, 64, generator=g) * 3, torch.randn(16, 64, generator=g)
    z = torch.rand(16, generator=g) + 1
    for isa in debug.cpu_isas():
        with debug.kernel_settings(cpu_isa=isa):
            assert debug.fast_float32_activations() == ["arctan", "hardtanh", "smoothstep"]
            with debug.kernel_settings(fast_float32=False):
                assert debug.fast_float32_activations() == []
                for name in ("arctan", "hardtanh", "smoothstep"):
                    exact = ib_alpha(q.double(), b.double(), z.double(), 0.7, 0.01, name).float()
                    assert torch.equal(ib_alpha(q, b, z, 0.7, 0.01, name), exact), (isa, name)
            assert debug.fast_float32_activations() == ["arctan", "hardtanh", "smoothstep"]
    assert debug.set_fast_float32(True) is True


def test_the_counters_count_what_each_pass_handed_on():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(64, 512, generator=g) * 2
    b = torch.randn(64, 512, generator=g)
    z = torch.rand(64, generator=g) * 100 + 1
    debug.fast_float32_counts(reset=True)
    ib_alpha(q, b, z, 1.0, 1e-4, "smoothstep")  # large steps: the first pass leaves most
    counts = debug.fast_float32_counts()
    assert counts["second_pass"] >= 0.2 * q.numel()
    assert debug.fast_float32_counts(reset=True) == counts
    assert debug.fast_float32_counts() == {"second_pass": 0, "redone": 0}
    # |b| too large for the float32 bounds: those elements go to the double solver, one count each
    big = torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[2e9, 0.3, -3e9]]), torch.tensor([2.0])
    ib_alpha(*big, 0.3, 0.0, "hardtanh")
    assert debug.fast_float32_counts(reset=True)["redone"] == 2
    with debug.kernel_settings(fast_float32=False):
        ib_alpha(*big, 0.3, 0.0, "hardtanh")
        ib_alpha(q, b, z, 1.0, 1e-4, "smoothstep")
    assert debug.fast_float32_counts() == {"second_pass": 0, "redone": 0}


def test_describe_reports_every_setting():
    info = debug.describe()
    assert info["extension"] is True and info["cpu_isa"] == debug.cpu_isa()
    assert info["cpu_isas"] == debug.cpu_isas()
    assert info["fast_float32_activations"] == debug.fast_float32_activations()
    assert set(info["fast_float32_counts"]) == {"second_pass", "redone"}
    assert debug.CPU_CAPABILITY_VAR in info


def test_without_the_extension_describe_says_so_and_the_switches_refuse():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["torchopt_ext._C"] = None  # makes `from torchopt_ext import _C` fail
        warnings.simplefilter("ignore")
        from torchopt_ext import debug
        assert debug.describe()["extension"] is False
        try:
            debug.cpu_isa()
        except RuntimeError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "compiled extension torchopt_ext._C is not loaded" in out.stdout
