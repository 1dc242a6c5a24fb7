"""implicit(model) on models other than nn.Sequential: what converts, what stays explicit and why,
and that the converted model computes, copies, saves and steps like the original."""
import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchopt_ext.nn import Arctan, ImplicitLinear, Smoothstep, implicit
from torchopt_ext.nn.hyper import is_implicit
from torchopt_ext.optim import ImplicitSGD


class MyAtan(nn.Module):
    """A user's own arctan module (not torchopt_ext.nn.Arctan)."""

    def forward(self, x):
        return torch.atan(x)


class Net(nn.Module):
    """Activations as functions, a method, a shared module, then a norm and a head."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc4, self.fc5, self.fc6 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.width = 8

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = torch.atan(self.fc3(h))
        h = self.act(self.fc4(h))
        h = self.fc5(h).relu()
        h = self.norm(self.fc6(h))
        return self.head(h)

    def widths(self):
        return [m.out_features for m in self.modules() if hasattr(m, "out_features")]


class Twice(nn.Module):
    """fc's output feeds relu and a residual add: relu cannot be folded into fc."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        h = F.relu(h) + h
        return self.out(F.relu(self.fc2(h)))


class Dynamic(nn.Module):
    """A data-dependent branch: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.seq(x)
        return F.relu(self.fc(h)) if x.sum() > 0 else h


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class Where(nn.Module):
    """A ReLU module also used after a Conv1d, and a Linear whose activation is in the parent."""

    def __init__(self):
        super().__init__()
        self.inner, self.block = nn.Linear(4, 4), Block()
        self.conv = nn.Conv1d(1, 1, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.inner(x))
        h = F.relu(self.block(h))
        return self.act(self.conv(h[:, None]))[:, 0]


def _quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these conversions must not warn
        return implicit(model, **kw)


def test_class_model_functions_methods_and_modules_convert():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(10, 6)
    conv, report = _quiet(model)
    assert conv is not model and type(model.fc1) is nn.Linear  # a copy by default
    # converted: F.relu, torch.atan, the ReLU module, .relu(); tanh waits for fit, fc6 and head stay
    kinds = {n: m.activation.name for n, m in conv.named_modules() if isinstance(m, ImplicitLinear)}
    assert kinds == {"fc1": "relu", "fc3": "arctan", "fc4": "relu", "fc5": "relu"}
    assert [line.split(":")[0] for line in report.converted] == ["fc1", "fc3", "fc4", "fc5"]
    assert "+ F.relu ->" in report.converted[0] and "+ ReLU (act) ->" in report.converted[2]
    assert "fc2: Linear: tanh needs fit='tanh'" in report.explicit
    assert "fc6: Linear: followed by LayerNorm" in report.explicit
    assert "head: Linear: no activation after it: it is returned" in report.explicit
    assert report.rewritten == [""] and not report.fallback
    # still a Net (methods, attributes), same state_dict keys, same forward bit for bit
    assert isinstance(conv, Net) and conv.width == 8 and conv.widths() == model.widths()
    assert list(conv.state_dict()) == list(model.state_dict())
    assert torch.equal(conv(x), model(x))
    assert type(conv.act) is nn.Identity  # only ever called after fc4
    # the Linear's own Parameter objects moved into the ImplicitLinear
    w1, b5 = model.fc1.weight, model.fc5.bias
    same, _ = _quiet(model, inplace=True)
    assert same is model and isinstance(model, Net) and type(model.fc1) is ImplicitLinear
    assert model.fc1.weight is w1 and model.fc5.bias is b5 and is_implicit(w1)
    fitted, rep = _quiet(Net(), fit="tanh")
    assert fitted.fc2.activation.name == "tanh" and 0 < rep.max_fit_error < 1e-3


def test_converted_forward_is_bitwise_the_original_for_every_form():
    forms = {
        "F.relu": (F.relu, "relu"), "torch.relu": (torch.relu, "relu"),
        ".relu()": (lambda h: h.relu(), "relu"), "ReLU": (nn.ReLU(), "relu"),
        "F.hardtanh": (F.hardtanh, "hardtanh"), "Hardtanh": (nn.Hardtanh(), "hardtanh"),
        "torch.atan": (torch.atan, "arctan"), "torch.arctan": (torch.arctan, "arctan"),
        ".atan()": (lambda h: h.atan(), "arctan"), "Arctan": (Arctan(), "arctan"),
        "MyAtan": (MyAtan(), "arctan"), "Smoothstep": (Smoothstep(), "smoothstep"),
    }
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(7, 5, dtype=dtype) * 3
        for name, (act, kind) in forms.items():
            torch.manual_seed(1)
            model = _One(act).to(dtype)
            conv, report = _quiet(model)
            assert len(report.converted) == 1 and conv.fc.activation.name == kind, name
            assert torch.equal(conv(x), model(x)), name


class _One(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


def test_sequential_with_a_users_atan_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), MyAtan(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    conv, report = _quiet(model)
    assert type(conv) is nn.Sequential and not report.rewritten  # modules swapped, no new forward
    assert [type(m).__name__ for m in conv] == ["ImplicitLinear", "Identity", "ImplicitLinear",
                                                "Identity", "Linear"]
    assert conv[0].activation.name == "arctan" and "+ MyAtan (1) ->" in report.converted[0]
    x = torch.randn(5, 4)
    assert torch.equal(conv(x), model(x))


def test_output_used_twice_stays_explicit_with_the_reason():
    torch.manual_seed(0)
    model = Twice()
    conv, report = _quiet(model)
    assert type(conv.fc) is nn.Linear and type(conv.fc2) is ImplicitLinear
    assert "fc: Linear: output used twice (by relu, add)" in report.explicit
    x = torch.randn(3, 4)
    assert torch.equal(conv(x), model(x))


def test_untraceable_model_falls_back_to_sequentials_with_a_warning():
    torch.manual_seed(0)
    model = Dynamic()
    with pytest.warns(UserWarning, match=r"torch.fx could not trace Dynamic \(TraceError"):
        conv, report = implicit(model)
    assert "TraceError" in report.fallback and "not traced" in str(report)
    assert type(conv.seq[0]) is ImplicitLinear and type(conv.seq[1]) is nn.Identity
    assert type(conv.fc) is nn.Linear
    assert any(e.startswith("fc: Linear: not inside an nn.Sequential") for e in report.explicit)
    for x in (torch.rand(3, 4), -torch.rand(3, 4)):  # both branches
        assert torch.equal(conv(x), model(x))


def test_nothing_converts_warns_naming_each_linear_and_why():
    class Nothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.d, self.e, self.f = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.norm, self.relu6 = nn.LayerNorm(4), nn.ReLU6()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.b(self.norm(self.a(x))))
            h = F.relu(self.d(h)) * self.d.weight.sum()
            h = F.relu(self.e(F.relu(self.e(h))))
            h = self.c(self.relu6(self.f(h)))
            return self.head(h * h)

    with pytest.warns(UserWarning, match="nothing in Nothing converted") as record:
        _, report = implicit(Nothing())
    message = str(record[0].message)
    for part in ("a: followed by LayerNorm", "b: tanh needs fit='tanh'",
                 "c: output used twice (by mul)", "head: no activation after it: it is returned",
                 "d: its weight is read directly in the forward",
                 "e: called 2 times in the forward (shared weights)",
                 "f: followed by ReLU6(min_val=0.0, max_val=6.0); only hardtanh on (-1, 1) converts"):
        assert part in message
    assert "implicit backprop (0):" in str(report) and "a: Linear: followed by LayerNorm" in report.explicit
    with pytest.warns(UserWarning, match="it has no nn.Linear"):
        implicit(nn.Sequential(nn.Conv1d(1, 1, 1)))


def test_where_the_activation_is_decides():
    """A ReLU module also applied to a Conv1d cannot become Identity: the forward that calls it is
    rewritten instead. A Linear whose activation is applied by the parent stays explicit (the
    block's own forward would change)."""
    torch.manual_seed(0)
    model = Where()
    conv, report = _quiet(model)
    assert type(conv.inner) is ImplicitLinear and type(conv.act) is nn.ReLU
    assert report.rewritten == [""] and isinstance(conv, Where)
    assert type(conv.block.fc) is nn.Linear
    assert any("block.fc: Linear: its activation (F.relu) is applied outside block" in e
               for e in report.explicit)
    x = torch.randn(3, 4)
    assert torch.equal(conv(x), model(x))


def test_forwards_that_tracing_would_freeze_are_not_rewritten():
    class TrainOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = F.relu(self.fc(x))
            return h * 2 if self.training else h

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x)) + torch.ones(4)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            h = F.relu(self.fc(x))
            return h if mask is None else h * mask  # traced, mask is never None

    for cls, why in ((TrainOnly, "differs between train() and eval()"),
                     (Constant, "makes tensor constants"), (Masked, "or with mask=None")):
        model = cls()
        with pytest.warns(UserWarning, match=re.escape(why)):
            conv, report = implicit(model)
        assert type(conv.fc) is nn.Linear and type(conv) is cls and not report.rewritten
        assert not hasattr(conv, "_tensor_constant0")  # what tracing stored is removed again


