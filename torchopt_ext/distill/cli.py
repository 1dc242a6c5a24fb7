"""``python -m torchopt_ext distill``: distil a table, evaluate, write the set, results.md and plots."""
import argparse
import json
import os
import sys
import time

from torchopt_ext._distributed import leave_group
from torchopt_ext.distill.config import DATASETS, DistillConfig, DistillError

_D = DistillConfig()


def _ints(text):
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub):
    p = sub.add_parser(
        "distill", help="learn a small synthetic training set and its learning rates",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Dataset distillation (the tabular paper's algorithm, DESIGN.md §4): learn s x epochs "
        "inner steps of synthetic points (per-class per step), optionally soft labels, and one learning "
        "rate per inner step, so that m internal models trained on them from random initialisations do "
        "well on the real data. Then train fresh models on the result, write results.md (like the paper's "
        "Table 1), the distilled set (.pt and .csv), plots and the exact configuration to --out. "
        "Under torchrun (gloo) the internal models are spread over ranks.")
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
                   help="rate factor per repeat in strategy 2 (DESIGN.md: 0.9; the paper's text: 0.98)")
    g.add_argument("--eval-optimizer", default=_D.eval_optimizer, choices=("sgd", "implicit", "adaptive"),
                   help="train evaluation models with plain SGD, or this package's ImplicitSGD / AdaptiveLRSGD")
    g.add_argument("--baseline-steps", type=int, default=_D.baseline_steps,
                   help="full-batch Adam steps for the 'original' (whole data) row")
    g.add_argument("--no-eval", action="store_true", help="only distil; skip evaluation, results.md and plots")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="distill_out", metavar="DIR",
                   help="output directory; must not exist unless --resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its saved configuration")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    g.add_argument("--plot-steps", type=_ints, default=None,
                   help="synthetic steps (0-based) to draw (default: 1st, 14th, 27th and last, like Fig. 7)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=run)
    return p


def config_from_args(args):
    fields = {f for f in DistillConfig.__dataclass_fields__}
    return DistillConfig(**{k: v for k, v in vars(args).items() if k in fields}).validate()


def run(args):
    try:
        return _run(args)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        _close_distributed()


_owns_group = False  # whether this CLI opened the process group (under torchrun), and so must close it


def _init_distributed():
    global _owns_group
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        _owns_group = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _close_distributed():
    global _owns_group
    if _owns_group:
        _owns_group = False
        leave_group()


def _run(args):
    from torchopt_ext.distill import io
    from torchopt_ext.distill.data import load_split
    from torchopt_ext.distill.distill import distill_restarts

    out = args.out
    rank, world = _init_distributed()
    if args.resume:
        if not os.path.isdir(out) or not os.path.exists(os.path.join(out, "config.json")):
            raise DistillError(f"--resume: {out} is not a run directory (no config.json); expected the --out of "
                               "an earlier run")
        config = io.load_config(os.path.join(out, "config.json")).validate()
        print(f"resuming {out} with its saved configuration (other options are ignored)", file=sys.stderr)
    else:
        config = config_from_args(args)
        if os.path.exists(out):
            raise DistillError(f"--out: {out} already exists; expected a new directory (nothing was "
                               "overwritten). Pass --resume to continue that run, or choose another --out")
    if world > 1:  # every rank has checked --out before rank 0 creates it
        import torch.distributed as dist
        dist.barrier()
    import torch
    split = load_split(config, getattr(torch, config.dtype))
    if rank == 0 and not args.resume:
        os.makedirs(out)
        io.save_config(config, os.path.join(out, "config.json"))
        with open(os.path.join(out, "split.json"), "w") as fh:
            json.dump(split.record(), fh)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    t0 = time.perf_counter()
    sets = distill_restarts(config, out, progress=not args.no_progress, resume=args.resume, split=split)
    t_distill = time.perf_counter() - t0
    if rank != 0:
        return 0
    io.save_distilled(sets[0], os.path.join(out, "distilled.pt"))
    print(f"distilled {len(sets)} restart(s) in {t_distill:.1f} s -> {out}/distilled.pt, distilled.csv")
    if args.no_eval:
        return 0
    from torchopt_ext.distill.evaluate import evaluate, results_markdown
    t1 = time.perf_counter()
    result = evaluate(sets, split, config)
    text = results_markdown(result, config, wall_s=time.perf_counter() - t0)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text)
    print(text)
    if config.plots:
        from torchopt_ext.distill.plots import all_plots
        all_plots(sets, split, result, result["trained"], out, config.plot_steps)
    print(f"evaluation {time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
    return 0
