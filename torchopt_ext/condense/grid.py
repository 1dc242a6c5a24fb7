"""``run_grid``: every (method, ipc) cell condensed, saved, drawn and evaluated; results.json and results.md.

Layout of ``out``: config.json (the grid's configuration), cells/<method>_ipc<k>.pt (the SyntheticSet, loadable
with ``torch.load(weights_only=True)``), cells/<method>_ipc<k>.png (its images per class), results.json (every
number), results.md (the table). The whole-data row is the cell ``whole`` (its .pt keeps only the metadata:
the images are the training part). Each file is written atomically, so an interrupted grid resumes per cell.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
from tqdm.auto import tqdm

from torchopt_ext._atomic import atomic_open
from torchopt_ext.condense.config import CondenseConfig, CondenseError, derive_seed
from torchopt_ext.condense.data import check_ipc, load_images
from torchopt_ext.condense.evaluate import compute_threads, evaluate_detailed, protocol_text
from torchopt_ext.condense.methods import load_methods
from torchopt_ext.condense.nets import make_net
from torchopt_ext.condense.plots import image_grid
from torchopt_ext.condense.report import cell_name, results_markdown
from torchopt_ext.condense.types import ImageData, SyntheticSet

# options a resumed grid may change: which cells there are, and the whole-data row's epochs (its evaluation
# is reused only when its epochs match)
_GRID_FIELDS = ("methods", "ipcs", "whole", "whole_epochs")


def grid_cells(config: CondenseConfig):
    """(method, ipc) of every cell, in table order; the whole-data cell once, with ipc None."""
    cells = [(m, k) for m in config.methods if m != "whole" for k in config.ipcs]
    if config.whole or "whole" in config.methods:
        cells.append(("whole", None))
    return cells


def _check_inputs(config: CondenseConfig, data: ImageData):
    """Every error a bad option can raise, before any file is written."""
    make_net(config.net, data.shape, data.n_classes, config.width, config.depth)
    for name in config.test_nets:
        make_net(name, data.shape, data.n_classes, config.width, config.depth, arg="--eval-nets")
    if any(m != "whole" for m in config.methods):
        for k in config.ipcs:
            check_ipc(data, k)


def _prepare_out(config: CondenseConfig, out: str, resume: bool):
    path = os.path.join(out, "config.json")
    if not resume:
        if os.path.exists(out):
            raise CondenseError(f"--out: {out} already exists; expected a new directory (nothing was overwritten). "
                                "Pass --resume to reuse its finished cells, or choose another --out")
        return
    if not os.path.isfile(path):
        raise CondenseError(f"--resume: {out} is not a grid directory (no config.json)")
    try:
        with open(path) as fh:
            saved = CondenseConfig.from_json(fh.read())
    except (OSError, ValueError, TypeError) as exc:
        raise CondenseError(f"--resume: cannot read {path} ({exc})") from None
    differ = [f.name for f in dataclasses.fields(config)
              if f.name not in _GRID_FIELDS and getattr(config, f.name) != getattr(saved, f.name)]
    if differ:
        flags = ", ".join("--" + d.replace("_", "-") for d in differ)
        raise CondenseError(f"--resume: {flags} differ from the grid in {out} (its config.json); a resumed grid may "
                            "only change --method, --ipc, --no-whole and --whole-epochs")


def _load_results(out: str):
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            return json.load(fh).get("cells", {})
    except (OSError, ValueError) as exc:
        raise CondenseError(f"--resume: {path} is corrupt ({exc}); delete it to re-evaluate every cell") from None


def save_set(syn: SyntheticSet, path: str):
    """The set's state (tensors and plain values) to ``path``; the whole-data set keeps only its metadata."""
    state = syn.to_state()
    if syn.meta.get("whole"):
        state["images"], state["labels"] = syn.images[:0].clone(), syn.labels[:0].clone()
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_set(path: str, data: ImageData):
    """The SyntheticSet saved at ``path`` (the whole-data set rebuilt from ``data``), or None if it does not load
    or does not fit ``data``."""
    try:
        syn = SyntheticSet.from_state(torch.load(path, weights_only=True))
    except Exception:
        return None
    if syn.meta.get("whole"):
        if syn.meta.get("n_train") != int(data.x_train.shape[0]):
            return None
        from torchopt_ext.condense.methods.baselines import whole
        return whole(data, None, None, None)
    ok = (syn.images.dim() == 4 and tuple(syn.images.shape[1:]) == data.shape and syn.labels.dim() == 2
          and syn.labels.shape == (syn.images.shape[0], data.n_classes))
    return syn if ok else None