def test_gradients_are_the_implicit_ones():
    torch.manual_seed(0)

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.head(torch.atan(self.fc1(x)))

    model = Small().double()
    conv, _ = _quiet(model, identity=True)
    by_hand = nn.Sequential(ImplicitLinear(5, 7, "arctan"), ImplicitLinear(7, 3, "identity")).double()
    by_hand.load_state_dict({"0.weight": model.fc1.weight, "0.bias": model.fc1.bias,
                             "1.weight": model.head.weight, "1.bias": model.head.bias})
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    grads = []
    for net in (conv, by_hand, model):
        opt = ImplicitSGD(net.parameters(), lr=2.0, weight_decay=0.01)
        F.cross_entropy(net(x), y).backward()
        grads.append([p.grad for p in net.parameters()])
        opt.step()
    for got, ref, explicit in zip(*grads):
        assert torch.equal(got, ref)
        assert not torch.allclose(got, explicit, rtol=1e-3)  # lr=2: the implicit step differs
    assert torch.equal(conv(x), by_hand(x))  # and the steps agree


def test_identity_converts_the_head_and_other_bare_linears():
    torch.manual_seed(0)
    model = Twice()
    conv, report = _quiet(model, identity=True)
    kinds = {n: m.activation.name for n, m in conv.named_modules() if isinstance(m, ImplicitLinear)}
    assert kinds == {"fc": "identity", "fc2": "relu", "out": "identity"}
    assert ("out: Linear(in_features=4, out_features=2, bias=True) -> ImplicitLinear(identity) "
            "(identity=True; no activation after it: it is returned)") in report.converted
    x = torch.randn(3, 4)
    assert torch.equal(conv(x), model(x))
    # a weight used elsewhere never converts, identity or not
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.warns(UserWarning, match=r"0: its weight is shared with 2 \(tied\)"):
        conv, _ = implicit(tied, identity=True)
    assert not any(isinstance(m, ImplicitLinear) for m in conv)


