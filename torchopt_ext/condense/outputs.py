"""The grid's --out: one writer at a time, every file in manifest.json, sets that carry a digest, and what
``--resume`` can reuse. Used on rank 0 only: the other ranks of a torchrun never touch --out.

The directory rules are the distill driver's (distill/rundir.py, manifest.py, io.py): a new grid makes a new
directory; DIR/.lock is held for the whole run (a second run there is refused, naming the holder from
.lock.info; a killed run's lock is free again); every file is written atomically and recorded in
manifest.json (size, sha256); each cells/*.pt carries a sha256 of its tensors, checked when it is read back.
``--resume`` reuses a cell whose set passes that check, and its evaluation when results.json is the file the
manifest records; whatever is missing or damaged is computed again, and the run says which.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from torchopt_ext._atomic import atomic_open
from torchopt_ext.condense.config import CondenseConfig, CondenseError
from torchopt_ext.condense.plots import image_grid
from torchopt_ext.condense.report import cell_name, results_markdown
from torchopt_ext.condense.types import ImageData, SyntheticSet
from torchopt_ext.distill import rundir
from torchopt_ext.distill.io import DIGEST_KEY, digest_ok, save_torch
from torchopt_ext.distill.manifest import NAME as MANIFEST, Manifest

CONFIG = rundir.CONFIG
CELLS = "cells"
RESULTS, TABLE = "results.json", "results.md"
# what a grid writes before any set is saved: a new directory holding only these is removed on failure
DISPOSABLE = {CONFIG, MANIFEST}
# options a resumed grid may change: which cells there are, and the whole-data row's epochs (its evaluation
# is reused only when its epochs match)
GRID_FIELDS = ("methods", "ipcs", "whole", "whole_epochs")


def set_files(name: str):
    """The .pt and .png of cell ``name``, relative to --out."""
    return f"{CELLS}/{name}.pt", f"{CELLS}/{name}.png"


def saved_state(syn: SyntheticSet) -> dict:
    """What a cell's .pt holds (tensors and plain values): the set's state, the whole-data set's metadata only."""
    state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in syn.to_state().items()}
    if syn.meta.get("whole"):
        state["images"], state["labels"] = state["images"][:0].clone(), state["labels"][:0].clone()
    return state


def set_from_state(state: dict, data: ImageData, where: str = "the set") -> SyntheticSet:
    """The SyntheticSet of a saved state (the whole-data set rebuilt from ``data``); CondenseError naming
    ``where`` when it does not fit ``data``."""
    syn = SyntheticSet.from_state(state)
    if syn.meta.get("whole"):
        if syn.meta.get("n_train") != int(data.x_train.shape[0]):
            raise CondenseError(f"{where} does not fit the data: it was made from {syn.meta.get('n_train')} "
                                f"training images, the data have {int(data.x_train.shape[0])}")
        from torchopt_ext.condense.methods.baselines import whole
        return whole(data, None, None, None)
    images, labels = syn.images, syn.labels
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and images.dim() == 4
            and tuple(images.shape[1:]) == data.shape and labels.shape == (images.shape[0], data.n_classes)):
        raise CondenseError(f"{where} does not fit the data: expected images (M, {', '.join(map(str, data.shape))}) "
                            f"and labels (M, {data.n_classes})")
    return syn


def save_set(state: dict, path: str) -> None:
    """A :func:`saved_state` to ``path``, atomically, with the digest of its tensors."""
    save_torch(state, path)


def load_set(path: str, data: ImageData):
    """(SyntheticSet, its saved state) read from ``path``; CondenseError saying why when it does not load,
    its tensors do not match the digest stored in it, or it does not fit ``data``."""
    try:
        raw = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CondenseError(f"{path}: no such file") from None
    except Exception as exc:
        raise CondenseError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or not {"images", "labels", DIGEST_KEY} <= set(raw):
        raise CondenseError(f"{path} is not a synthetic set of this grid (expected images, labels and {DIGEST_KEY})")
    if not digest_ok(raw):
        raise CondenseError(f"{path} is corrupt: its tensors do not match the {DIGEST_KEY} stored in it")
    state = {k: v for k, v in raw.items() if k != DIGEST_KEY}
    return set_from_state(state, data, path), state


def check_out(out: str, resume: bool) -> None:
    """Everything about --out that can be checked before the data are read."""
    (rundir.check_resumable if resume else rundir.check_new)(out)


def _is(name: str, problem: str) -> str:
    return f"{name} is {problem}" if problem in ("missing", "empty") else f"{name}: {problem}"


