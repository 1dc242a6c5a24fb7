"""AdaptiveLRSGD: SGD whose learning rate eta follows five loss probes along the step direction.

Ravaut & Gorti's method (docs/design.md#five-probe-learning-rate; docs/ADAPTIVE_LR.md). Each ``step(closure)``:

1. d = the SGD step direction (gradient + weight decay, through the momentum buffer as SGD does);
   with a torch.optim-style closure (one that calls backward) the closure is called first to make
   the gradient;
2. the closure's loss is probed at ``w - (eta + j*h)*d``, j = -2..2 (h = eps, or eps*eta with
   ``relative_eps=True``), each probe point written from w by a fused kernel (``ops.probe_move_``)
   into scratch storage the parameters point at meanwhile, under ``torch.no_grad``, outside autocast
   and inside a ``ProbeGuard`` (same dropout mask in all five; random stream, buffers, training flags
   and gradients restored);
3. the next eta (written to the group's ``lr``) comes from the probe losses, on the device:
   ``method="guarded"`` (default) a trust-region Newton step to half the line's minimiser,
   ``method="newton"`` the paper's eq. 16/18/19 (+ momentum on eta, eq. 20-21),
   ``method="first_order"`` eq. 6-8 with ``f'(eta)`` as the central difference of the probes;
4. the parameters point at w's untouched storage again and take ``torch.optim.SGD``'s own step with
   the current eta, except where the guarded rule finds the loss rising at eta (``f(eta+h) > f(eta-h)``)
   or a probe loss not finite: eta overshoots along this very step, so the step already takes the new,
   smaller eta, cut by at most ``growth`` (``last_step_eta`` says which eta it took).

inf/NaN probe losses: the weight step is never skipped; eta shrinks (never below delta) and its
momentum is reset; the paper's rules step with the eta the step started with.
Under torch.distributed the five probe losses are averaged across ranks, so all ranks agree on eta.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT
from torch.optim.sgd import sgd as _sgd_functional

from torchopt_ext.ops.probe import (first_order_lr_reference, guarded_lr, guarded_lr_host, guarded_lr_reference,
                                    newton_lr, newton_lr_host, newton_lr_reference, probe_mover)
from torchopt_ext.optim._probe_guard import ProbeGuard
from torchopt_ext.optim.functional_probe import FunctionalProbe

_OFFSETS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # j of the probes f(eta + j*h)
_METHODS = ("guarded", "newton", "first_order")
_AGAIN = object()  # _step's answer when the step must start again


def _as_loss(value, where: str) -> torch.Tensor:
    """A closure's return value as a detached 0-dim loss: a scalar tensor, per-sample losses (1-D,
    averaged in float64 so no digits go to a float32 reduction) or a Python number (kept in float64)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            value = value.detach()
        if value.dim() == 0:
            return value
        if value.dim() == 1 and value.numel() > 0:
            return value.to(torch.float64).mean()
        raise ValueError(f"AdaptiveLRSGD: {where} must return a scalar loss or a 1-D tensor of per-sample "
                         f"losses, got a tensor of shape {tuple(value.shape)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"AdaptiveLRSGD: {where} must return the loss (a tensor or a float), got "
                    f"{type(value).__name__}")


