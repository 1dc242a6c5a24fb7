"""Generated numeric CSV tables and the peak memory of load_split on one, in a fresh process."""
import json
import os
import subprocess
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

# the child resets its peak RSS after the imports so that only the load is measured
_CHILD = r"""
import json, sys, time
import torch
from torchopt_ext.distill.config import DistillConfig
from torchopt_ext.distill.data import load_split


def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS:")
t0 = time.perf_counter()
split = load_split(DistillConfig(csv=sys.argv[1], target=sys.argv[2], steps=1, per_class=1))
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM:"), "seconds": seconds, "reset": reset,
                  "rows": len(split.train_index) + len(split.test_index)}))
"""


def write_table(path, rows, cols=20, seed=0) -> int:
    """A CSV of `cols` standard normal columns x0.. (6 digits) and a three-class `label` column; its size in bytes."""
    rng = np.random.default_rng(seed)
    row_format = ",".join(["%.6g"] * cols) + ",c%d\n"
    with open(path, "w") as fh:
        fh.write(",".join([f"x{j}" for j in range(cols)] + ["label"]) + "\n")
        for start in range(0, rows, 10000):
            n = min(10000, rows - start)
            block = np.column_stack([rng.standard_normal((n, cols)), rng.integers(0, 3, n)]).tolist()
            fh.writelines(row_format % tuple(r[:-1] + [int(r[-1])]) for r in block)
    return os.path.getsize(path)


def peak_memory(path, target="label", root=_ROOT, timeout=600) -> dict:
    """load_split(--csv path) in a fresh process importing torchopt_ext from `root`: RSS before, peak RSS (bytes),
    seconds, and ratio = (peak - before) / file size."""
    res = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(path), target], cwd=root,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"load_split failed in the child:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["ratio"] = (out["peak"] - out["before"]) / os.path.getsize(path)
    return out
