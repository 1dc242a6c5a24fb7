"""Peak resident memory of a piece of work, the one memory figure every method shares.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status) and resets it to the current size when
"5" is written to /proc/self/clear_refs; so the peak of one cell is measured without a second process. What the
figure holds: every byte the method touched while it ran (tensors, autograd's saved tensors, the allocator's
slack), above what the process held when the cell began. Elsewhere, or where the reset is refused, None.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_rss():
    """Yields a dict that, after the block, holds ``peak_rss_bytes``: the block's peak resident size above the
    size at its start (None where it cannot be measured)."""
    out: Dict[str, Optional[int]] = {"peak_rss_bytes": None}
    start = _status_kib("VmRSS") if _reset_peak() else None
    try:
        yield out
    finally:
        peak = _status_kib("VmHWM")
        if start is not None and peak is not None:
            out["peak_rss_bytes"] = max(0, peak - start) * 1024
