"""``run_grid``: every (method, ipc) cell condensed, saved, drawn and evaluated; results.json and results.md.

Layout of ``out`` (condense/outputs.py keeps it): config.json, cells/<method>_ipc<k>.pt (the SyntheticSet and
a digest of its tensors, loadable with ``torch.load(weights_only=True)``), cells/<method>_ipc<k>.png,
results.json (every number), results.md (the table), manifest.json (size and sha256 of each of them); .lock
while a run uses it. The whole-data row is the cell ``whole`` (its .pt keeps only the metadata).

The grid runs in two passes, each dealt round-robin over the ranks of a torchrun (condense/ranks.py): first
the cells still to condense, then one unit per (cell, evaluation net, net index j). Rank 0 alone writes: the
sets after each round of the first pass, results.json and results.md whenever a cell's evaluation is complete.
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
from torchopt_ext.condense.ranks import in_rounds
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
    todo.sort(key=lambda c: (c[1] is None, c[1] or 0))   # ipc-major: a round's cells cost alike, ranks idle less
    prepared = {}
    for method in dict.fromkeys(m for m, _ in todo):
        if method in PREPARE:
            t0 = time.perf_counter()
            PREPARE[method](data, config, progress)
            prepared[method] = time.perf_counter() - t0
    _condense_pass(config, data, methods, todo, outdir, states, walls, progress)
    syns = {name: set_from_state(state, data, set_files(name)[0]) for name, state in states.items()}

    def write(records, complete=False):
        results = _results(config, data, out, cells, records, world, prepared)
        on_rank0(lambda: outdir.write_results(results, complete))
        return results
    _evaluate_pass(config, data, [c for c in cells if cell_name(*c) not in records], syns, walls, records, write,
                   progress)
    return write(records, complete=True)


def _condense_pass(config, data, methods, todo, outdir, states, walls, progress):
    """The sets of the cells in ``todo``, dealt over the ranks, into ``states`` and ``walls`` (every rank) and
    saved by rank 0 after each round."""
    bar = tqdm(total=len(todo), disable=not progress, desc="condense")
    for group, got in in_rounds(todo, lambda c: _condense_cell(config, data, methods, c, progress)):
        for (method, ipc), (state, wall) in zip(group, got):
            states[cell_name(method, ipc)], walls[cell_name(method, ipc)] = state, wall
        on_rank0(lambda: outdir.save_sets([(m, k, states[cell_name(m, k)]) for m, k in group], data))
        bar.update(len(group))
    bar.close()


def _evaluate_pass(config, data, cells, syns, walls, records, write, progress):
    """Every (cell, evaluation net, j) training of ``cells``, dealt over the ranks; a cell's record goes into
    ``records`` and ``write(records)`` is called once all its nets are in."""
    nets, n = config.test_nets, config.eval_models
    units = [(cell_name(m, k), net, j) for m, k in cells for net in nets for j in range(n)]
    epochs = {cell_name(m, k): config.cell_epochs(m) for m, k in cells}

    def evaluate(unit):
        name, net, j = unit
        return evaluate_detailed(syns[name], data, net, n, epochs[name], config.seed, config.eval_optimizer,
                                 config.use_learned_lrs, progress, config.width, config.depth, models=[j],
                                 augment=config.eval_augment)

    parts = {cell_name(m, k): {net: {} for net in nets} for m, k in cells}   # cell -> net -> j -> record
    bar = tqdm(total=len(units), disable=not progress, desc="evaluate")
    for group, got in in_rounds(units, evaluate):
        for (name, net, j), record in zip(group, got):
            parts[name][net][j] = record
        finished = [(m, k) for m, k in cells if cell_name(m, k) not in records
                    and all(len(parts[cell_name(m, k)][net]) == n for net in nets)]
        for method, ipc in finished:
            name = cell_name(method, ipc)
            records[name] = _cell_record(method, ipc, syns[name], walls[name],
                                         {net: merge_evaluations([parts[name][net][j] for j in range(n)])
                                          for net in nets})
        if finished:
            write(records)
        bar.update(len(group))
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
