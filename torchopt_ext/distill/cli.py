"""``python -m torchopt_ext distill``: distil a table, evaluate, write the set, results.md and plots."""
import argparse
import copy
import dataclasses
import os
import sys
import time

from torchopt_ext._distributed import on_rank0, process_group
from torchopt_ext.distill.config import DATASETS, PRESENTATION_FIELDS, DistillConfig, DistillError

_D = DistillConfig()
_FIELDS = [f.name for f in dataclasses.fields(DistillConfig)]

EPILOG = """--out DIR holds: config.json (the exact configuration), split.json (the seeded split and
standardisation), checkpoint.pt (the state of the running batch of restarts, written every outer epoch
and on Ctrl-C), distilled_r{r}.pt/.csv/_lrs.csv (each finished restart), distilled.pt/.csv/_lrs.csv
(restart 0's set), results.md and the PNG plots, and manifest.json (size and sha256 of every file above
but the checkpoint, written last, after the run starts, after each restart and at the end). The .pt
files carry a sha256 of their tensors. .lock is held while a run uses DIR (a second run there is
refused; a killed run's lock is free again), .lock.info names its holder. Every file is written to a
temporary and renamed, so a crash leaves the old file or the new one. --resume checks DIR against
manifest.json, rewrites whatever is missing or damaged and says what it rewrote."""


class _Default:
    """A parser default, told apart from the same value given on the command line."""

    def __init__(self, value):
        self.value = value

    def __str__(self):  # what ArgumentDefaultsHelpFormatter shows
        return str(self.value)


