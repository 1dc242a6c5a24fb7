"""``run_grid``: every (method, ipc) cell condensed, saved, drawn and evaluated; results.json and results.md.

Layout of ``out`` (condense/outputs.py keeps it): config.json, cells/<method>_ipc<k>.pt (the SyntheticSet and
a digest of its tensors, loadable with ``torch.load(weights_only=True)``), cells/<method>_ipc<k>.png,
results.json (every number), results.md (the table), manifest.json (size and sha256 of each of them); .lock
while a run uses it. The whole-data row is the cell ``whole`` (its .pt keeps only the metadata).

The work is one queue over the ranks of a torchrun (condense/ranks.py): the cells still to condense, then one
unit per (cell, evaluation net, net index j), each claimed by the first free rank once its set exists. Rank 0
alone writes: each set as it arrives, results.json and results.md whenever a cell's evaluation is complete.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch
from tqdm.auto import tqdm

from torchopt_ext._distributed import everywhere, gathered, on_rank0, rank_world
from torchopt_ext.condense.config import CondenseConfig, CondenseError, derive_seed
from torchopt_ext.condense.data import check_ipc, load_images
from torchopt_ext.condense.evaluate import compute_threads, evaluate_detailed, merge_evaluations, protocol_text
from torchopt_ext.condense.methods import PREPARE, load_methods
from torchopt_ext.condense.nets import make_net
from torchopt_ext.condense.outputs import GridDir, check_out, saved_state, set_files, set_from_state
from torchopt_ext.condense.ranks import run_queue
from torchopt_ext.condense.report import cell_name
from torchopt_ext.condense.types import ImageData
from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.rundir import removed_note


def grid_cells(config: CondenseConfig):
    """(method, ipc) of every cell, in table order; the whole-data cell once, with ipc None."""
    cells = [(m, k) for m in config.methods if m != "whole" for k in config.ipcs]
    if config.whole or "whole" in config.methods:
        cells.append(("whole", None))
    return cells


def _load_data(config: CondenseConfig) -> ImageData:
    """The data, and every error a bad option can raise, before any file is written."""
    data = load_images(config.dataset, config.data_root, config.seed, config.test_fraction, config.zca,
                       config.torch_dtype)
    for name in config.train_nets:
        make_net(name, data.shape, data.n_classes, config.width, config.depth,
                 arg="--distill-nets" if config.distill_nets else "--net")
    for name in config.test_nets:
        make_net(name, data.shape, data.n_classes, config.width, config.depth, arg="--eval-nets")
    if any(m != "whole" for m in config.methods):
        for k in config.ipcs:
            check_ipc(data, k)
    return data


def _plain(value):
    """``value`` if JSON can hold it, tensors as lists, anything else as its repr."""
    import json
    if isinstance(value, torch.Tensor):
        return value.tolist()
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def run_grid(config: CondenseConfig, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Run, save and evaluate every cell of ``config``'s grid into ``out``; returns the results.json content
    (on every rank of a torchrun; rank 0 alone writes ``out``).

    Cell (method, ipc) runs ``METHODS[method](data, ipc, config, generator, progress)`` with the generator seeded
    by derive_seed(seed, method, ipc), then :func:`evaluate_detailed` on each evaluation net (same seeds in every
    cell, so the rows differ only by their sets). With ``resume``, ``out`` must hold a grid with the same
    options except --method/--ipc/--no-whole/--whole-epochs; a cell whose set passes its digest is not re-run,
    and its evaluation is reused when the manifest's results.json has it for every evaluation net with the
    same epochs. A new grid that fails before any set was saved leaves no directory behind.
    """
    config.validate()
    config.out = out   # not a field (not saved): where methods keep reusable work, e.g. mtt's OUT/experts
    methods = load_methods()
    rank, _ = rank_world()
    on_rank0(lambda: check_out(out, resume))
    with compute_threads(config.threads):
        data = everywhere(lambda: _load_data(config))
        outdir = on_rank0(lambda: GridDir(out, config, resume))
        try:
            results = _run(config, data, methods, outdir, out, progress and rank == 0)
        except BaseException as exc:
            if outdir is not None and outdir.close(failed=True):
                if isinstance(exc, DistillError):
                    raise CondenseError(f"{exc}; {removed_note(out)}") from None
                print(removed_note(out), file=sys.stderr)
            raise
        if outdir is not None:
            outdir.close(failed=False)
    return results


def _condense_cell(config, data, methods, cell, progress):
    """(saved state, wall seconds) of the set of cell (method, ipc), from the cell's own seed."""
    method, ipc = cell
    gen = torch.Generator().manual_seed(derive_seed(config.seed, method, ipc))
    t0 = time.perf_counter()
    syn = methods[method](data, ipc, config, gen, progress)
    return saved_state(syn), time.perf_counter() - t0


