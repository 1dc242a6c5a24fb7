"""Five-probe learning-rate ops, compiled, with their pure-PyTorch references.

``probe_move_(params, saved, direction, step)``: every ``p <- saved - step * d`` in one call.
``newton_lr(losses, eta, velocity, eps, delta, beta)``: the next eta (and its momentum) from the
five probe losses ``f(eta + j*eps)``, j = -2..2 (docs/design.md#five-probe-learning-rate; paper eq. 16/18/19/20-21).
``guarded_lr(losses, eta, eps, delta, growth, fraction, shrink)``: the next eta by the guarded rule
(docs/ADAPTIVE_LR.md), AdaptiveLRSGD's default.
Both keep everything on the tensors' device: no host synchronisation on CUDA. ``guarded_lr_host`` and
``newton_lr_host`` are the same rules on Python floats, for a CPU step that holds eta as a float.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import torch

from torchopt_ext._extension import _C, cuda_available

if _C is not None:

    @torch.library.register_fake("torchopt_ext::probe_move_")
    def _probe_move_fake(params, saved, direction, step):
        return None

    @torch.library.register_fake("torchopt_ext::newton_lr")
    def _newton_lr_fake(losses, eta, velocity, eps, delta, beta):
        torch._check(losses.numel() == 5)
        out = losses.new_empty((), dtype=torch.float64)
        return out, out.new_empty(())

    @torch.library.register_fake("torchopt_ext::guarded_lr")
    def _guarded_lr_fake(losses, eta, eps, delta, growth, fraction, shrink):
        torch._check(losses.numel() == 5)
        return losses.new_empty((), dtype=torch.float64)


def _compiled_for(device: torch.device) -> bool:
    return _C is not None and (device.type == "cpu" or (device.type == "cuda" and cuda_available()))


def _check_lists(params, saved, direction, step) -> None:
    if not (len(params) == len(saved) == len(direction)):
        raise ValueError(
            f"probe_move_: params, saved and direction must have one length, got {len(params)}, {len(saved)}, "
            f"{len(direction)}"
        )
    if not isinstance(step, torch.Tensor) or step.numel() != 1:
        raise ValueError("probe_move_: step must be a 0-dim tensor (eta + j*eps)")


def probe_move_(
    params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], step: torch.Tensor
) -> None:
    """Moves every parameter to ``saved - step * direction`` in place (one fused kernel)."""
    params, saved, direction = list(params), list(saved), list(direction)
    _check_lists(params, saved, direction, step)
    if params and _compiled_for(params[0].device):
        torch.ops.torchopt_ext.probe_move_(params, saved, direction, step)
    else:
        probe_move_reference_(params, saved, direction, step)


def probe_mover(device: torch.device, host_step: bool = False) -> Callable[..., None]:
    """What ``probe_move_`` calls on ``device``, without the wrapper's checks: for a caller that moves SGD's
    own lists five times a step. With ``host_step`` the step is a Python float, and on the CPU the kernel is
    called without a step tensor or the dispatcher (``_C.probe_move_host``)."""
    if not host_step:
        return torch.ops.torchopt_ext.probe_move_ if _compiled_for(device) else probe_move_reference_
    if _C is not None and device.type == "cpu":
        return _C.probe_move_host

    def move(params, saved, direction, step: float) -> None:
        probe_move_reference_(params, saved, direction, torch.tensor(step, dtype=torch.float64))
    return move


def probe_move_reference_(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor],
                          direction: Sequence[torch.Tensor], step: torch.Tensor) -> None:
    """``probe_move_`` in plain PyTorch: ``saved - direction * h`` in the parameter's dtype (h rounded to it)."""
    _check_lists(params, saved, direction, step)
    h = step.detach().to(torch.float64)
    with torch.no_grad():
        for p, s, d in zip(params, saved, direction):
            p.copy_(s - d * h.to(p.device))