def _ints(text):
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub):
    p = sub.add_parser(
        "distill", help="learn a small synthetic training set and its learning rates",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Dataset distillation (the tabular paper's algorithm, docs/DISTILL.md): learn s x epochs "
        "inner steps of synthetic points (per-class per step), optionally soft labels, and one learning "
        "rate per inner step, so that m internal models trained on them from random initialisations do "
        "well on the real data. Then train fresh models on the result, write results.md (like the paper's "
        "Table 1), the distilled set (.pt and .csv), plots and the exact configuration to --out. "
        "Restarts run together in batches (--batch-restarts). Under torchrun (gloo) the internal models are "
        "spread over ranks.", epilog=EPILOG)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=_D.dataset, choices=DATASETS,
                   help="built-in data: moons is the paper's two-moons problem (1500 points); sklearn tables "
                   "iris, wine, breast_cancer, digits")
    g.add_argument("--csv", metavar="PATH", help="your own table (header row, numeric features); overrides "
                   "--dataset. Features are standardised with training-part statistics")
    g.add_argument("--target", metavar="COL", help="label column of --csv (any values; each distinct value "
                   "is a class)")
    g.add_argument("--n-samples", type=int, default=_D.n_samples, help="points of moons/circles/blobs")
    g.add_argument("--noise", type=float, default=_D.noise, help="noise of moons/circles")
    g.add_argument("--test-fraction", type=float, default=_D.test_fraction,
                   help="test part (1/3: the paper's 2:1 split); the split follows --seed and is written to "
                   "split.json")
    g = p.add_argument_group("what is learned")
    g.add_argument("--steps", type=int, default=_D.steps, help="s: synthetic batches per inner epoch")
    g.add_argument("--epochs", type=int, default=_D.epochs, help="inner epochs; n = steps x epochs inner steps")
    g.add_argument("--per-class", type=int, default=_D.per_class, help="k: synthetic points per class per step")
    g.add_argument("--no-learn-lrs", dest="learn_lrs", action="store_false",
                   help="keep the per-step learning rates fixed at --lr-init (learned by default)")
    g.add_argument("--lr-init", type=float, default=_D.lr_init, help="initial value of every learned rate")
    g.add_argument("--soft-labels", action="store_true",
                   help="learn the labels too (soft labels, the survey's SLDD), as softmax of learned logits")
    g = p.add_argument_group("internal models")
    g.add_argument("--arch", type=_ints, default=_D.arch,
                   help="layers of the fully connected relu nets (1, 2 or 4); several, e.g. 1,2,4, cycle over "
                   "the internal models (the paper's Table 2)")
    g.add_argument("--hidden", type=int, default=_D.hidden, help="hidden width")
    g.add_argument("--models", type=int, default=_D.models, help="m: internal models per outer step")
    g.add_argument("--fixed-init", action="store_true",
                   help="one fixed Xavier initialisation per restart instead of a fresh draw per outer step")
    g = p.add_argument_group("outer loop")
    g.add_argument("--outer-epochs", type=int, default=_D.outer_epochs, help="passes over the real training part")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="real points per outer step")
    g.add_argument("--outer-lr", type=float, default=_D.outer_lr, help="Adam step on points, labels, rates")
    g.add_argument("--restarts", type=int, default=_D.restarts,
                   help="independent distillations (new seeds); results.md gives mean +- std over them")
    g.add_argument("--batch-restarts", type=int, default=None, metavar="N",
                   help="restarts distilled together, N at a time (default: all): their inner unrolls are stacked "
                   "into one, which is several times faster than one after another. Each restart keeps its own "
                   "random stream, so a set equals the one distilled alone up to floating-point rounding; memory "
                   "grows with N")
    g.add_argument("--seed", type=int, default=_D.seed, help="seeds data, split, initialisations")
    g.add_argument("--dtype", default=_D.dtype, choices=("float32", "float64"))
    g = p.add_argument_group("hypergradient")
    g.add_argument("--hypergrad", default=_D.hypergrad, choices=("unroll", "implicit"),
                   help="unroll: the reverse loop of the paper's Algorithm 3 (Hessian-vector products through "
                   "each inner step, exact); implicit: implicit differentiation at the end of inner training, "
                   "H^-1 by a Neumann series (for long inner training; rates are then not learned)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="keep every K-th inner state and recompute the rest in the reverse loop: memory grows "
                   "with n/K + K instead of n, same hypergradient, about 1.5x the time")
    g.add_argument("--neumann-terms", type=int, default=_D.neumann_terms, help="K terms of the Neumann series")
    g.add_argument("--neumann-alpha", type=float, default=None,
                   help="alpha of the Neumann series (default: the mean learned rate)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-models", type=int, default=_D.eval_models,
                   help="fresh initialisations per test architecture and restart")
    g.add_argument("--eval-arch", type=_ints, default=None, help="test architectures (default 1,2,4)")
    g.add_argument("--strategy", dest="strategies", type=_ints, default=_D.strategies,
                   help="0: the distilled steps as learned; 1: ignore learned rates (0.3, x1.1 per epoch for 10 "
                   "epochs then x0.95, 50 epochs); 2: repeat all distilled epochs 10 times, rates decayed by "
                   "--strategy2-decay per repeat; 3: then repeat only the last epoch 45 times, x0.98 cumulatively")
    g.add_argument("--strategy2-decay", type=float, default=_D.strategy2_decay,
                   help="rate factor per repeat in strategy 2 (the paper's text: 0.98)")
    g.add_argument("--eval-optimizer", default=_D.eval_optimizer, choices=("sgd", "implicit", "adaptive"),
                   help="train evaluation models with plain SGD, or this package's ImplicitSGD / AdaptiveLRSGD")
    g.add_argument("--baseline-steps", type=int, default=_D.baseline_steps,
                   help="full-batch Adam steps for the 'original' (whole data) row")
    g.add_argument("--no-eval", action="store_true", help="only distil; skip evaluation, results.md and plots "
                   "(this invocation only: a later --resume without it evaluates)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="distill_out", metavar="DIR",
                   help="output directory; must not exist unless --resume, and its parent must exist")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint with its recorded configuration, "
                   "rewriting any output that is missing or differs from manifest.json. Options that change "
                   "the result must be left out or equal the recorded ones (else the resume is refused); "
                   "--no-eval, --no-plots, --plot-steps and --no-progress apply to this invocation")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    g.add_argument("--plot-steps", type=_ints, default=None,
                   help="synthetic steps (0-based, below --steps) to draw (default: 1st, 14th, 27th and last, "
                   "like Fig. 7)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    for action in p._actions:  # argparse offers no other way to see which options were given
        if action.default is not argparse.SUPPRESS:
            action.default = _Default(action.default)
    p.set_defaults(func=run, option_names={a.dest: a.option_strings[0] for a in p._actions if a.option_strings})
    return p


def config_from_values(values):
    return DistillConfig(**{k: values[k] for k in _FIELDS}).validate()


def _unwrap(args):
    """(values, names given on the command line) of a parsed namespace."""
    values, given = {}, set()
    for key, value in vars(args).items():
        if isinstance(value, _Default):
            values[key] = copy.deepcopy(value.value)
        else:
            values[key] = value
            given.add(key)
    return values, given


def run(args):
    values, given = _unwrap(args)
    try:
        return _run(values, given)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from torchopt_ext.distill.rundir import write_error
        text = write_error(exc, values.get("out") or "")
        if text is None:
            raise
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _show(value):
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "default" if value is None else str(value)


def _resumed_config(out, values, given):
    """The recorded configuration; options given now that would change the result are refused."""
    from torchopt_ext.distill.outputs import recorded_config
    recorded = recorded_config(out)
    diffs = []
    for name in _FIELDS:
        if name in PRESENTATION_FIELDS or name not in given or values[name] == getattr(recorded, name):
            continue
        opt = values["option_names"].get(name, "--" + name.replace("_", "-"))
        if isinstance(values[name], bool):  # a flag: its presence is the value
            diffs.append(f"{opt} (recorded: {name} = {str(getattr(recorded, name)).lower()})")
        else:
            diffs.append(f"{opt} {_show(values[name])} (recorded: {_show(getattr(recorded, name))})")
    if diffs:
        raise DistillError(f"--resume: {', '.join(diffs)} would change the result of the run recorded in "
                           f"{os.path.join(out, 'config.json')}; leave them out to continue that run, or choose a "
                           "new --out for a new one")
    return dataclasses.replace(recorded, **{k: values[k] for k in PRESENTATION_FIELDS}).validate()


def _run(values, given):
    from torchopt_ext.distill import rundir

    out, resume = values["out"], values["resume"]
    if resume:
        rundir.check_resumable(out)
    else:
        config = config_from_values(values)  # every option checked before any directory is made
        rundir.check_new(out)
    with process_group() as (rank, world):
        lock = None  # rank 0's hold on --out
        try:
            if resume:
                lock = on_rank0(lambda: rundir.open_existing(out))
                config = _resumed_config(out, values, given)
            import torch
            from torchopt_ext.distill.data import load_split
            split = load_split(config, getattr(torch, config.dtype))
            if not resume:
                lock = on_rank0(lambda: rundir.create(out))
            return _work(config, split, values, rank, world)
        except BaseException as exc:
            if not resume and lock is not None and rundir.remove_if_disposable(lock):
                lock = None
                note = rundir.removed_note(out)
                if isinstance(exc, DistillError):
                    raise DistillError(f"{exc}; {note}") from None
                print(note, file=sys.stderr)
            raise
        finally:
            if lock is not None:
                lock.release()


def _work(config, split, values, rank, world):
    from torchopt_ext.distill.distill import distill_restarts
    from torchopt_ext.distill.outputs import Outputs

    out, resume = values["out"], values["resume"]
    outputs = Outputs(out, resume, config, split) if rank == 0 else None
    on_rank0(lambda: outputs.start())
    t0 = time.perf_counter()
    sets = distill_restarts(config, out, progress=not values["no_progress"], resume=resume, split=split,
                            on_restart=outputs.restart_done if outputs else None)
    t_distill = time.perf_counter() - t0
    if rank != 0:
        return 0
    outputs.after_restarts(sets)
    print(f"distilled {len(sets)} restart(s) in {t_distill:.1f} s -> {out}/distilled.pt, distilled.csv")
    if not values["no_eval"] and outputs.evaluation_due(config.plots):
        from torchopt_ext.distill.evaluate import evaluate, results_markdown
        t1 = time.perf_counter()
        result = evaluate(sets, split, config)
        text = results_markdown(result, config, wall_s=time.perf_counter() - t0)
        outputs.write_results(text)
        print(text)
        if config.plots:
            from torchopt_ext.distill.plots import all_plots
            all_plots(sets, split, result, result["trained"], out, config.plot_steps)
        outputs.evaluated(config.plots)
        print(f"evaluation {time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
    outputs.summary()
    return 0
