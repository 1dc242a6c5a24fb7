"""Every custom op through its table of sample inputs (op_samples.py): the op equals its reference,
passes torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch), and gives
the eager result under torch.compile(fullgraph=True)."""
import pytest
import torch
from torch.utils._pytree import tree_map

import torchopt_ext
from tests.helpers.op_samples import TABLES, op

pytestmark = pytest.mark.skipif(not torchopt_ext.extension_available(), reason="compiled extension not built")

# float64: the kernels and the references run the same formulas in another order; float32: the
# kernels compute some activations in float32, the references in float64
_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-4)}
# the probe ops promise the references' exact formulas
_EXACT = {"probe_move_": dict(rtol=0, atol=0), "newton_lr": dict(rtol=1e-15, atol=0),
          "guarded_lr": dict(rtol=1e-15, atol=0)}


def _params(device="cpu", requires_grad=False):
    return [pytest.param(name, sample, id=f"{name}-{sample.name}")
            for name, table in TABLES.items() for sample in table.samples(device, requires_grad)]


SAMPLES = _params()
GRAD_SAMPLES = _params(requires_grad=True)


def _clone(args):
    """Fresh copies of the tensors in ``args`` (strides and requires_grad kept): ops may write them."""
    return tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                    else t, args)


def _first_tensor(tree):
    leaves = [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return leaves[0]


def _assert_close(name, got, want):
    tol = _EXACT.get(name) or _TOL[_first_tensor(got).dtype]
    torch.testing.assert_close(got, want, **tol)


def _run(name, fn, args):
    """What the op gives for ``args``: its outputs, or for a mutating op the list it wrote."""
    out = fn(*args)
    return args[0] if TABLES[name].mutates else out


def test_every_op_has_a_sample_table():
    registered = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("torchopt_ext::")}
    assert registered == set(TABLES)


@pytest.mark.parametrize("name, sample", SAMPLES)
def test_op_equals_reference(name, sample):
    got = _run(name, op(name), _clone(sample.args))
    want = _run(name, TABLES[name].reference, _clone(sample.args))
    _assert_close(name, got, want)


@pytest.mark.parametrize("name, sample", SAMPLES + GRAD_SAMPLES)
def test_opcheck(name, sample):
    torch.library.opcheck(op(name), _clone(sample.args))


@pytest.mark.parametrize("name", list(TABLES))
def test_torch_compile_fullgraph_equals_eager(name):
    """The op's first sample compiled whole (aot_eager: the fake kernel, functionalization, then the
    real kernel) against the eager call; opcheck's AOT tests cover the other samples' tracing."""
    sample = TABLES[name].samples("cpu", False)[0]
    f = op(name)
    eager_args, compiled_args = _clone(sample.args), _clone(sample.args)
    torch._dynamo.reset()
    try:
        # the arguments as closed-over constants, as a model's traced forward passes them
        compiled = torch.compile(lambda: f(*compiled_args), fullgraph=True, backend="aot_eager")
        out = compiled()
        got = compiled_args[0] if TABLES[name].mutates else out
    finally:
        torch._dynamo.reset()
    _assert_close(name, got, _run(name, f, eager_args))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(TABLES))
def test_cuda_equals_reference(name):
    if not torchopt_ext.cuda_available():
        pytest.skip("extension built without CUDA")
    for sample in TABLES[name].samples("cuda", False):
        got = _run(name, op(name), _clone(sample.args))
        want = _run(name, TABLES[name].reference, _clone(sample.args))
        _assert_close(name, got, want)
