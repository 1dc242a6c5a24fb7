"""``implicit(model)``: turn every nn.Linear whose output goes only into a supported activation into
an ImplicitLinear, in any model.

The model's forward is traced with ``torch.fx`` to see what each Linear's output goes into. A
Linear converts when it is called once, its weights are used nowhere else, and its output's only
use is a supported activation called from the same module's forward (the module that calls the
Linear). The Linear becomes an ImplicitLinear holding the same Parameter objects. How the activation
leaves the forward depends on what it is:

* an activation module called only after converted Linears becomes ``nn.Identity`` (the layer
  applies it); the model keeps its own class and forward;
* a function or method call (``F.relu(self.fc(x))``), or an activation module also called
  elsewhere, is removed from the traced forward of the module making the call, and that module's
  class becomes a subclass of its class whose ``forward`` is the rewritten trace (``isinstance``,
  methods, attributes and hooks stay; deepcopy and pickle rebuild the subclass).

Everything else (convolutions, norms, attention, a Linear without a supported activation) stays
explicit backprop, with the reason in the report. When torch.fx cannot trace the model, only
consecutive children of an ``nn.Sequential`` are paired (elsewhere the order of calls is unknown).
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

from torchopt_ext import activations as _act
from torchopt_ext.nn import hyper
from torchopt_ext.nn.linear import ImplicitLinear
from torchopt_ext.nn.modules import Arctan, Smoothstep
from torchopt_ext.nn.rnn import ImplicitRNN

# activations that need a fitted piecewise cubic: (function, lo, hi, pieces)
_FITTABLE: Dict[type, Tuple[Callable, float, float, int]] = {
    nn.Tanh: (torch.tanh, -4.0, 4.0, 32),
    nn.Sigmoid: (torch.sigmoid, -8.0, 8.0, 32),
    nn.GELU: (nn.functional.gelu, -4.0, 4.0, 32),
}
_FIT_NAMES = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
_fitted_cache: Dict[type, _act.PiecewiseCubic] = {}
_BUILT_IN = ("relu", "arctan", "hardtanh", "smoothstep")

# traced function -> (activation, label, its arguments after the input, values they must have)
_FUNCTIONS = {
    F.relu: ("relu", "F.relu", ("inplace",), {}),
    torch.relu: ("relu", "torch.relu", (), {}),
    torch.atan: ("arctan", "torch.atan", (), {}),
    torch.arctan: ("arctan", "torch.arctan", (), {}),
    F.hardtanh: ("hardtanh", "F.hardtanh", ("min_val", "max_val", "inplace"),
                 {"min_val": -1.0, "max_val": 1.0}),
    torch.tanh: ("tanh", "torch.tanh", (), {}),
    torch.sigmoid: ("sigmoid", "torch.sigmoid", (), {}),
    F.gelu: ("gelu", "F.gelu", ("approximate",), {"approximate": "none"}),
}
# Tensor methods (F.tanh and F.sigmoid trace to these too)
_METHODS = {"relu": "relu", "atan": "arctan", "arctan": "arctan", "tanh": "tanh", "sigmoid": "sigmoid"}
# modules of this package that tracing must not step into
_OWN_LEAVES = (ImplicitLinear, ImplicitRNN, Arctan, Smoothstep)


@dataclass
class ConversionReport:
    """What ``implicit`` did: ``converted`` and ``explicit`` hold "path: description" lines (an
    explicit Linear's line ends with why it stayed explicit); ``max_fit_error`` the largest error of
    a fitted activation used (0 if none); ``rewritten`` the modules whose forward was replaced by
    its rewritten trace ("" is the model itself); ``fallback`` why torch.fx was not used ("" when
    it was)."""

    converted: List[str] = field(default_factory=list)
    explicit: List[str] = field(default_factory=list)
    max_fit_error: float = 0.0
    rewritten: List[str] = field(default_factory=list)
    fallback: str = ""

    def __str__(self) -> str:
        lines = [f"implicit backprop ({len(self.converted)}):"] + [f"  {c}" for c in self.converted]
        lines += [f"explicit backprop ({len(self.explicit)}):"] + [f"  {e}" for e in self.explicit]
        if self.rewritten:
            lines.append("forward rewritten: " + ", ".join(p or "(root)" for p in self.rewritten))
        if self.fallback:
            lines.append(f"not traced ({self.fallback}): only nn.Sequential children were paired")
        if self.max_fit_error:
            lines.append(f"largest piecewise-cubic fit error: {self.max_fit_error:.2e}")
        return "\n".join(lines)


def _fit_types(fit) -> Tuple[type, ...]:
    if fit is True:
        return tuple(_FITTABLE)
    if not fit:
        return ()
    out = []
    for f in ([fit] if isinstance(fit, (str, type)) else fit):
        t = _FIT_NAMES.get(f.lower()) if isinstance(f, str) else f
        if t not in _FITTABLE:
            raise ValueError(f"implicit: fit must hold names from {sorted(_FIT_NAMES)} or their nn "
                             f"module types (or be True/False), got {f!r}")
        out.append(t)
    return tuple(out)


def _resolve(kind: str, fit_types) -> Tuple[Union[None, str, _act.Activation], str]:
    """The activation for ``kind`` (a built-in name or a fitted cubic), or None and why not."""
    if kind in _BUILT_IN:
        return kind, ""
    t = _FIT_NAMES[kind]
    if t not in fit_types:
        return None, f"{kind} needs fit='{kind}'"
    if t not in _fitted_cache:
        fn, lo, hi, pieces = _FITTABLE[t]
        _fitted_cache[t] = _act.PiecewiseCubic.fit(fn, lo, hi, pieces, name=t.__name__.lower())
    return _fitted_cache[t], ""


class _Act(NamedTuple):
    """A supported activation found after a Linear: its kind ("relu", "tanh", ...), a label for the
    report, and the module called (None for a function or method)."""

    kind: str
    label: str
    module: Optional[nn.Module]


def _module_kind(mod: nn.Module, wrappers: Dict[int, str]) -> Tuple[Optional[str], str]:
    """(kind, "") for a supported activation module, else (None, why not)."""
    name = type(mod).__name__
    if isinstance(mod, nn.ReLU):
        return "relu", ""
    if isinstance(mod, nn.Hardtanh):
        if mod.min_val == -1.0 and mod.max_val == 1.0:
            return "hardtanh", ""
        return None, (f"followed by {name}(min_val={mod.min_val}, max_val={mod.max_val}); "
                      "only hardtanh on (-1, 1) converts")
    if isinstance(mod, Arctan):
        return "arctan", ""
    if isinstance(mod, Smoothstep):
        return "smoothstep", ""
    if isinstance(mod, nn.Tanh):
        return "tanh", ""
    if isinstance(mod, nn.Sigmoid):
        return "sigmoid", ""
    if isinstance(mod, nn.GELU):
        if mod.approximate == "none":
            return "gelu", ""
        return None, f"followed by GELU(approximate={mod.approximate!r}); only the exact GELU is fitted"
    if id(mod) in wrappers:
        return wrappers[id(mod)], ""
    return None, f"followed by {name}"


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the output"
    return getattr(node.target, "__name__", str(node.target))


def _node_act(node: fx.Node, inp: fx.Node, root: nn.Module,
              wrappers: Dict[int, str]) -> Tuple[Optional[_Act], str]:
    """(_Act, "") when ``node`` applies a supported activation to ``inp`` alone, else (None, why)."""
    if node.op == "output":
        return None, "no activation after it: it is returned"
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if node.args != (inp,) or node.kwargs:
            return None, f"followed by {type(mod).__name__} with other arguments"
        kind, why = _module_kind(mod, wrappers)
        return (_Act(kind, f"{type(mod).__name__} ({node.target})", mod), "") if kind else (None, why)
    if node.op == "call_method" and node.target in _METHODS:
        if node.args != (inp,) or node.kwargs:
            return None, f"followed by .{node.target}() with other arguments"
        return _Act(_METHODS[node.target], f".{node.target}()", None), ""
    spec = _FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None, f"followed by {_describe(node, root)}"
    kind, label, names, required = spec
    extra = dict(zip(names, node.args[1:]), **node.kwargs)
    if (not node.args or node.args[0] is not inp or len(node.args) - 1 > len(names)
            or set(extra) - set(names) or any(isinstance(v, fx.Node) for v in extra.values())):
        return None, f"followed by {label} with other arguments"
    for k, v in required.items():
        if extra.get(k, v) != v:
            return None, f"followed by {label}({k}={extra[k]!r}); only {k}={v!r} converts"
    return _Act(kind, label, None), ""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, also keeping this package's layers and the activation wrappers (modules
    whose whole forward is one supported activation) as single calls."""

    def __init__(self, leaves: Iterable[int] = (), all_leaves: bool = False):
        super().__init__()
        self._leaves = set(leaves)
        self._all = all_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (self._all or id(m) in self._leaves or isinstance(m, _OWN_LEAVES)
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module, tracer: _Tracer, concrete=None) -> Tuple[fx.Graph, bool]:
    """The traced graph of ``module``'s forward, and whether tracing stored attributes on it: the
    tensor constants the tracer freezes, or what the forward itself sets. Either is undone (the
    module is left as it was), and either makes the trace unfit to replace the forward."""
    saved = dict(module.__dict__)
    try:
        graph = tracer.trace(module, concrete_args=concrete)
    finally:
        state = module.__dict__
        stored = any(k not in saved or state[k] is not saved[k] for k in state)
        state.clear()
        state.update(saved)
    return graph, stored


def _in_modes(root: nn.Module, fn):
    """``fn()`` with the modules' train/eval flags as they are, all train, all eval (flags restored)."""
    flags = [(m, m.training) for m in root.modules()]
    out = []
    try:
        for mode in (None, True, False):
            if mode is not None:
                for m, _ in flags:
                    m.training = mode
            out.append(fn())
    finally:
        for m, f in flags:
            m.training = f
    return out


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def _none_defaults(mod: nn.Module) -> Dict[str, None]:
    """The forward's arguments that default to None: a trace sees them as given (``mask is None``
    is False for a traced value), so each is also traced as None."""
    try:
        params = inspect.signature(type(mod).forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: None for p in params if p.default is None}


def _traces(mod: nn.Module, tracer: Callable[[], _Tracer]) -> List[Tuple[fx.Graph, bool]]:
    """``_trace`` of ``mod`` in each train/eval setting, with its None-default arguments traced as
    given and as None."""
    variants = [None] + ([_none_defaults(mod)] if _none_defaults(mod) else [])
    return [t for ts in _in_modes(mod, lambda: [_trace(mod, tracer(), c) for c in variants]) for t in ts]


def _steps(graph: fx.Graph) -> List[tuple]:
    """The graph's calls and their arguments, with arguments numbered by position and the checks
    a None-specialised trace adds left out (so traces of the same code compare equal)."""
    index: Dict[fx.Node, str] = {}
    out: List[tuple] = []
    for n in graph.nodes:
        if n.op == "placeholder":
            index[n] = f"arg{len(index)}"
        elif n.target is not _assert_is_none:
            index[n] = f"n{len(out)}"
            out.append((n.op, n.target, repr(fx.node.map_arg((n.args, n.kwargs), index.get))))
    return out


def _is_torch_nn(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _wrapper_kinds(root: nn.Module) -> Dict[int, str]:
    """id -> kind for the modules (other than torch.nn's and this package's) without parameters or
    buffers whose forward, traced alone, is a single supported activation of its one input."""
    out: Dict[int, str] = {}
    for mod in reversed(list(root.modules())):  # inner modules first: a wrapper may call one
        if (mod is root or _is_torch_nn(mod) or isinstance(mod, _OWN_LEAVES)
                or any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())):
            continue
        try:
            graph, consts = _trace(mod, _Tracer(all_leaves=True))
        except Exception:  # noqa: BLE001 - any forward that does not trace is not a wrapper
            continue
        nodes = list(graph.nodes)
        if consts or len(nodes) != 3 or [n.op for n in nodes][::2] != ["placeholder", "output"]:
            continue
        act, _ = _node_act(nodes[1], nodes[0], mod, out)
        if act is not None and nodes[2].args[0] is nodes[1]:
            out[id(mod)] = act.kind
    return out


def _owner(node: fx.Node) -> str:
    """Path of the module whose forward made this call ("" for the model's own forward)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module":
        stack = stack[:-1]  # the last entry is the called module itself
    return stack[-1][0] if stack else ""


def _uses(node: fx.Node) -> int:
    count = 0

    def seen(a):
        nonlocal count
        count += a is node
        return a

    for user in node.users:
        fx.node.map_arg((user.args, user.kwargs), seen)
    return count


class _Found(NamedTuple):
    """What one traced graph says about one Linear: the activation it converts with (or None),
    the module whose forward calls it, why it stays explicit, and whether it may become an
    ImplicitLinear at all (called once, its weights used nowhere else)."""

    act: Optional[_Act]
    owner: str
    reason: str
    free: bool

    def key(self):
        a = self.act
        return (a and (a.kind, a.label, id(a.module))), self.owner, self.reason, self.free


def _get_attr(root: nn.Module, target: str):
    """The object at ``target``, or None for a frozen constant (removed from the model again)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _analyse(root: nn.Module, graph: fx.Graph, linears, wrappers,
             fit_types) -> Tuple[Dict[int, _Found], Dict[int, int]]:
    """Per Linear (by id) what ``graph`` says, and how often each module is called in it."""
    calls: Dict[int, List[fx.Node]] = {}
    called_paths = set()
    reads = set()
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(id(root.get_submodule(n.target)), []).append(n)
            called_paths.add(n.target)
        elif n.op == "get_attr":
            reads.add(id(_get_attr(root, n.target)))
    found: Dict[int, _Found] = {}
    for path, lin in linears:
        here = calls.get(id(lin), [])
        read = [name for name, p in lin.named_parameters() if id(p) in reads]
        if read:
            found[id(lin)] = _Found(None, "", f"its {read[0]} is read directly in the forward", False)
            continue
        if len(here) != 1:
            if here:
                why = f"called {len(here)} times in the forward (shared weights)"
            else:
                parts = path.split(".")
                leaf = next((q for q in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                             if q in called_paths), None)
                why = (f"inside {type(root.get_submodule(leaf)).__name__} ({leaf}), whose forward is "
                       "not traced" if leaf else "not called in the traced forward")
            found[id(lin)] = _Found(None, "", why, False)
            continue
        node = here[0]
        if len(node.args) != 1 or node.kwargs:
            found[id(lin)] = _Found(None, "", "called with keyword or extra arguments", False)
            continue
        uses = _uses(node)
        owner = _owner(node)
        if uses != 1:
            by = ", ".join(_describe(u, root) for u in node.users)
            why = ("output unused" if not uses else
                   f"output used {'twice' if uses == 2 else f'{uses} times'} (by {by})")
            found[id(lin)] = _Found(None, owner, why, True)
            continue
        user = next(iter(node.users))
        act, why = _node_act(user, node, root, wrappers)
        if act is not None:
            _, why = _resolve(act.kind, fit_types)
            if not why and _owner(user) != owner:
                why = (f"its activation ({act.label}) is applied outside {owner or 'the model'}, "
                       "the module that calls it")
        found[id(lin)] = _Found(None if why else act, owner, why, True)
    return found, {k: len(v) for k, v in calls.items()}


def _rewrite(mod: nn.Module, graph: fx.Graph, lins: List[nn.Module],
             wrappers) -> Tuple[Optional[str], str]:
    """Source of ``mod``'s forward (``graph``, its own forward traced with every module a call)
    with the activation after each Linear in ``lins`` removed, or None and why not."""
    g = copy.deepcopy(graph)
    for lin in lins:
        nodes = [n for n in g.nodes if n.op == "call_module" and mod.get_submodule(n.target) is lin]
        user = next(iter(nodes[0].users)) if len(nodes) == 1 and len(nodes[0].users) == 1 else None
        act = _node_act(user, nodes[0], mod, wrappers)[0] if user is not None else None
        if act is None:
            return None, f"{type(mod).__name__}.forward traced alone calls it differently"
        user.replace_all_uses_with(nodes[0])
        g.erase_node(user)
    g.lint()
    try:
        code = g.python_code(root_module="self")
        source = _format_import_block(code.globals, sys_importer) + code.src
        _forward_from_src(source, {})
    except Exception as e:  # noqa: BLE001 - e.g. a global the generated code cannot import
        return None, (f"{type(mod).__name__}.forward's rewritten code does not compile "
                      f"({type(e).__name__}: {_first_line(e)})")
    return source, ""


def _local_trace(mod: nn.Module) -> Tuple[Optional[fx.Graph], str]:
    """``mod``'s own forward traced with every module a single call, or None and why it cannot be
    rewritten (tracing fails, it freezes tensor constants, or train/eval change it)."""
    name = type(mod).__name__
    try:
        traced = _traces(mod, lambda: _Tracer(all_leaves=True))
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward under tracing
        return None, f"{name}.forward cannot be traced alone ({type(e).__name__}: {_first_line(e)})"
    if any(stored for _, stored in traced):
        return None, (f"{name}.forward makes tensor constants or sets attributes, which a traced "
                      "copy would freeze or skip")
    if len({repr(_steps(g)) for g, _ in traced}) > 1:
        optional = ", ".join(f"{k}=None" for k in _none_defaults(mod))
        return None, (f"{name}.forward differs between train() and eval()"
                      + (f" or with {optional}" if optional else ""))
    return traced[0][0], ""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _rebuild_rewritten(base: type, source: str) -> nn.Module:
    """An empty instance of ``base`` with the rewritten forward (pickle and deepcopy then set its state)."""
    obj = base.__new__(base)
    obj.__class__ = _rewritten_class(base, source)
    return obj


def _reduce_rewritten(self, protocol):
    cls = type(self)
    return _rebuild_rewritten, (cls._implicit_base, cls._implicit_source), self.__getstate__()


def _rewritten_class(base: type, source: str) -> type:
    """A subclass of ``base`` whose forward is ``source`` (made for one module: the source names its
    submodules)."""
    return type(base.__name__, (base,), {
        "forward": _forward_from_src(source, {}),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _reduce_rewritten,
        "_implicit_base": base,
        "_implicit_source": source,
    })


def _implicit_from(lin: nn.Linear, act) -> ImplicitLinear:
    new = ImplicitLinear(lin.in_features, lin.out_features, act, bias=lin.bias is not None,
                         device=lin.weight.device, dtype=lin.weight.dtype)
    # the Linear's own Parameter objects move over (values, requires_grad, hooks and any
    # outside references stay valid), now tagged implicit
    new.weight = lin.weight
    if lin.bias is not None:
        new.bias = lin.bias
    hyper.mark(new)
    return new


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (a module may sit at several paths)."""
    holders = [(m, k) for m in root.modules() for k, c in m._modules.items() if c is old]
    for m, k in holders:
        m._modules[k] = new


def _static_reasons(root: nn.Module, linears) -> Dict[int, str]:
    """Why a Linear cannot convert whatever the forward does: it is the model, or a Parameter of it
    is also registered in another module (tied weights)."""
    holders: Dict[int, List[str]] = {}
    for path, mod in root.named_modules():
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(path or "(root)")
    out = {}
    for path, lin in linears:
        if not path:
            out[id(lin)] = "is the model itself"
            continue
        for pname, p in lin.named_parameters(recurse=False):
            others = [h for h in holders[id(p)] if h != path]
            if others:
                out[id(lin)] = f"its {pname} is shared with {others[0]} (tied)"
                break
    return out


def _add(report: ConversionReport, path: str, lin: nn.Linear, act, label: str) -> None:
    """Report a conversion; ``label`` names the activation folded in, or (identity) why none was."""
    a = _act.get(act)
    if isinstance(a, _act.PiecewiseCubic) and a.max_error:
        report.max_fit_error = max(report.max_fit_error, a.max_error)
    if act == "identity":
        report.converted.append(f"{path}: {lin} -> ImplicitLinear(identity) (identity=True; {label})")
    else:
        report.converted.append(f"{path}: {lin} + {label} -> ImplicitLinear({a.name})")


def _convert_traced(root, graphs, linears, wrappers, fit_types, identity, report) -> Dict[int, str]:
    """Convert using the traced ``graphs`` (one per distinct train/eval trace); returns the reasons
    of the Linears that stay explicit."""
    static = _static_reasons(root, linears)
    optional = "".join(f" or with {k}=None" for k in _none_defaults(root))
    analysed = [_analyse(root, g, linears, wrappers, fit_types) for g in graphs]
    found: Dict[int, _Found] = {}
    for _path, lin in linears:
        per = [a[0][id(lin)] for a in analysed]
        if id(lin) in static:
            found[id(lin)] = _Found(None, "", static[id(lin)], False)
        elif len({f.key() for f in per}) > 1:
            found[id(lin)] = _Found(None, "", f"used differently in train() and eval(){optional}", False)
        else:
            found[id(lin)] = per[0]
    counts = [a[1] for a in analysed]
    pairs = {i: f for i, f in found.items() if f.act is not None}
    local: Dict[str, Tuple[Optional[fx.Graph], str]] = {}
    by_id = {id(lin): lin for _, lin in linears}
    while True:
        # an activation module leaves the forward as nn.Identity only if every call is a pair's
        used = {}
        for f in pairs.values():
            if f.act.module is not None:
                used[id(f.act.module)] = used.get(id(f.act.module), 0) + 1
        rewrite = {i: f for i, f in pairs.items() if f.act.module is None
                   or any(c.get(id(f.act.module), 0) != used[id(f.act.module)] for c in counts)}
        sources, dropped = {}, {}
        for owner in {f.owner for f in rewrite.values()}:
            mod = root.get_submodule(owner)
            if owner not in local:
                local[owner] = _local_trace(mod)
            graph, why = local[owner]
            lins = [by_id[i] for i, f in rewrite.items() if f.owner == owner]
            if graph is not None:
                sources[owner], why = _rewrite(mod, graph, lins, wrappers)
            if why:
                dropped.update({i: why for i, f in rewrite.items() if f.owner == owner})
        if not dropped:
            break
        for i, why in dropped.items():
            f = pairs.pop(i)
            found[i] = _Found(None, f.owner, f"its activation {f.act.label} stays: {why}", True)
    reasons = {}
    for path, lin in linears:
        f = found[id(lin)]
        if f.act is not None:
            act, label = _resolve(f.act.kind, fit_types)[0], f.act.label
        elif identity and f.free:
            act, label = "identity", f.reason
        else:
            reasons[id(lin)] = f.reason
            continue
        _add(report, path, lin, act, label)
        _replace(root, lin, _implicit_from(lin, act))
    kept = {id(f.act.module) for f in rewrite.values()}
    for f in pairs.values():
        if f.act.module is not None and id(f.act.module) not in kept:
            _replace(root, f.act.module, nn.Identity())
    for owner, source in sorted(sources.items()):
        mod = root.get_submodule(owner)
        mod.__class__ = _rewritten_class(getattr(type(mod), "_implicit_base", type(mod)), source)
        report.rewritten.append(owner)
    return reasons


def _convert_sequentials(root, linears, wrappers, fit_types, identity, report) -> Dict[int, str]:
    """Pair consecutive children of every nn.Sequential (the model could not be traced); returns the
    reasons of the Linears that stay explicit."""
    reasons = dict(_static_reasons(root, linears))
    paths: Dict[int, List[str]] = {}
    for path, mod in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
    seen = set()
    for prefix, seq in list(root.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i, name in enumerate(names):
            lin = seq._modules[name]
            if type(lin) is not nn.Linear:
                continue
            seen.add(id(lin))
            path = f"{prefix}.{name}" if prefix else name
            if id(lin) not in reasons and len(paths[id(lin)]) > 1:
                reasons[id(lin)] = f"registered at {len(paths[id(lin)])} paths ({', '.join(paths[id(lin)])})"
            if id(lin) in reasons:
                continue
            act, label = None, ""
            if i + 1 == len(names):
                why = "last in its nn.Sequential: no activation after it"
            else:
                nxt = seq._modules[names[i + 1]]
                kind, why = _module_kind(nxt, wrappers)
                if kind:
                    act, why = _resolve(kind, fit_types)
                    label = f"{type(nxt).__name__} ({prefix + '.' if prefix else ''}{names[i + 1]})"
            if act is not None:
                seq._modules[names[i + 1]] = nn.Identity()
            elif identity:
                act, label = "identity", why
            else:
                reasons[id(lin)] = why
                continue
            _add(report, path, lin, act, label)
            seq._modules[name] = _implicit_from(lin, act)
    for _, lin in linears:
        if id(lin) not in seen and id(lin) not in reasons:
            reasons[id(lin)] = ("not inside an nn.Sequential (torch.fx could not trace the model, so "
                                "what follows it is unknown)")
    return reasons


def implicit(model: nn.Module, inplace: bool = False, fit: Union[bool, str, type, Iterable[Union[str, type]]] = False,
             identity: bool = False) -> Tuple[nn.Module, ConversionReport]:
    """Convert ``model``'s Linear+activation pairs to implicit backprop, keeping the weights.

    The forward is traced with torch.fx. A Linear converts when it is called once, its weights
    are used nowhere else, and its output goes only into one of these, called from the same
    module's forward: the modules nn.ReLU, nn.Hardtanh() (bounds -1, 1), torchopt_ext.nn.Arctan
    and Smoothstep, or a module of your own whose forward is one such call (``torch.atan(x)``);
    the functions F.relu, torch.relu, torch.atan, torch.arctan, F.hardtanh (bounds -1, 1); the
    methods .relu(), .atan(), .arctan(). With ``fit``, also tanh, sigmoid and GELU in any of
    these forms (nn.Tanh, torch.tanh, F.tanh, .tanh(), ...).

    The result is ``model`` (or its copy) with the same class and state_dict keys. Each converted
    Linear is an ImplicitLinear holding the Linear's own Parameter objects. An activation module
    called only after converted Linears becomes nn.Identity. A function call (or an activation
    module also called elsewhere) cannot be removed that way: the module whose forward makes it
    gets a subclass of its class whose forward is its traced forward without that call (listed
    in ``report.rewritten``; its Python branches are those taken when converting, so a forward
    that changes with train()/eval() or with an argument left at None is not rewritten). Only
    forward is looked at: another method calling a converted Linear gets the activation too. If
    torch.fx cannot trace the model, only consecutive children of each nn.Sequential are paired,
    with a warning. When nothing converts, a warning names each Linear and why it stayed explicit.

    Args:
        model: any module.
        inplace: modify ``model`` itself (True) or a deep copy (False, the default).
        fit: also convert tanh / sigmoid / GELU through a fitted piecewise cubic (outputs then
            change by at most the fit's error): True for all, or names such as ("tanh",).
        identity: also make every other Linear that may convert (called once, weights not
            shared), e.g. the classifier head or one before a LayerNorm, an ImplicitLinear with
            the identity activation (outputs unchanged). With weight decay mu > 0 every layer's
            step then stays finite at any lr (paper §4.1); an explicit head's step grows with lr.

    Returns (model, report): the converted model and a ConversionReport listing what became
    implicit and which parameterised modules stay explicit, and why. Create the ImplicitSGD after
    converting: it recognises the implicit parameters when it is constructed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"implicit: model must be a torch.nn.Module, got {type(model).__name__}")
    fit_types = _fit_types(fit)
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    linears = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear]
    wrappers = _wrapper_kinds(model)
    try:
        traced = [g for g, _ in _traces(model, lambda: _Tracer(leaves=wrappers))]
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward under tracing
        report.fallback = f"torch.fx: {type(e).__name__}: {_first_line(e)}"
        warnings.warn(f"implicit: torch.fx could not trace {type(model).__name__} "
                      f"({type(e).__name__}: {_first_line(e)}); only Linear + activation pairs "
                      "inside nn.Sequential were converted", stacklevel=2)
        reasons = _convert_sequentials(model, linears, wrappers, fit_types, identity, report)
    else:
        distinct = list({_code(g): g for g in traced}.values())
        reasons = _convert_traced(model, distinct, linears, wrappers, fit_types, identity, report)
    for path, mod in model.named_modules():
        if isinstance(mod, (ImplicitLinear, ImplicitRNN)):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            why = f": {reasons[id(mod)]}" if id(mod) in reasons else ""
            report.explicit.append(f"{path or '(root)'}: {type(mod).__name__}{why}")
    if not any(isinstance(m, (ImplicitLinear, ImplicitRNN)) for m in model.modules()):
        found = "; ".join(f"{p or '(root)'}: {reasons.get(id(m), '?')}" for p, m in linears)
        warnings.warn(f"implicit: nothing in {type(model).__name__} converted to implicit backprop; "
                      + (found or "it has no nn.Linear"), stacklevel=2)
    return model, report
