"""Keeps five loss probes from leaving a trace: random-number state, module buffers, training flags,
gradients; and runs them outside autocast.

Dropout must draw one mask in all five probes (else the finite differences measure mask noise), and
the training run must see the same random stream as without probes; batch-norm running statistics
and ``training`` flags must come back bit for bit (probes use the batch statistics of training mode
but may not move the running averages). Without a ``model``, the modules are found as they run: a
global forward pre-hook (torch.nn.modules.module.register_module_forward_pre_hook) records the
buffers and flags of every module the closure calls in the first probe, before its forward. The hook
is removed after the first probe, because a global hook sends every module call through torch's
slow path: the five probes run one closure on one batch, so they call the same modules, except in
models whose route depends on the weights (mixture-of-experts), which should pass ``model``. With a
``model`` (given, or a ``FunctionalProbe``'s) everything is saved up front and only the model's own
forward is hooked, for the autocast check.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_COMPILE_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


class ProbeGuard:
    """``with ProbeGuard(model, devices, params) as g: for ...: g.rewind(); loss = closure()``.

    ``params``: their ``.grad`` is detached for the probes and put back after, so a closure that
    calls ``zero_grad`` or ``backward`` cannot touch the gradients the step is made of.
    """

    def __init__(self, model: Optional[nn.Module], devices: Iterable[torch.device], params: List[torch.Tensor],
                 warn: Optional[Dict[str, bool]] = None):
        self.model = model
        self.params = params
        self.device_types = sorted({d.type for d in devices})
        self.cuda_devices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.warned = warn if warn is not None else {}

    def _no_backward(self, *args, **kwargs) -> None:
        """Stands in for torch.autograd.backward during the probes (which run under no_grad), so that a
        torch.optim-style closure, which calls backward itself, can be probed unchanged; notes the call."""
        self.saw_backward = True

    def _record(self, module: nn.Module) -> None:
        """Saves the buffers and flags of ``module`` and all it contains, those not saved yet."""
        todo = [module]  # nn.Module.modules() without the name strings it builds for every submodule
        while todo:
            m = todo.pop()
            if id(m) in self.modules:
                continue
            self.modules[id(m)] = (m, m.training)
            for name, b in m._buffers.items():
                if b is not None:
                    self.buffers.append((m, name, b, b.detach().clone()))
            todo.extend(c for c in m._modules.values() if c is not None)

    def _seen(self, module: nn.Module, args) -> None:
        if id(module) not in self.modules:
            self._record(module)
        if not self.warned.get("autocast") and any(torch.is_autocast_enabled(t) for t in self.device_types):
            self.warned["autocast"] = True
            warnings.warn(
                "AdaptiveLRSGD: the closure turns autocast on itself, so the probe losses are computed in "
                "float16/bfloat16, whose rounding swamps the second difference the learning rate is made of. "
                "The optimizer already runs the probes outside any autocast around step(): enter autocast "
                "around the forward of your training step, not inside the closure.",
                UserWarning,
                stacklevel=2,
            )

    def __enter__(self):
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(i) for i in self.cuda_devices]
        self.modules: Dict[int, tuple] = {}
        self.buffers: list = []
        if self.model is not None:
            # every module is known: a hook on the model alone serves the autocast check
            self._record(self.model)
            # a closure's own autocast does not come and go between steps: watching the first step's
            # first probe finds it, and sparing later steps the hook keeps the model on torch's fast path
            watch = not self.warned.get("autocast_watched")
            self.hook = self.model.register_forward_pre_hook(self._seen) if watch else None
        else:
            self.hook = register_module_forward_pre_hook(self._seen)
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.saw_backward = False
        self.backward = torch.autograd.backward
        torch.autograd.backward = self._no_backward
        # switched off directly, not by entering torch.autocast(enabled=False): most steps run without
        # autocast, and then this costs two flag reads instead of two context managers
        self.autocast_on = [t for t in self.device_types if torch.is_autocast_enabled(t)]
        for t in self.autocast_on:
            torch.set_autocast_enabled(t, False)
        return self

    def rewind(self) -> None:
        """Puts the random state back where it was before the first probe: every probe draws the same."""
        torch.set_rng_state(self.cpu_rng)
        for i, state in zip(self.cuda_devices, self.cuda_rng):
            torch.cuda.set_rng_state(state, i)

    def first_probe(self, probe_fn):
        """Runs the first probe, the one that watches module calls, and returns its loss."""
        if self.model is None:
            with warnings.catch_warnings():
                # torch warns that a global hook also fires for torch.compile's wrapper module;
                # recording that module too is harmless
                warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING)
                loss = probe_fn()
        else:
            loss = probe_fn()
        self.first_probe_done()
        self.check_loss(loss)
        return loss

    def first_probe_done(self) -> None:
        """Stops watching module calls (see the module docstring)."""
        self.warned["autocast_watched"] = True
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def check_loss(self, loss) -> None:
        """Warns once when a probe loss itself is float16/bfloat16 (3-4 significant digits)."""
        if isinstance(loss, torch.Tensor) and loss.dtype in _LOW_PRECISION and not self.warned.get("dtype"):
            self.warned["dtype"] = True
            warnings.warn(
                f"AdaptiveLRSGD: the closure returns a {loss.dtype} loss; its rounding swamps the second "
                "difference of the probes. Return the loss in float32 (e.g. loss.float()).",
                UserWarning,
                stacklevel=3,
            )

    def __exit__(self, *exc):
        for t in self.autocast_on:
            torch.set_autocast_enabled(t, True)
        torch.autograd.backward = self.backward
        self.first_probe_done()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.rewind()
        with torch.no_grad():
            for m, name, b, saved in self.buffers:
                b.copy_(saved)
                m._buffers[name] = b  # a module that rebinds a buffer gets its own tensor back
        for m, flag in self.modules.values():
            if m.training is not flag:  # nn.Module.__setattr__ is slow; most flags never change
                m.training = flag
        return False