def newton_lr(
    losses: torch.Tensor, eta: torch.Tensor, velocity: torch.Tensor, eps: float, delta: float, beta: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(eta_next, velocity_next) as 0-dim float64 tensors on ``losses``' device.

    ``v <- beta*v - 2 eps (f(+1) - f(-1)) / (f(+2) + f(-2) - 2 f(0) + delta)``, ``eta <- max(delta, eta + v)``.
    When a probe loss or the update is inf/NaN, eta is halved instead (clamped to delta) and v is reset.
    """
    if _compiled_for(losses.device):
        return torch.ops.torchopt_ext.newton_lr(losses, eta, velocity, float(eps), float(delta), float(beta))
    return newton_lr_reference(losses, eta, velocity, eps, delta, beta)


def _finish(eta: torch.Tensor, v_new: torch.Tensor, losses: torch.Tensor, delta: float):
    cand = eta + v_new
    ok = torch.isfinite(losses).all() & torch.isfinite(cand) & torch.isfinite(v_new)
    nxt = torch.where(ok, cand, 0.5 * eta)
    # written as "not >= delta" so that a NaN eta also lands on delta
    nxt = torch.where(nxt >= delta, nxt, torch.full_like(nxt, delta))
    return nxt, torch.where(ok, v_new, torch.zeros_like(v_new))


def newton_lr_reference(losses: torch.Tensor, eta: torch.Tensor, velocity: torch.Tensor,
                        eps: Union[float, torch.Tensor], delta: float,
                        beta: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``newton_lr`` in plain PyTorch ops (float64, no host sync)."""
    if losses.numel() != 5:
        raise ValueError(f"newton_lr: losses must hold the 5 probe losses, got {losses.numel()}")
    f = losses.detach().reshape(5).to(torch.float64)
    eta = eta.detach().reshape(()).to(torch.float64)
    v = velocity.detach().reshape(()).to(torch.float64)
    inc = 2.0 * eps * (f[3] - f[1]) / (f[4] + f[0] - 2.0 * f[2] + delta)
    return _finish(eta, beta * v - inc, f, delta)


def first_order_lr_reference(losses: torch.Tensor, eta: torch.Tensor, velocity: torch.Tensor,
                             eps: Union[float, torch.Tensor], delta: float, meta_lr: float,
                             beta: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """First-order rule (paper eq. 6-8): ``eta <- eta - meta_lr * f'(eta)`` with the central difference
    ``f'(eta) = (f(+1) - f(-1)) / (2 eps)`` (= -g_t'g_{t+1} on the probed batch), same safeguards."""
    f = losses.detach().reshape(5).to(torch.float64)
    eta = eta.detach().reshape(()).to(torch.float64)
    v = velocity.detach().reshape(()).to(torch.float64)
    slope = (f[3] - f[1]) / (2.0 * eps)
    return _finish(eta, beta * v - meta_lr * slope, f, delta)


def _check_guarded(losses, growth, fraction, shrink) -> None:
    if losses.numel() != 5:
        raise ValueError(f"guarded_lr: losses must hold the 5 probe losses, got {losses.numel()}")
    if not (1.0 < growth < float("inf")):
        raise ValueError(f"guarded_lr: growth must be finite and > 1, got {growth}")
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"guarded_lr: fraction must be in (0, 1], got {fraction}")
    if not (1.0 < shrink < float("inf")):
        raise ValueError(f"guarded_lr: shrink must be finite and > 1, got {shrink}")


def guarded_lr(losses: torch.Tensor, eta: torch.Tensor, eps: float, delta: float, growth: float = 2.0,
               fraction: float = 0.5, shrink: float = 100.0) -> torch.Tensor:
    """The next eta, a 0-dim float64 tensor on ``losses``' device, by the guarded rule.

    With slope ``s = (f(+1) - f(-1))/(2 eps)`` and curvature ``c = (f(+2) + f(-2) - 2 f(0))/(4 eps^2)``
    of the loss along the step: where ``c > 0`` the target is ``fraction * (eta - s/c)`` (a minimiser
    behind 0 gives ``eta/shrink``); where ``c <= 0`` eta holds while ``s <= 0`` and is divided by
    ``growth`` otherwise, as for a non-finite probe loss. The result stays within
    ``[eta/shrink, eta*growth]`` and ``>= delta``.
    """
    if _compiled_for(losses.device):
        return torch.ops.torchopt_ext.guarded_lr(losses, eta, float(eps), float(delta), float(growth),
                                                 float(fraction), float(shrink))
    return guarded_lr_reference(losses, eta, eps, delta, growth, fraction, shrink)


def guarded_lr_host(losses: Sequence[float], eta: float, eps: float, delta: float, growth: float = 2.0,
                    fraction: float = 0.5, shrink: float = 100.0) -> float:
    """``guarded_lr`` on Python floats (the compiled rule; without the extension, the reference)."""
    if _C is not None:
        return _C.guarded_lr_host(list(losses), eta, eps, delta, growth, fraction, shrink)
    f = torch.tensor(list(losses), dtype=torch.float64)
    return float(guarded_lr_reference(f, torch.tensor(eta, dtype=torch.float64), eps, delta, growth, fraction, shrink))


def newton_lr_host(losses: Sequence[float], eta: float, velocity: float, eps: float, delta: float,
                   beta: float = 0.0) -> Tuple[float, float]:
    """``newton_lr`` on Python floats: (eta, velocity) (the compiled rule; without the extension, the
    reference)."""
    if _C is not None:
        return _C.newton_lr_host(list(losses), eta, velocity, eps, delta, beta)
    f, t = torch.tensor(list(losses), dtype=torch.float64), lambda v: torch.tensor(v, dtype=torch.float64)
    e, v = newton_lr_reference(f, t(eta), t(velocity), eps, delta, beta)
    return float(e), float(v)


def guarded_lr_reference(losses: torch.Tensor, eta: torch.Tensor, eps: Union[float, torch.Tensor], delta: float,
                         growth: float = 2.0, fraction: float = 0.5, shrink: float = 100.0) -> torch.Tensor:
    """``guarded_lr`` in plain PyTorch ops (float64, no host sync); ``eps`` may be a 0-dim tensor."""
    _check_guarded(losses, growth, fraction, shrink)
    f = losses.detach().reshape(5).to(torch.float64)
    eta = eta.detach().reshape(()).to(torch.float64)
    s = (f[3] - f[1]) / (2.0 * eps)
    c = (f[4] + f[0] - 2.0 * f[2]) / (4.0 * eps * eps)
    finite = torch.isfinite(f).all()
    lo = eta / shrink
    e_star = eta - s / c
    target = torch.where(finite & (c > 0), torch.where(e_star > 0, fraction * e_star, lo),
                         torch.where(finite & ~(s > 0), eta, eta / growth))
    nxt = torch.minimum(torch.maximum(target, lo), eta * growth)  # a NaN stays NaN and lands on delta
    return torch.where(nxt >= delta, nxt, torch.full_like(nxt, delta))
