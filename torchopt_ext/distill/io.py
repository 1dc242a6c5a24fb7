"""Files: the distilled set (.pt without pickle, and .csv), checkpoints, the exact configuration.

Every file is written through ``atomic_open`` (a crash leaves the old file or the new one), and the
.pt files carry ``sha256``, a digest of their tensors' bytes, checked when they are read back.
"""
import csv
import hashlib
import json

import torch

from torchopt_ext._atomic import atomic_open
from torchopt_ext.distill.config import DistillConfig, DistillError

DIGEST_KEY = "sha256"


def tensor_digest(obj) -> str:
    """sha256 over a nest of dicts, lists and tensors: every tensor's dtype, shape and bytes, and
    every plain value's repr, in a fixed order (dict keys sorted); the top-level DIGEST_KEY is skipped."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):  # a tuple may come back from torch.load as either
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk({k: v for k, v in obj.items() if k != DIGEST_KEY} if isinstance(obj, dict) else obj)
    return h.hexdigest()


def save_torch(obj, path):
    """``obj`` (a dict of tensors and plain values) to ``path``, atomically, with its DIGEST_KEY added."""
    obj = dict(obj)
    obj[DIGEST_KEY] = tensor_digest(obj)
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def digest_ok(raw) -> bool:
    """Whether ``raw``, as read back, holds a DIGEST_KEY matching its tensors."""
    return isinstance(raw, dict) and raw.get(DIGEST_KEY) == tensor_digest(raw)


def distilled_names(stem):
    """The three files ``save_distilled(ds, stem + '.pt')`` writes."""
    return [stem + ".pt", stem + ".csv", stem + "_lrs.csv"]


def save_distilled(ds, path):
    """Write ``path`` (.pt: tensors and plain values, loadable with weights_only=True) and the .csv files."""
    stem = path[:-3] if path.endswith(".pt") else path
    save_torch({"points": ds.points, "labels": ds.labels, "lrs": ds.lrs, "meta": dict(ds.meta)}, stem + ".pt")
    save_distilled_csv(ds, stem)
    return stem + ".pt"


def save_distilled_csv(ds, stem):
    """``stem.csv`` (one row per synthetic point) and ``stem_lrs.csv`` (one row per inner step)."""
    s, B, d = ds.points.shape
    C = ds.labels.shape[-1]
    with atomic_open(stem + ".csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "lr_first_epoch"] + [f"x{i}" for i in range(d)] + [f"p{c}" for c in range(C)])
        for k in range(s):
            for b in range(B):
                w.writerow([k, f"{float(ds.lrs[k]):.8g}"] + [f"{float(v):.8g}" for v in ds.points[k, b]]
                           + [f"{float(v):.8g}" for v in ds.labels[k, b]])
    with atomic_open(stem + "_lrs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["inner_step", "lr"])
        for k, v in enumerate(ds.lrs.tolist()):
            w.writerow([k, f"{v:.8g}"])


def load_distilled(path):
    """The DistilledSet in ``path``; a file with a digest that does not match its tensors is refused."""
    from torchopt_ext.distill.distill import DistilledSet
    try:
        raw = torch.load(path, weights_only=True)
        ds = DistilledSet(raw["points"], raw["labels"], raw["lrs"], raw.get("meta", {}))
    except FileNotFoundError:
        raise DistillError(f"distilled set {path}: no such file") from None
    except Exception as exc:
        raise DistillError(f"distilled set {path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None
    if DIGEST_KEY in raw and not digest_ok(raw):  # files from before digests have none
        raise DistillError(f"distilled set {path} is corrupt: its tensors do not match the sha256 stored in it")
    return ds


def save_checkpoint(state, path):
    """Atomically, with a digest; a state with non-finite learned tensors is never written."""
    bad = non_finite(state)
    if bad:
        raise DistillError(f"refusing to write checkpoint {path}: non-finite {', '.join(bad)}")
    save_torch(state, path)


def non_finite(state):
    """Names of the learned tensors (points, lr_raw, label_logits) in ``state`` holding inf or nan."""
    return [k for k in ("points", "lr_raw", "label_logits")
            if isinstance(state.get(k), torch.Tensor) and not bool(torch.isfinite(state[k]).all())]


def load_checkpoint(path):
    """The checkpoint dict, its digest and its learned tensors' finiteness checked."""
    fix = (f"delete {path} to run the restarts it belongs to from their start (finished restarts are kept), "
           "or start a new --out")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise DistillError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); "
                           f"{fix}") from None
    if isinstance(state, dict) and "restart" in state and "restarts" not in state:
        raise DistillError(f"--resume: checkpoint {path} holds one restart in the layout of an earlier version, "
                           f"which batched runs cannot continue; {fix}")
    needed = {"restarts", "epoch", "iteration", "points", "lr_raw", "optimizer", "generator", DIGEST_KEY}
    if not isinstance(state, dict) or not needed <= set(state):
        raise DistillError(f"--resume: checkpoint {path} is corrupt: expected keys {sorted(needed)}; {fix}")
    if not (all(_is_int(state[k]) for k in ("epoch", "iteration")) and isinstance(state["restarts"], list)
            and state["restarts"] and all(_is_int(r) for r in state["restarts"])):
        raise DistillError(f"--resume: checkpoint {path} is corrupt: epoch and iteration must be integers and "
                           f"restarts a list of integers; {fix}")
    if not digest_ok(state):
        raise DistillError(f"--resume: checkpoint {path} is corrupt: its tensors do not match the sha256 "
                           f"stored in it; {fix}")
    bad = non_finite(state)
    if bad:
        raise DistillError(f"--resume: checkpoint {path} holds non-finite {', '.join(bad)}; {fix}")
    return state


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def save_config(config, path):
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(config.to_json())


def load_config(path):
    """The recorded configuration, validated: a hand-edited file with wrong types or values is refused."""
    try:
        with open(path, encoding="utf-8") as fh:
            return DistillConfig.from_json(fh.read()).validate()
    except (OSError, ValueError, TypeError) as exc:  # DistillError and JSONDecodeError are ValueErrors
        raise DistillError(f"--resume: the run's configuration {path} is invalid or unreadable ({exc}); "
                           "restore it or start a new --out") from None


def save_json(obj, path):
    """``obj`` as JSON; refuses inf and nan, which JSON cannot hold."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(json_text(obj))


def json_text(obj) -> str:
    return json.dumps(obj, allow_nan=False)