def _positive(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"AdaptiveLRSGD: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise ValueError(f"AdaptiveLRSGD: {name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class AdaptiveLRSGD(Optimizer):
    """SGD with a learning rate learned from five loss probes per step.

    Args:
        params: parameters (one group: there is one eta for all of them).
        lr: the initial eta.
        eps: probe spacing h (``relative_eps=False``) or its ratio to eta (``relative_eps=True``).
            Default 1e-2, not the paper's 1e-5: measured in float32 on digits, at 1e-5 the second
            difference is rounding noise and below delta in 100% of steps, at 1e-2 in 0%
            (docs/ADAPTIVE_LR.md; ``python -m torchopt_ext.compare.adaptive_numerics``).
        delta: floor of eta (paper eq. 19); for ``method="newton"`` also the smoothing of the Newton
            denominator (eq. 18).
        method: "guarded" (default): eta moves to ``fraction`` times the minimiser of the probed line's
            quadratic model, growing by at most a factor ``growth`` per step, and never grows where the line
            has no minimum; where the line rises at eta, this step already takes the smaller eta
            (docs/ADAPTIVE_LR.md, "The guarded rule"). "newton": the paper's eq.
            16/18/19 as written. "first_order": eq. 6-8 (needs ``meta_lr``).
        growth: the most eta may grow in one step (guarded; > 1, default 2); also the cautious cut on a
            rising line without a minimum.
        fraction: the share of the line's minimiser eta aims at (guarded; in (0, 1], default 0.5).
        shrink: the most eta may shrink in one step (guarded; > 1, default 100): an initial lr far too
            large is cut at once, since a few steps at it can already kill a network.
        lr_momentum: beta of the momentum on eta (eq. 20-21) for "newton" and "first_order".
        meta_lr: kappa of the first-order rule.
        momentum, weight_decay: as in ``torch.optim.SGD`` (dampening 0, no Nesterov).
        model: optional. Without it, every module the closure calls has its buffers (batch-norm
            running statistics, ``num_batches_tracked``) and training flags restored after the probes
            (found by a global forward pre-hook during the first probe); with it, all of ``model``'s
            are, also those of modules only later probes call (a route that depends on the weights)
            and those a closure switches with ``eval()``.
        relative_eps: probe at ``eta*(1 + j*eps)`` instead of ``eta + j*eps``.
        batched: with a ``FunctionalProbe`` closure, evaluate the five probes in one batched forward.
        lr_on_device: keep eta (``param_groups[0]["lr"]``) and its velocity as 0-dim float64 tensors
            on the parameters' device, so that a step never waits for the device (no ``.item()``).
            The weight step is then ``p -= eta*d`` with a tensor eta (what ``torch.optim.SGD``
            does with a tensor lr under torch.compile); it equals eager SGD's fused add to one
            rounding instead of bitwise (eager SGD reads a tensor lr back to the host first).
            None (default): on for CUDA parameters, off on the CPU, where reading eta costs nothing.

    ``step(closure, val_closure=None)`` takes either kind of closure:

    * a probe closure (run ``loss.backward()`` before ``step``): ``closure()`` recomputes the loss on
      the current batch at the current parameters; ``step`` returns ``f(eta)``, the middle probe
      (the loss at the parameters after the step, unless the guarded rule shortened it);
    * a torch.optim closure (``zero_grad``, forward, ``backward``, return the loss), with no backward
      before ``step``: ``step`` calls it once with autograd on for the gradient, as torch's
      optimizers do, and returns its loss. Which kind is decided at the first step, by whether any
      parameter has a ``.grad`` then; a closure found calling ``backward`` in the probes of a step
      that found gradients is a torch.optim closure after all, and that step starts again.

    The probes run the closure under ``no_grad`` and outside autocast, with ``.grad`` detached and
    ``torch.autograd.backward`` a no-op, so either kind is probed unchanged. The closure returns a
    scalar tensor, 1-D per-sample losses (averaged in float64) or a Python number; anything else
    raises. A closure that raises leaves parameters, gradients, buffers and eta as they were.
    A NaN/inf probe loss shrinks eta (the weight step is still taken). ``val_closure``, when given,
    is probed instead (paper section 5.3). ``last_probe_losses``: the five float64 losses of the
    last step, j = -2..2; ``last_step_eta``: the eta its weights moved by.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        eps: float = 1e-2,
        delta: float = 1e-6,
        lr_momentum: float = 0.0,
        method: str = "guarded",
        meta_lr: Optional[float] = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        growth: float = 2.0,
        fraction: float = 0.5,
        shrink: float = 100.0,
        model: Optional[nn.Module] = None,
        relative_eps: bool = False,
        batched: bool = False,
        lr_on_device: Optional[bool] = None,
    ) -> None:
        lr, eps, delta = _positive("lr", lr), _positive("eps", eps), _positive("delta", delta)
        lr_momentum = _positive("lr_momentum", lr_momentum, allow_zero=True)
        if lr_momentum >= 1:
            raise ValueError(f"AdaptiveLRSGD: lr_momentum must be in [0, 1), got {lr_momentum}")
        if method not in _METHODS:
            raise ValueError(f"AdaptiveLRSGD: method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
        if method == "guarded" and lr_momentum:
            raise ValueError("AdaptiveLRSGD: lr_momentum is part of the paper's rules; use it with method='newton' "
                             "or 'first_order' (the guarded rule bounds each step instead)")
        if method == "first_order":
            if meta_lr is None:
                raise ValueError("AdaptiveLRSGD: method='first_order' needs meta_lr (the meta learning rate kappa)")
            meta_lr = _positive("meta_lr", meta_lr)
        growth, fraction = _positive("growth", growth), _positive("fraction", fraction)
        shrink = _positive("shrink", shrink)
        if growth <= 1:
            raise ValueError(f"AdaptiveLRSGD: growth must be > 1, got {growth}")
        if shrink <= 1:
            raise ValueError(f"AdaptiveLRSGD: shrink must be > 1, got {shrink}")
        if fraction > 1:
            raise ValueError(f"AdaptiveLRSGD: fraction must be in (0, 1], got {fraction}")
        momentum = _positive("momentum", momentum, allow_zero=True)
        weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"AdaptiveLRSGD: model must be an nn.Module or None, got {type(model).__name__}")
        defaults = dict(lr=lr, eps=eps, delta=delta, lr_momentum=lr_momentum, method=method, meta_lr=meta_lr,
                        momentum=momentum, weight_decay=weight_decay, relative_eps=bool(relative_eps),
                        growth=growth, fraction=fraction, shrink=shrink, lr_velocity=0.0)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"AdaptiveLRSGD: one eta drives all parameters, pass one param group, got "
                             f"{len(self.param_groups)}")
        self.model = model
        self.batched = bool(batched)
        self.lr_on_device = None if lr_on_device is None else bool(lr_on_device)
        self.last_probe_losses: Optional[torch.Tensor] = None
        self.last_step_eta: Optional[Union[float, torch.Tensor]] = None
        self._torch_closure: Optional[bool] = None  # decided at the first step
        self._init_transient()

    @property
    def last_probe_losses(self) -> Optional[torch.Tensor]:
        """The five probe losses of the last step, float64 (a step that keeps eta on the host keeps them as
        Python floats, made a tensor here when asked for)."""
        f = self._last_losses
        if f is not None and not isinstance(f, torch.Tensor):
            f = self._last_losses = torch.tensor(f, dtype=torch.float64)
        return f

    @last_probe_losses.setter
    def last_probe_losses(self, value) -> None:
        self._last_losses = value

    def _init_transient(self) -> None:
        """Caches and warning flags: rebuilt, never copied (deepcopy, pickle, load_state_dict)."""
        self._scratch = {}  # param -> the storage it points at during the probes
        self._offsets = {}  # device -> the j of the probes as a float64 tensor
        self._eta_set = None  # the lr this optimizer last wrote, to notice outside changes
        self._warned = False
        self._warned_once = {}

    def __getstate__(self):
        state = super().__getstate__()
        state.update(model=self.model, batched=self.batched, lr_on_device=self.lr_on_device,
                     last_probe_losses=self.last_probe_losses, last_step_eta=self.last_step_eta,
                     _torch_closure=self._torch_closure)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before the guarded rule existed
            group.setdefault("growth", 2.0)
            group.setdefault("fraction", 0.5)
            group.setdefault("shrink", 100.0)
        for name, default in (("model", None), ("batched", False), ("lr_on_device", None),
                              ("last_probe_losses", None), ("last_step_eta", None), ("_torch_closure", None)):
            if not hasattr(self, name):
                setattr(self, name, default)
        self._init_transient()

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("AdaptiveLRSGD: one eta drives all parameters, so add_param_group is not supported")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._eta_set = None  # the loaded lr is the learned eta, not an outside override

    # -- pieces of a step ----------------------------------------------------------------------

    def _warn_if_overridden(self, group) -> None:
        scheduler = "initial_lr" in group or hasattr(self.step, "_wrapped_by_lr_sched")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) or isinstance(self._eta_set, torch.Tensor):
            # identity, not value: comparing device tensors would wait for the device
            changed = self._eta_set is not None and lr is not self._eta_set
        else:
            changed = self._eta_set is not None and lr != self._eta_set
        if (scheduler or changed) and not self._warned:
            self._warned = True
            warnings.warn(
                "AdaptiveLRSGD: an LR scheduler (or code writing param_groups[0]['lr']) is attached; it overrides "
                "the learned eta. The adaptation continues from whatever lr it sets.",
                UserWarning,
                stacklevel=3,
            )

    def _directions(self, group, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """d of ``w <- w - eta*d`` exactly as SGD forms it, without touching the momentum buffers."""
        dirs = []
        for p in params:
            d = p.grad
            if group["weight_decay"] != 0:
                d = d.add(p, alpha=group["weight_decay"])
            buf = self.state[p].get("momentum_buffer") if group["momentum"] != 0 else None
            if buf is not None:
                d = buf.mul(group["momentum"]).add_(d)
            dirs.append(d)
        return dirs

    def _guard(self, group, params, probe_fn):
        model = self.model
        if model is None and isinstance(probe_fn, FunctionalProbe):
            model = probe_fn.model  # it names the module it evaluates: no need to watch module calls
        return ProbeGuard(model, {p.device for p in params}, group["params"], self._warned_once)

    def _probe(self, probe_fn: Callable, group, params, dirs, steps):
        """(the five losses, whether the closure called backward). ``steps`` (eta + j*h) and the losses: a
        float64 tensor where eta lives on the device; Python floats where it lives on the host, which spares
        the step a tensor op per number (each costly right after a training step has emptied the caches)."""
        # w never moves: during the probes each parameter points at scratch storage (swapping .data is
        # O(1)) and probe_move_ writes w - (eta + j*h)*d there; afterwards the parameter points at w's
        # own storage again, bit for bit, whatever the closure did. Saving and restoring w instead would
        # cost two more passes over the parameters.
        originals = [p.data for p in params]
        host = not isinstance(steps, torch.Tensor)
        if self.batched and hasattr(probe_fn, "batched"):
            with self._guard(group, params, probe_fn):
                if host:
                    return self._probe_batched(probe_fn, params, originals, dirs,
                                               torch.tensor(steps, dtype=torch.float64)).tolist(), False
                return self._probe_batched(probe_fn, params, originals, dirs, steps), False
        scratch = []
        for p in params:
            s = self._scratch.get(p)
            if s is None or s.shape != p.shape or s.dtype != p.dtype or s.stride() != p.stride():
                s = self._scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            scratch.append(s)
        try:
            for p, s in zip(params, scratch):
                p.data = s
            # the lists are SGD's own: one device, matching shapes
            move = probe_mover(params[0].device, host_step=host)
            with self._guard(group, params, probe_fn) as guard:
                fs = []
                for k, step in enumerate(steps if host else steps.unbind(0)):
                    if k:  # the first probe starts from the state the guard saved
                        guard.rewind()
                    move(params, originals, dirs, step)
                    fs.append(_as_loss(guard.first_probe(probe_fn) if k == 0 else probe_fn(), "the closure"))
        finally:
            for p, w in zip(params, originals):
                p.data = w
        if host:  # on a GPU, one sync for all five
            cpu = all(f.device.type == "cpu" for f in fs)
            return [f.item() for f in fs] if cpu else torch.stack([f.double() for f in fs]).tolist(), guard.saw_backward
        if len({f.dtype for f in fs}) > 1:
            return torch.stack([f.to(torch.float64) for f in fs]), guard.saw_backward
        return torch.stack(fs).to(torch.float64), guard.saw_backward

    def _probe_batched(self, probe_fn, params, originals, dirs, steps) -> torch.Tensor:
        model = probe_fn.model
        index = {id(p): i for i, p in enumerate(params)}
        points = {}
        shape = (5,)
        for name, p in model.named_parameters():
            i = index.get(id(p))
            if i is None:  # not stepped by this optimizer: the same in all five points
                points[name] = p.detach().expand(shape + p.shape)
                continue
            h = steps.view((5,) + (1,) * p.dim())
            points[name] = originals[i] - dirs[i] * h.to(p.dtype)  # probe_move_'s formula, five at once
        return probe_fn.batched(points).detach().to(torch.float64).reshape(5)

    @staticmethod
    def _mean_over_ranks(losses):
        """The losses (a tensor, or Python floats) averaged over the ranks of torch.distributed."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            host = not isinstance(losses, torch.Tensor)
            t = torch.tensor(losses, dtype=torch.float64) if host else losses
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
            return t.tolist() if host else t
        return losses

    @staticmethod
    def _eta(value, device) -> torch.Tensor:
        """A float or tensor lr/velocity as a 0-dim float64 tensor on ``device`` (from a Python
        number: a fill, no wait for the device)."""
        if isinstance(value, torch.Tensor):
            return value.detach().to(device=device, dtype=torch.float64).reshape(())
        return torch.scalar_tensor(float(value), dtype=torch.float64, device=device)

    def _weight_step_tensor_lr(self, group, params, dirs, eta: torch.Tensor) -> None:
        """``p -= eta*d`` with d SGD's direction (``_directions``), its momentum buffers kept as SGD
        keeps them: d is SGD's new buffer (momentum*buf + grad, or grad on the first step)."""
        if group["momentum"] != 0:
            for p, d in zip(params, dirs):
                self.state[p]["momentum_buffer"] = d.clone() if d is p.grad else d
        torch._foreach_add_(params, torch._foreach_mul(dirs, -eta))

    def _next_eta(self, group, losses, eta_t, h):
        """(eta, velocity) after this step, 0-dim float64 tensors, from the probe losses; the guarded rule
        keeps no velocity (None)."""
        method = group["method"]
        if method == "guarded":
            # the compiled op takes h as a number; a tensor h (relative_eps on the device) goes through
            # the reference, which is the same formula in torch ops
            rule = guarded_lr if not isinstance(h, torch.Tensor) else guarded_lr_reference
            return rule(losses, eta_t, h, group["delta"], group["growth"], group["fraction"], group["shrink"]), None
        v_t = self._eta(group["lr_velocity"], losses.device)
        if method == "newton":
            rule = newton_lr if not isinstance(h, torch.Tensor) else newton_lr_reference
            return rule(losses, eta_t, v_t, h, group["delta"], group["lr_momentum"])
        return first_order_lr_reference(losses, eta_t, v_t, h, group["delta"], group["meta_lr"], group["lr_momentum"])

    @staticmethod
    def _next_eta_host(group, f: List[float], eta: float, h: float) -> Tuple[float, float]:
        """``_next_eta`` on Python floats, for a step whose eta lives on the host: the same rules through
        their host entry points (no tensor in or out); the guarded rule's velocity is 0."""
        method = group["method"]
        if method == "guarded":
            return guarded_lr_host(f, eta, h, group["delta"], group["growth"], group["fraction"], group["shrink"]), 0.0
        v = float(group["lr_velocity"])
        if method == "newton":
            return newton_lr_host(f, eta, v, h, group["delta"], group["lr_momentum"])
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731  (the first-order rule has no host form)
        e, v = first_order_lr_reference(t(f), t(eta), t(v), h, group["delta"], group["meta_lr"], group["lr_momentum"])
        return float(e), float(v)

    @staticmethod
    def _step_eta(group, losses, eta, eta_next, on_device):
        """The eta this step's weights move by. The guarded rule: where the probes find the loss rising at eta
        (or not finite), eta overshoots along this very step, so the step already takes the new, smaller eta,
        cut by at most ``growth``; elsewhere, and for the paper's rules, eta (docs/ADAPTIVE_LR.md). ``losses``:
        a tensor where eta lives on the device, else Python floats."""
        if group["method"] != "guarded":
            return eta
        if on_device:
            rising = (losses[3] > losses[1]) | ~torch.isfinite(losses).all()
            return torch.where(rising, torch.maximum(eta_next, eta / group["growth"]), eta)
        f = losses
        if f[3] > f[1] or not all(map(math.isfinite, f)):
            return max(eta_next, eta / group["growth"])
        return eta

    def _gradient_from_closure(self, closure):
        """Calls a torch.optim closure with autograd on, for the gradient; returns its loss."""
        with torch.enable_grad():
            loss = closure()
        _as_loss(loss, "the closure")  # the same contract as in the probes, checked before probing
        return loss

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None,
             val_closure: Optional[Callable[[], Any]] = None) -> Union[torch.Tensor, Any]:
        probe_fn = val_closure if val_closure is not None else closure
        if probe_fn is None:
            raise RuntimeError(
                "AdaptiveLRSGD.step needs closure: a function that recomputes the loss on the current batch at the "
                "current parameters (or val_closure for a validation batch); call loss.backward() before step() "
                "as for SGD, or pass torch.optim's closure (zero_grad, forward, backward, return loss)"
            )
        group = self.param_groups[0]
        self._warn_if_overridden(group)
        result = self._step(group, closure, val_closure, probe_fn)
        if result is _AGAIN:  # the closure turned out to be a torch.optim closure; _torch_closure is set now
            result = self._step(group, closure, val_closure, probe_fn)
        return result

    def _step(self, group, closure, val_closure, probe_fn):
        """One step, or ``_AGAIN`` when a closure taken for a probe closure called backward."""
        if self._torch_closure is None:
            self._torch_closure = closure is not None and all(p.grad is None for p in group["params"])
        closure_loss = None
        if self._torch_closure:
            if closure is None:
                raise RuntimeError("AdaptiveLRSGD.step: this optimizer takes torch.optim closures (they make the "
                                   "gradient), but step got none")
            closure_loss = self._gradient_from_closure(closure)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            made = self._torch_closure
            self._torch_closure = None  # decide again at the next step
            raise RuntimeError(
                "AdaptiveLRSGD.step: no parameter has a gradient"
                + (" even after calling the closure with autograd on" if made else "")
                + ": call loss.backward() before step(closure), or pass a closure that calls backward itself "
                "(torch.optim's closure contract)"
            )
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdaptiveLRSGD: sparse gradients are not supported")
        device = params[0].device
        on_device = self.lr_on_device if self.lr_on_device is not None else device.type == "cuda"
        eta = self._eta(group["lr"], device) if on_device else float(group["lr"])
        dirs = self._directions(group, params)
        h = group["eps"] * eta if group["relative_eps"] else group["eps"]
        if not on_device:
            steps = [eta + j * h for j in _OFFSETS]  # Python's float64 arithmetic rounds as the tensor ops do
        else:
            offsets = self._offsets.get(device)
            if offsets is None:
                offsets = self._offsets[device] = torch.tensor(_OFFSETS, dtype=torch.float64, device=device)
            steps = offsets.mul(h).add_(eta)  # eta + j*h
        probed, saw_backward = self._probe(probe_fn, group, params, dirs, steps)
        if saw_backward and not self._torch_closure and probe_fn is closure:
            # a torch.optim closure, but gradients were there at the first step (a backward before, or
            # zero_grad(set_to_none=False)): they may be stale. Nothing has moved yet (the probes leave
            # no trace), so this step starts again the torch way, as will every later one.
            self._torch_closure = True
            return _AGAIN
        losses = self.last_probe_losses = self._mean_over_ranks(probed if not on_device else probed.to(device))

        if on_device:
            eta_next, v_next = self._next_eta(group, losses, eta, h)
        else:  # the probes' .item() was the one host sync of the step: lr is a float for SGD and schedulers
            eta_next, v_next = self._next_eta_host(group, losses, eta, h)
        eta_step = self.last_step_eta = self._step_eta(group, losses, eta, eta_next, on_device)
        if on_device:
            self._weight_step_tensor_lr(group, params, dirs, eta_step)
        else:
            # torch.optim.SGD's own code with this step's eta, so bitwise equal to it
            grads = [p.grad for p in params]
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            _sgd_functional(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                            lr=eta_step, dampening=0.0, nesterov=False, maximize=False,
                            # what SGD's own default picks on the CPU, without its per-parameter survey
                            foreach=False if device.type == "cpu" else None)
            if group["momentum"] != 0:
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b

        if v_next is None:
            v_next = torch.zeros_like(eta_next)
        group["lr"], group["lr_velocity"] = eta_next, v_next
        self._eta_set = group["lr"]
        if closure_loss is not None:
            return closure_loss
        return losses[2] if on_device else torch.scalar_tensor(losses[2], dtype=torch.float64)