def _plain(value):
    """``value`` if JSON can hold it, tensors as lists, anything else as its repr."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _write(out: str, results: dict):
    with atomic_open(os.path.join(out, "results.json")) as fh:
        json.dump(results, fh, indent=1)
    with atomic_open(os.path.join(out, "results.md")) as fh:
        fh.write(results_markdown(results))


def run_grid(config: CondenseConfig, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Run, save and evaluate every cell of ``config``'s grid into ``out``; returns the results.json content.

    Cell (method, ipc) runs ``METHODS[method](data, ipc, config, generator, progress)`` with the generator seeded
    by derive_seed(seed, method, ipc), then :func:`evaluate_detailed` on each evaluation net (same seeds in every
    cell, so the rows differ only by their sets). With ``resume``, ``out`` must hold a grid with the same
    options except --method/--ipc/--no-whole/--whole-epochs; a cell whose set loads is not re-run, and its
    evaluation is reused when results.json has it for every evaluation net with the same epochs.
    """
    config.validate()
    methods = load_methods()
    with compute_threads(config.threads):
        data = load_images(config.dataset, config.data_root, config.seed, config.test_fraction, config.zca,
                           config.torch_dtype)
        _check_inputs(config, data)
        _prepare_out(config, out, resume)
        os.makedirs(os.path.join(out, "cells"), exist_ok=True)
        with atomic_open(os.path.join(out, "config.json")) as fh:
            fh.write(config.to_json())
        done = _load_results(out) if resume else {}
        results = {"config": dataclasses.asdict(config), "data": data.record(), "command": config.command(out),
                   "protocol": protocol_text(config.eval_models, config.eval_epochs, config.eval_optimizer,
                                             config.use_learned_lrs),
                   "cells": {}}
        cells = grid_cells(config)
        bar = tqdm(cells, disable=not progress, desc="cells")
        for method, ipc in bar:
            name = cell_name(method, ipc)
            bar.set_postfix_str(name)
            results["cells"][name] = _run_cell(config, data, methods[method], method, ipc, name, out,
                                               done.get(name), progress)
            _write(out, results)
        bar.close()
    return results


def _run_cell(config, data, fn, method, ipc, name, out, previous, progress):
    pt, png = os.path.join(out, "cells", name + ".pt"), os.path.join(out, "cells", name + ".png")
    syn = load_set(pt, data) if os.path.isfile(pt) else None
    epochs = (config.whole_epochs or config.eval_epochs) if method == "whole" else config.eval_epochs
    old = (previous or {}).get("eval", {})
    if syn is not None and all(old.get(n, {}).get("epochs") == epochs for n in config.test_nets):
        record = dict(previous, eval={n: previous["eval"][n] for n in config.test_nets}, reused=True)
    else:
        record = {"method": method, "ipc": ipc, "file": os.path.relpath(pt, out), "png": os.path.relpath(png, out)}
        if syn is None:
            gen = torch.Generator().manual_seed(derive_seed(config.seed, method, ipc))
            t0 = time.perf_counter()
            syn = fn(data, ipc, config, gen, progress)
            record["method_wall_s"] = time.perf_counter() - t0
            save_set(syn, pt)
        else:   # the set survived an interrupted evaluation
            record["method_wall_s"] = (previous or {}).get("method_wall_s", 0.0)
        record["eval"] = {n: evaluate_detailed(syn, data, n, config.eval_models, epochs, config.seed,
                                               config.eval_optimizer, config.use_learned_lrs, progress,
                                               config.width, config.depth) for n in config.test_nets}
    record["n_images"] = int(syn.images.shape[0])
    record["meta"] = {k: _plain(v) for k, v in syn.meta.items() if k != "train_index"}
    if not os.path.isfile(png):
        image_grid(syn, data, png, title=f"{method}" + ("" if ipc is None else f", ipc {ipc}"))
    return record
