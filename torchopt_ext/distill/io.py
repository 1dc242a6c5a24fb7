"""Files: the distilled set (.pt without pickle, and .csv), checkpoints, the exact configuration."""
import csv
import json
import os

import torch

from torchopt_ext.distill.config import DistillConfig, DistillError


def _atomic_save(obj, path):
    # write then rename: an interrupted save never replaces the last good file
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_distilled(ds, path):
    """Write ``path`` (.pt: tensors and plain values, loadable with weights_only=True) and a .csv."""
    stem = path[:-3] if path.endswith(".pt") else path
    _atomic_save({"points": ds.points, "labels": ds.labels, "lrs": ds.lrs, "meta": dict(ds.meta)}, stem + ".pt")
    s, B, d = ds.points.shape
    C = ds.labels.shape[-1]
    with open(stem + ".csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "lr_first_epoch"] + [f"x{i}" for i in range(d)] + [f"p{c}" for c in range(C)])
        for k in range(s):
            for b in range(B):
                w.writerow([k, f"{float(ds.lrs[k]):.8g}"] + [f"{float(v):.8g}" for v in ds.points[k, b]]
                           + [f"{float(v):.8g}" for v in ds.labels[k, b]])
    with open(stem + "_lrs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["inner_step", "lr"])
        for k, v in enumerate(ds.lrs.tolist()):
            w.writerow([k, f"{v:.8g}"])
    return stem + ".pt"


def load_distilled(path):
    from torchopt_ext.distill.distill import DistilledSet
    try:
        raw = torch.load(path, weights_only=True)
        return DistilledSet(raw["points"], raw["labels"], raw["lrs"], raw.get("meta", {}))
    except FileNotFoundError:
        raise DistillError(f"distilled set {path}: no such file") from None
    except Exception as exc:
        raise DistillError(f"distilled set {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None


def save_checkpoint(state, path):
    _atomic_save(state, path)


def load_checkpoint(path):
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise DistillError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
                           "delete it to restart the interrupted restart from scratch") from None
    needed = {"restart", "epoch", "iteration", "points", "lr_raw", "optimizer", "generator"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise DistillError(f"--resume: checkpoint {path} is corrupt: expected keys {sorted(needed)}")
    return state


def save_config(config, path):
    with open(path, "w") as fh:
        fh.write(config.to_json())


def load_config(path):
    try:
        with open(path) as fh:
            return DistillConfig.from_json(fh.read())
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise DistillError(f"--resume: cannot read the run's configuration {path} ({exc})") from None