def test_rewritten_model_copies_saves_loads_and_steps():
    torch.manual_seed(0)
    model = Net()
    conv, report = _quiet(model, identity=True)
    assert report.rewritten == [""]
    x = torch.randn(4, 6)
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(conv)
    again, _ = _quiet(conv)  # converting a converted model changes nothing
    for other in (copied, loaded, again):
        assert isinstance(other, Net) and type(other.fc1) is ImplicitLinear
        assert torch.equal(other(x), conv(x))
        assert [is_implicit(p) for p in other.parameters()] == [is_implicit(p) for p in conv.parameters()]
        assert other.fc1.weight is not conv.fc1.weight
    assert sum(is_implicit(p) for p in conv.parameters()) == 14  # 7 Linears: all but the norm
    # state_dict keys unchanged: it loads into the original model and back
    fresh = Net()
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh(x), model(x))
    copied.load_state_dict(model.state_dict())
    # the copy's optimizer owns the copy's layers
    opt = ImplicitSGD(copied.parameters(), lr=0.1, weight_decay=0.01)
    before = copied.fc1.weight.detach().clone()
    copied(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(copied.fc1.weight, before) and torch.equal(conv.fc1.weight, model.fc1.weight)


@pytest.fixture
def one_thread():
    # 64-wide layers gain nothing from threads, and on a shared machine their hand-offs dominate
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _mlp(act):
    return nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 10))


def test_identity_bounds_every_step_at_any_lr(one_thread):
    """Paper §4.1: with weight decay mu > 0 an implicit layer's step is bounded at any lr: as
    lr -> inf its new weights approach -sum_i alpha_i z_i / mu, where the alpha_i (one per sample)
    are bounded by the output gradients. An explicit layer's step grows like lr. One step of a
    64-64-64-10 relu MLP on a digits batch, lr 1e2 ... 1e10: with identity=True the largest weight
    stops growing; without it the explicit head's largest weight grows 100x per 100x lr."""
    X, y = _digits()
    largest = {}
    for identity in (True, False):
        for lr in (1e2, 1e4, 1e6, 1e8, 1e10):
            torch.manual_seed(0)
            model, _ = _quiet(_mlp(nn.ReLU), identity=identity)
            opt = ImplicitSGD(model.parameters(), lr=lr, weight_decay=1e-4)
            F.cross_entropy(model(X[:64]), y[:64]).backward()
            opt.step()
            largest[identity, lr] = max(p.abs().max().item() for p in model.parameters())
    bounded = [largest[True, lr] for lr in (1e6, 1e8, 1e10)]
    assert all(math.isfinite(v) for v in largest.values())
    assert max(bounded) < 1.01 * min(bounded) < 1e3
    assert largest[False, 1e10] > 1e3 * largest[False, 1e6] > 1e6


def test_arctan_mlp_stays_finite_for_ten_epochs_at_lr_1e6(one_thread):
    """Digits, a 64-64-64-10 arctan MLP converted with identity=True, ImplicitSGD(lr=1e6,
    weight_decay=1e-4), batch 64, 10 epochs: every weight and the loss stay finite (largest weight
    ~2e4; accuracy stays at chance, finite is all this lr gives). Without identity=True the explicit head overflows within the first epoch. (A relu MLP
    overflows in float32 within the first epoch either way: relu's outputs grow with the weights
    below, so each layer's per-step bound, ~|sum_i alpha_i z_i| / mu, compounds across layers; arctan
    keeps z within +-pi/2.)"""
    X, y = _digits()

    def train(identity, epochs):
        torch.manual_seed(0)
        model, _ = _quiet(_mlp(Arctan), identity=identity)
        opt = ImplicitSGD(model.parameters(), lr=1e6, weight_decay=1e-4)
        order = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=order)
            for i in range(0, len(X), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                loss = F.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                if not (math.isfinite(loss.item())
                        and all(torch.isfinite(p).all() for p in model.parameters())):
                    return False
        return True

    assert train(identity=True, epochs=10)
    assert not train(identity=False, epochs=1)
