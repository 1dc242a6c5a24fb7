"""The CPU ib_alpha kernel's choice of row loop (csrc/cpu/ib_alpha_cpu.cpp): the environment
variable TORCHOPT_EXT_CPU_CAPABILITY picks, bit for bit, the loop set_cpu_isa picks, for every
kind, dtype and float32 path; every instruction set's loops agree with the baseline's; and a value
the kernel does not know is one clear error. (Each loop against the float64 reference:
test_ib_alpha_op.py::test_every_row_loop_isa_agrees.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchopt_ext
from torchopt_ext import activations, debug
from torchopt_ext.ops import ib_alpha

pytestmark = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")
NAMES = ["relu", "arctan", "hardtanh", "smoothstep", "identity", "fitted_sigmoid"]
ISAS = ["baseline", "avx2", "avx512"]
_fit = {}


def _act(name):
    if name == "fitted_sigmoid":
        return _fit.setdefault(name, activations.PiecewiseCubic.fit(torch.sigmoid, -6, 6, 12))
    return activations.get(name)


def _cases():
    """(label, q, b, z, lr) in float64, each taking other branches of the loops: a width that
    leaves a vector remainder; tiny and huge steps (float32 rows the fast paths refuse, relu rows
    whose float32 constants overflow at lr 1e39); b large enough that smoothstep's and arctan's
    first pass leaves elements to the second; a row wider than one float32 block (2048)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(37, 301, generator=g, dtype=torch.float64) * 3
    b = torch.randn(37, 301, generator=g, dtype=torch.float64)
    z = torch.rand(37, generator=g, dtype=torch.float64) * 4 + 1
    for lr in (1e-14, 1e-3, 0.7, 30.0, 1e39):
        yield f"lr={lr}", q, b, z, lr
    yield "wide", torch.randn(2, 4500, generator=g, dtype=torch.float64) * 2, \
        torch.randn(2, 4500, generator=g, dtype=torch.float64), torch.tensor([1.5, 80.0], dtype=torch.float64), 1.0


def outputs():
    """{label: alpha} for every activation, dtype, case and (float32) fast-path setting."""
    out = {}
    for fast in (True, False):
        was = debug.set_fast_float32(fast)
        try:
            for name in NAMES:
                for dtype in (torch.float32, torch.float64):
                    if dtype == torch.float64 and not fast:
                        continue  # the switch is float32's alone
                    for label, q, b, z, lr in _cases():
                        out[f"{name} {dtype} fast={fast} {label}"] = ib_alpha(
                            q.to(dtype), b.to(dtype), z.to(dtype), lr, 0.01, _act(name))
        finally:
            debug.set_fast_float32(was)
    return out


def _bits(t):
    """t's bit patterns, so that equal NaNs compare equal."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _differing(a, b):
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(_bits(a[k]), _bits(b[k])))


def _child(env_value, code):
    """`code` in a fresh interpreter in the checkout, which imports this module as tests.ops.test_cpu_dispatch."""
    env = dict(os.environ, TORCHOPT_EXT_CPU_CAPABILITY=env_value)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root)


@pytest.mark.parametrize("isa", ISAS)
def test_the_variable_picks_the_loop_set_cpu_isa_picks(isa, tmp_path):
    if isa not in debug.cpu_isas():
        pytest.skip(f"this CPU or build has no {isa} loops")
    path = tmp_path / "alpha.pt"
    # ATen's name "default" for the baseline
    run = _child("default" if isa == "baseline" else isa, f"""
        import torch
        from torchopt_ext import debug
        from tests.ops import test_cpu_dispatch
        torch.save(test_cpu_dispatch.outputs(), {str(path)!r})
        print(debug.cpu_isa())
        """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == isa
    with debug.kernel_settings(cpu_isa=isa):
        assert debug.cpu_isa() == isa
        here = outputs()
    assert _differing(torch.load(path), here) == []


def test_every_instruction_set_agrees_with_the_baseline():
    """Close, not bitwise: each instruction set's file is compiled with its own flags, so the compiler
    contracts a*b+c into FMAs differently, and the vector arctan calls libmvec's atan (4 ulp); relu and
    identity, which have neither, agree bit for bit."""
    with debug.kernel_settings(cpu_isa="baseline"):
        base = outputs()
    for isa in debug.cpu_isas():
        with debug.kernel_settings(cpu_isa=isa):
            here = outputs()
        assert [k for k in _differing(here, base) if k.split()[0] in ("relu", "identity")] == [], isa
        for k in base:
            tol = 1e-3 if base[k].dtype == torch.float32 else 1e-9
            torch.testing.assert_close(here[k], base[k], rtol=tol, atol=tol, equal_nan=True, msg=f"{isa} {k}")


def test_an_unknown_value_is_one_clear_error_that_set_cpu_isa_overrides():
    run = _child("sse9", """
        import torch
        from torchopt_ext import debug
        from torchopt_ext.ops import ib_alpha
        q = torch.ones(2, 3); z = torch.ones(2)
        for _ in range(2):  # every call, not only the first
            try:
                ib_alpha(q, q, z, 0.1, 0.0, "relu")
            except RuntimeError as exc:
                print("raised:", str(exc).splitlines()[0])
        print("describe:", debug.describe()["error"])
        print("override:", debug.set_cpu_isa("baseline"), float(ib_alpha(q, q, z, 0.1, 0.0, "relu")[0, 0]))
        """)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    raised = [line for line in lines if line.startswith("raised:")]
    assert len(raised) == 2
    for line in raised + [lines[-2]]:
        assert "TORCHOPT_EXT_CPU_CAPABILITY must be 'auto', 'avx512', 'avx2', 'baseline' or 'default'" in line
        assert "got 'sse9'" in line
    assert lines[-1] == "override: baseline 1.0"  # relu, q = b = 1 beyond the kink: alpha = b/d
