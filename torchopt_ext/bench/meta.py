"""What a results page states about a measurement besides its figures: when, on what, under what
load, by which command and at which commit. The bench CLI stores it as its JSON's ``"meta"``, which
``benchmarks/render.py`` requires."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Dict, Optional, Sequence

import torch

# the fields every rendered JSON carries; "commit" and "software" are optional
REQUIRED = ("date", "hardware", "load", "command")
# environment variables that change what the bench measures, so they belong to its command line
COMMAND_ENV = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY")


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: str) -> str:
    """The device the figures are about: the GPU's name for CUDA, else the CPU's, with its core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()}, {os.cpu_count()} logical cores"


def load() -> str:
    """The one-minute load average when the run starts: other jobs slow a shared machine down."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} at the start"
    except (AttributeError, OSError):  # not on Windows
        return "load average not available on this platform"


def command(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    """The shell command that reruns this measurement: the relevant environment, then the CLI."""
    env = os.environ if env is None else env
    prefix = [f"{k}={shlex.quote(env[k])}" for k in COMMAND_ENV if k in env]
    return " ".join(prefix + ["python -m torchopt_ext", shlex.join(list(argv))])


def collect(device: str, argv: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The ``"meta"`` object of one bench run; ``argv``: the CLI arguments (default ``sys.argv[1:]``)."""
    from torchopt_ext.compare.lr_free import _git_rev  # the one helper that names the checkout

    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(device),
        "load": load(),
        "command": command(sys.argv[1:] if argv is None else argv),
        "software": f"Python {platform.python_version()}",
    }
    rev = _git_rev()
    if rev:
        out["commit"] = rev
    return out
