"""Activation kinds: Python takes their numbers from the compiled extension's table
(csrc/include/torchopt_ext/ib_alpha_kinds.h); its own copy, used when the extension is missing,
is the same table, and the op solves for the activation each number is named after."""
import subprocess
import sys
import textwrap

import pytest
import torch

import torchopt_ext
from torchopt_ext import activations
from torchopt_ext._extension import _C
from torchopt_ext.ops import ib_alpha_reference

needs_ext = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")


@needs_ext
def test_the_extension_table_and_the_python_copy_agree():
    assert list(_C.activation_kinds().items()) == list(activations._KINDS_WITHOUT_EXTENSION.items())
    assert activations.KINDS == _C.activation_kinds()


def test_every_activation_carries_the_number_of_its_name():
    for name in activations.NAMES:
        assert activations.get(name).kind == activations.KINDS[name]
    fitted = activations.PiecewiseCubic.fit(torch.tanh, -3, 3, 6)
    assert fitted.kind == activations.KINDS["piecewise"] == activations.KIND_PIECEWISE


@needs_ext
@pytest.mark.parametrize("name", list(activations._KINDS_WITHOUT_EXTENSION))
def test_the_op_solves_for_the_activation_each_number_is_named_after(name):
    act = activations.PiecewiseCubic.fit(torch.sigmoid, -6, 6, 12) if name == "piecewise" else activations.get(name)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(9, 40, generator=g, dtype=torch.float64) * 3
    b = torch.randn(9, 40, generator=g, dtype=torch.float64)
    z = torch.rand(9, generator=g, dtype=torch.float64) + 1
    knots, coef = act.tables("cpu")
    alpha = torch.ops.torchopt_ext.ib_alpha(q, b, z, 0.7, 0.01, activations.KINDS[name], knots, coef)
    torch.testing.assert_close(alpha, ib_alpha_reference(q, b, z, 0.7, 0.01, act), rtol=1e-10, atol=1e-12)


def test_without_the_extension_the_python_copy_is_the_table():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["torchopt_ext._C"] = None  # makes `from torchopt_ext import _C` fail
        warnings.simplefilter("ignore")
        from torchopt_ext import activations
        assert activations.KINDS == activations._KINDS_WITHOUT_EXTENSION
        print(activations.KIND_RELU, activations.KIND_PIECEWISE, activations.get("smoothstep").kind)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "5", "3"]
