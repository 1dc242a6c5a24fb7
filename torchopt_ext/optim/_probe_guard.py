"""Keeps five loss probes from leaving a trace: random-number state, module buffers, training flags.

Dropout must draw one mask in all five probes (else the finite differences measure mask noise), and
the training run must see the same random stream as without probes; batch-norm running statistics
and ``model.training`` must come back bit for bit (probes use the batch statistics of training mode
but may not move the running averages).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


class ProbeGuard:
    """``with ProbeGuard(model, devices) as g: for ...: g.rewind(); loss = closure()``."""

    def __init__(self, model: Optional[nn.Module], devices: Iterable[torch.device]):
        self.model = model
        self.cuda_devices = sorted({d.index or 0 for d in devices if d.type == "cuda"})

    def __enter__(self):
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(i) for i in self.cuda_devices]
        if self.model is not None:
            self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
            self.flags = [(m, m.training) for m in self.model.modules()]
        return self

    def rewind(self) -> None:
        """Puts the random state back where it was before the first probe: every probe draws the same."""
        torch.set_rng_state(self.cpu_rng)
        for i, state in zip(self.cuda_devices, self.cuda_rng):
            torch.cuda.set_rng_state(state, i)

    def __exit__(self, *exc):
        self.rewind()
        if self.model is not None:
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)
            for m, flag in self.flags:
                m.training = flag
        return False