def _run(config, data, methods, outdir, out, progress):
    rank, world = rank_world()
    cells = grid_cells(config)
    plan = gathered(lambda: outdir.plan(cells, data) if rank == 0 else None)[0]
    records = {name: p["record"] for name, p in plan.items() if p["record"] is not None}
    states = {name: p["state"] for name, p in plan.items() if p["state"] is not None}
    walls = {name: p["method_wall_s"] for name, p in plan.items()}
    todo = [c for c in cells if cell_name(*c) not in records and cell_name(*c) not in states]
    prepared = {}
    for method in dict.fromkeys(m for m, _ in todo):
        if method in PREPARE:
            t0 = time.perf_counter()
            PREPARE[method](data, config, progress)
            prepared[method] = time.perf_counter() - t0
    syns = {name: set_from_state(state, data, set_files(name)[0]) for name, state in states.items()}

    def write(records, complete=False):
        results = _results(config, data, out, cells, records, world, prepared)
        if outdir is not None:   # rank 0
            outdir.write_results(results, complete)
        return results
    _work(config, data, methods, todo, [c for c in cells if cell_name(*c) not in records], outdir,
          (states, syns, walls, records), write, progress)
    return everywhere(lambda: write(records, complete=True))


def _work(config, data, methods, todo, to_evaluate, outdir, found, write, progress):
    """The sets of the cells in ``todo``, then every (cell, evaluation net, j) training of ``to_evaluate``, as
    one queue over the ranks (condense/ranks.py), longest units first so that the last ones are short. Every
    rank fills ``found`` = (states, syns, walls, records); rank 0 saves each set as it arrives and writes the
    results whenever a cell's evaluation is complete."""
    states, syns, walls, records = found
    nets, n = config.test_nets, config.eval_models
    todo = sorted(todo, key=lambda c: (c[1] is None, -(c[1] or 0)))
    # an evaluation's cost grows with images x epochs (whole data: few epochs of many images)
    size = {cell_name(m, k): data.x_train.shape[0] if k is None else k * data.n_classes for m, k in to_evaluate}
    to_evaluate = sorted(to_evaluate, key=lambda c: -size[cell_name(*c)] * config.cell_epochs(c[0]))
    units = [("condense", cell) for cell in todo]
    units += [("evaluate", cell, net, j) for cell in to_evaluate for net in nets for j in range(n)]
    first = {cell: i for i, (_, cell) in enumerate(units[:len(todo)])}
    parts = {cell_name(*c): {net: {} for net in nets} for c in to_evaluate}   # cell -> net -> j -> record
    bars = {kind: tqdm(total=sum(u[0] == kind for u in units), disable=not progress, desc=kind)
            for kind in ("condense", "evaluate")}

    def compute(unit):
        if unit[0] == "condense":
            return _condense_cell(config, data, methods, unit[1], progress)
        (method, ipc), net, j = unit[1:]
        return evaluate_detailed(syns[cell_name(method, ipc)], data, net, n, config.cell_epochs(method),
                                 config.seed, config.eval_optimizer, config.use_learned_lrs, progress,
                                 config.width, config.depth, models=[j], augment=config.eval_augment)

    def collect(i, result):
        kind, (method, ipc) = units[i][:2]
        name = cell_name(method, ipc)
        if kind == "condense":
            (states[name], walls[name]), pt = result, set_files(name)[0]
            syns[name] = set_from_state(states[name], data, pt)
            if outdir is not None:
                outdir.save_sets([(method, ipc, states[name])], data)
        else:
            parts[name][units[i][2]][units[i][3]] = result
            if all(len(parts[name][net]) == n for net in nets):
                records[name] = _cell_record(method, ipc, syns[name], walls[name],
                                             {net: merge_evaluations([parts[name][net][j] for j in range(n)])
                                              for net in nets})
                write(records)
        bars[kind].update()

    run_queue(units, compute, collect, lambda i: first.get(units[i][1]) if units[i][0] == "evaluate" else None)
    for bar in bars.values():
        bar.close()


def _cell_record(method, ipc, syn, method_wall_s, evals):
    pt, png = set_files(cell_name(method, ipc))
    return {"method": method, "ipc": ipc, "file": pt, "png": png, "method_wall_s": method_wall_s, "eval": evals,
            "n_images": int(syn.images.shape[0]),
            "meta": {k: _plain(v) for k, v in syn.meta.items() if k != "train_index"}}


def _results(config, data, out, cells, records, world, prepared):
    order = [cell_name(m, k) for m, k in cells]
    return {"config": dataclasses.asdict(config), "data": data.record(), "command": config.command(out),
            "protocol": protocol_text(config.eval_models, config.eval_epochs, config.eval_optimizer,
                                      config.use_learned_lrs, config.eval_augment),
            "world_size": world, "prepare_wall_s": prepared,
            "cells": {name: records[name] for name in order if name in records}}
