"""Condensing with several architectures at once (--distill-nets) and the memory table of the grid."""
import json
import types

import pytest
import torch

from tests.helpers import condense_fixtures as F
from torchopt_ext.cli import main
from torchopt_ext.condense.config import CondenseConfig, CondenseError
from torchopt_ext.condense.methods import _bilevel as B
from torchopt_ext.condense.methods import _matching as M
from torchopt_ext.condense.report import memory_markdown


def cfg(**kw):
    base = dict(net="convnet", width=4, depth=None)
    base.update(kw)
    c = types.SimpleNamespace(**base)
    c.train_nets = list(kw.get("distill_nets") or [c.net])
    return c


def test_one_net_draws_as_before_and_several_draw_each(monkeypatch):
    data = F.tiny_digits(2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    net = M.fresh_net(cfg(), data, g1)
    before = B.seeded(g2, lambda: B.build_net(cfg(), data)).train()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.state_dict().values()))
    assert torch.equal(g1.get_state(), g2.get_state())   # one net: the generator is used as it was
    g = torch.Generator().manual_seed(0)
    kinds = {tuple(p.shape for p in M.fresh_net(cfg(distill_nets=["convnet", "mlp", "lenet"]), data, g).parameters())
             for _ in range(30)}
    assert len(kinds) == 3


@pytest.mark.parametrize("kw, message", [
    (dict(distill_nets=["convnet", "resnet"]), "--distill-nets: expected names from"),
    (dict(distill_nets=["mlp", "mlp"]), "--distill-nets: expected each net once"),
    (dict(methods=["random", "dd"], distill_nets=["convnet", "mlp"]),
     "--distill-nets: expected one net for --method dd (several nets work with dc, dsa, dm)"),
])
def test_bad_distill_nets_are_refused(kw, message):
    with pytest.raises(CondenseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CondenseConfig(**kw).validate()


def test_memory_table_lists_what_each_method_counts():
    cells = {"dm_ipc1": {"meta": {"held_bytes": [2 ** 20, 3 * 2 ** 20]}},
             "mtt_ipc1": {"meta": {"peak_state_bytes": 2 ** 21}}, "kip_ipc1": {"meta": {"peak_held_bytes": 2 ** 19}}}
    text = memory_markdown(cells, ["dm", "mtt", "kip", "random"], [1])
    assert "| dm | 3.0 |" in text and "| mtt | 2.0 |" in text and "| kip | 0.5 |" in text and "| random | — |" in text
    assert memory_markdown({"random_ipc1": {"meta": {}}}, ["random"], [1]) == ""


def test_kip_counts_its_kernel_matrices():
    """One KIP step holds at least the support-support and target-support kernels autograd saves."""
    from torchopt_ext.condense.methods.kip import kip
    data = F.tiny_digits(10)
    config = CondenseConfig(methods=["kip"], options={"kip_iterations": 2, "kip_target_batch": 50})
    syn = kip(data, 2, config, torch.Generator().manual_seed(0))
    m, b = 20, 50
    assert syn.meta["peak_held_bytes"] >= 8 * (m * m + b * m)


def test_grid_condenses_dm_with_two_nets_and_reports_memory(tmp_path):
    out = tmp_path / "g"
    code = main(["condense", "--method", "random,dm", "--ipc", "1", "--no-whole", "--width", "8",
                 "--distill-nets", "convnet,mlp", "--eval-nets", "convnet,mlp", "--eval-models", "1",
                 "--eval-epochs", "3", "--dm-iterations", "4", "--threads", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["distill_nets"] == ["convnet", "mlp"]
    assert len(results["cells"]["dm_ipc1"]["meta"]["held_bytes"]) == 4
    text = (out / "results.md").read_text()
    assert "nets convnet, mlp (one drawn per iteration)" in text and "## Memory per outer iteration (MiB)" in text
