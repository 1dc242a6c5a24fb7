"""What a run writes into --out, each file once, and what ``--resume`` repairs.

A new run writes everything. ``--resume`` first compares the directory with ``manifest.json`` and
rewrites whatever is missing, empty or different and can be regenerated: split.json from the
configuration, a finished restart's CSV files from its .pt, distilled.* from restart 0, results.md
and the plots by evaluating again; a damaged ``distilled_r{r}.pt`` makes restart r run again.
config.json is the record itself: a changed one is refused. Used on rank 0 only.
"""
import hashlib
import json
import os
import sys

from torchopt_ext._atomic import atomic_open
from torchopt_ext.distill import io
from torchopt_ext.distill.config import DistillError
from torchopt_ext.distill.manifest import NAME as MANIFEST, Manifest
from torchopt_ext.distill.rundir import CONFIG, remove_temporaries

SPLIT = "split.json"
RESULTS = "results.md"


def restart_stem(r: int) -> str:
    return f"distilled_r{r}"


def recorded_config(out: str):
    """The run's configuration, validated, refused when config.json is not the file the run wrote."""
    path = os.path.join(out, CONFIG)
    config = io.load_config(path)
    manifest, _ = Manifest.load(out)
    if CONFIG in manifest.files and manifest.problem(CONFIG) is not None:
        raise DistillError(f"--resume: {path} was changed after the run wrote it (its sha256 differs from "
                           f"{MANIFEST}); restore it, or start a new --out for the new configuration")
    return config


class Outputs:
    def __init__(self, out, resume, config, split):
        self.out, self.resume, self.config, self.split = out, resume, config, split
        if resume:
            self.manifest, note = Manifest.load(out)
            if note:
                self._say(note)
        else:
            self.manifest = Manifest(out)
        self.rewritten = []   # files this --resume rewrote, with why
        self.computed = set()  # restarts distilled by this invocation

    def _path(self, name):
        return os.path.join(self.out, name)

    def _say(self, text):
        print(f"resume: {text}", file=sys.stderr)

    def _rewrite(self, name, problem, how):
        """Notes a damaged file before it is regenerated; a new run's writes are not notes."""
        if self.resume and problem is not None:
            self._say(f"{name} is {problem}" if problem in ("missing", "empty") else f"{name}: {problem}")
            self.rewritten.append(f"{name} ({how})")

    def start(self):
        """Before distillation: config.json and split.json in place, damaged restart files removed."""
        split_text = io.json_text(self.split.record())
        if not self.resume:
            io.save_config(self.config, self._path(CONFIG))
            self._write(SPLIT, split_text)
            self.manifest.record(CONFIG, SPLIT)
            self.manifest.save()
            return
        for name in remove_temporaries(self.out):
            self._say(f"removed {name}, the temporary file of a write that never finished")
        self._check_split(split_text)
        for r in range(self.config.restarts):
            self._check_restart(r)
        self.manifest.record(CONFIG)
        self.manifest.save()

    def _write(self, name, text):
        with atomic_open(self._path(name), "w", encoding="utf-8") as fh:
            fh.write(text)

    def _check_split(self, text):
        """split.json must describe the data the run is given now; rewritten when damaged."""
        rec = self.manifest.files.get(SPLIT)
        if rec is not None:
            same = hashlib.sha256(text.encode()).hexdigest() == rec["sha256"]
        else:
            try:
                with open(self._path(SPLIT), encoding="utf-8") as fh:
                    same = json.load(fh) == json.loads(text)
            except (OSError, ValueError):
                same = True  # missing or damaged: nothing to compare with
        if not same:
            source = f"--csv {self.config.csv}" if self.config.csv else f"--dataset {self.config.dataset}"
            raise DistillError(f"{source}: the data differ from those the run in {self.out} started with "
                               f"({SPLIT} records another split or standardisation); restore the data, or start "
                               "a new --out")
        problem = self.manifest.problem(SPLIT)
        if problem is not None:
            self._rewrite(SPLIT, problem, "from the configuration")
            self._write(SPLIT, text)
            self.manifest.record(SPLIT)

    def _check_restart(self, r):
        """Removes a finished restart's .pt when it is damaged, so that the restart runs again."""
        name = restart_stem(r) + ".pt"
        problem = self.manifest.problem(name)
        if problem == "missing":
            if name in self.manifest.files:
                self._rewrite(name, problem, f"restart {r} run again")
            return
        if problem is None or problem.startswith("not recorded"):
            try:  # written atomically: complete, so its own digest decides
                io.load_distilled(self._path(name))
                return
            except DistillError as exc:
                problem = str(exc)
        self._rewrite(name, problem, f"restart {r} run again")
        os.unlink(self._path(name))
        self.manifest.forget(*io.distilled_names(restart_stem(r)))

    def restart_done(self, r):
        """After restart r was distilled and written: its files go into the manifest."""
        self.computed.add(r)
        self.manifest.record(*io.distilled_names(restart_stem(r)))
        self.manifest.save()

    def after_restarts(self, sets):
        """CSV files of reused restarts and distilled.* (restart 0's set), where missing or damaged."""
        for r, ds in enumerate(sets):
            if r in self.computed:
                continue
            names = io.distilled_names(restart_stem(r))
            problems = [(n, self.manifest.problem(n)) for n in names[1:]]
            if any(p for _, p in problems):
                for n, p in problems:
                    self._rewrite(n, p, f"from {names[0]}")
                io.save_distilled_csv(ds, self._path(restart_stem(r)))
            self.manifest.record(*names)
        names = io.distilled_names("distilled")
        problems = [(n, self.manifest.problem(n)) for n in names]
        if 0 in self.computed or any(p for _, p in problems):
            if 0 not in self.computed:
                for n, p in problems:
                    self._rewrite(n, p, f"from {restart_stem(0)}.pt")
            io.save_distilled(sets[0], self._path("distilled.pt"))
        self.manifest.record(*names)
        self.manifest.save(complete=True)

    def evaluation_names(self, plots: bool):
        from torchopt_ext.distill.plots import file_names
        return [RESULTS] + (file_names(self.split.n_features) if plots else [])

    def evaluation_due(self, plots: bool) -> bool:
        """Whether results.md (and the plots) must be written: new sets, or a file missing or damaged."""
        if self.computed:
            return True
        problems = [(n, self.manifest.problem(n)) for n in self.evaluation_names(plots)]
        for n, p in problems:
            self._rewrite(n, p, "by evaluating again")
        return any(p for _, p in problems)

    def write_results(self, text):
        self._write(RESULTS, text)

    def evaluated(self, plots: bool):
        self.manifest.record(*self.evaluation_names(plots))
        self.manifest.save(complete=True)

    def summary(self):
        if not self.resume:
            return
        if self.rewritten:
            self._say("rewrote " + ", ".join(self.rewritten))
        elif not self.computed:
            self._say(f"every output matches {MANIFEST}; nothing was rewritten")