class GridDir:
    """The locked --out of one grid (rank 0): config.json checked or written, then the sets and results."""

    def __init__(self, out: str, config: CondenseConfig, resume: bool):
        self.out, self.config, self.resume = out, config, resume
        self.lock = rundir.open_existing(out) if resume else rundir.create(out)
        try:
            if resume:
                self.manifest, note = Manifest.load(out)
                if note:
                    self._say(note)
                self._check_config()
                for folder in (out, os.path.join(out, CELLS)):
                    if os.path.isdir(folder):
                        for name in rundir.remove_temporaries(folder):
                            self._say(f"removed {os.path.relpath(os.path.join(folder, name), out)}, the temporary "
                                      "file of a write that never finished")
            else:
                self.manifest = Manifest(out)
            with atomic_open(self._path(CONFIG)) as fh:
                fh.write(config.to_json())
            self.manifest.record(CONFIG)
            self.manifest.save()
        except BaseException:
            self.lock.release()
            raise
        self.redone = {}       # cell -> why its set is condensed again
        self.reevaluated = []  # cells whose reused set is evaluated again

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _say(self, text: str) -> None:
        print(f"resume: {text}", file=sys.stderr)

    def _check_config(self) -> None:
        path = self._path(CONFIG)
        if CONFIG in self.manifest.files and self.manifest.problem(CONFIG) is not None:
            raise CondenseError(f"--resume: {path} was changed after the grid wrote it (its sha256 differs from "
                                f"{MANIFEST}); restore it, or start a new --out")
        try:
            with open(path) as fh:
                saved = CondenseConfig.from_json(fh.read())
        except (OSError, ValueError, TypeError) as exc:
            raise CondenseError(f"--resume: cannot read {path} ({exc})") from None
        differ = [f.name for f in dataclasses.fields(self.config)
                  if f.name not in GRID_FIELDS and getattr(self.config, f.name) != getattr(saved, f.name)]
        if differ:
            flags = ", ".join("--" + d.replace("_", "-") for d in differ)
            raise CondenseError(f"--resume: {flags} differ from the grid in {self.out} (its config.json); a resumed "
                                "grid may only change --method, --ipc, --no-whole and --whole-epochs")

    def _trusted_results(self) -> dict:
        """The cells of results.json when it is the file the manifest records, else {} (and why)."""
        problem = self.manifest.problem(RESULTS)
        if problem == "missing" and RESULTS not in self.manifest.files:
            return {}
        if problem is None:
            try:
                with open(self._path(RESULTS)) as fh:
                    return dict(json.load(fh)["cells"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = f"unreadable ({exc})"
        self._say(f"{_is(RESULTS, problem)}: every cell is evaluated again")
        return {}

    def _reusable_set(self, method: str, ipc, data: ImageData):
        """The saved state of cell (method, ipc) when its .pt checks out, else None (and why)."""
        name = cell_name(method, ipc)
        pt, png = set_files(name)
        if not os.path.isfile(self._path(pt)):
            if pt in self.manifest.files:
                self.redone[name] = f"{pt} is missing"
            return None
        try:
            syn, state = load_set(self._path(pt), data)
        except CondenseError as exc:
            self.redone[name] = str(exc)
            self.manifest.forget(pt, png)
            return None
        self.manifest.record(pt)  # its own digest vouches for it
        problem = self.manifest.problem(png)
        if problem is not None:
            self._say(f"{_is(png, problem)}: drawn again")
            self._draw(method, ipc, syn, data)
        return state

    def plan(self, cells, data: ImageData) -> dict:
        """name -> {"record": its results record to reuse, or None; "state": the saved state of a set to reuse
        (None: condense it; not sent when the record is reused); "method_wall_s"} for every (method, ipc)."""
        done = self._trusted_results() if self.resume else {}
        nets = self.config.test_nets
        plan = {}
        for method, ipc in cells:
            name = cell_name(method, ipc)
            state = self._reusable_set(method, ipc, data) if self.resume else None
            previous = done.get(name) or {}
            epochs = self.config.cell_epochs(method)
            old = previous.get("eval", {})
            record = None
            if state is not None and all(old.get(n, {}).get("epochs") == epochs for n in nets):
                record = dict(previous, eval={n: old[n] for n in nets}, reused=True)
            elif state is not None:
                self.reevaluated.append(name)
            if name in self.redone:
                self._say(f"{self.redone[name]}; cell {name} is condensed again")
            plan[name] = {"record": record, "state": None if record is not None else state,
                          "method_wall_s": previous.get("method_wall_s", 0.0)}
        self.manifest.save()
        return plan

    def _draw(self, method: str, ipc, syn: SyntheticSet, data: ImageData) -> None:
        png = set_files(cell_name(method, ipc))[1]
        image_grid(syn, data, self._path(png), title=method + ("" if ipc is None else f", ipc {ipc}"))
        self.manifest.record(png)

    def save_sets(self, sets, data: ImageData) -> None:
        """(method, ipc, saved state) of newly condensed cells: each .pt and .png written and recorded."""
        for method, ipc, state in sets:
            pt = set_files(cell_name(method, ipc))[0]
            save_set(state, self._path(pt))
            self.manifest.record(pt)
            self._draw(method, ipc, set_from_state(state, data, pt), data)
        self.manifest.save()

    def write_results(self, results: dict, complete: bool = False) -> None:
        with atomic_open(self._path(RESULTS)) as fh:
            json.dump(results, fh, indent=1)
        with atomic_open(self._path(TABLE)) as fh:
            fh.write(results_markdown(results))
        self.manifest.record(RESULTS, TABLE)
        self.manifest.save(complete=complete)
        if complete and self.resume:
            self._summary(results)

    def _summary(self, results: dict) -> None:
        """One line: which cells were reused, which saved sets were evaluated, which cells were condensed."""
        cells = results["cells"]
        reused = [n for n, c in cells.items() if c.get("reused")]
        condensed = [n for n in cells if n not in reused and n not in self.reevaluated]
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("reused", reused), ("evaluated the saved sets of", self.reevaluated),
            ("condensed again", [n for n in condensed if n in self.redone]),
            ("condensed", [n for n in condensed if n not in self.redone])) if names]
        self._say("; ".join(parts))

    def close(self, failed: bool) -> bool:
        """Releases the lock; a new grid that failed before any set was saved is removed (returns True)."""
        if failed and not self.resume and rundir.remove_if_disposable(self.lock, DISPOSABLE, (CELLS,)):
            return True
        self.lock.release()
        return False
