"""``python -m torchopt_ext condense``: a grid of (method, ipc) cells on an image set, one results table."""
import argparse
import dataclasses
import sys

from torchopt_ext.condense.config import DATASETS, EVAL_OPTIMIZERS, HERDING_SPACES, CondenseConfig
from torchopt_ext.distill.config import DistillError

_D = CondenseConfig()

EPILOG = """--out DIR also holds manifest.json (size and sha256 of every file, rewritten after each one), and
each .pt carries a sha256 of its tensors. DIR/.lock is held while a run uses DIR: a second run there is
refused with the holder's pid, host and start time (from .lock.info); a killed run's lock is free again.
Every file is written to a temporary and renamed, so a crash leaves the old file or the new one; a new
grid that fails before any set was saved removes DIR. --resume reuses every cell whose .pt matches its
digest and, when results.json is the file the manifest records, its evaluation; it condenses or
evaluates again whatever is missing or damaged and says which cells. Under torchrun (gloo; e.g.
torchrun --nproc-per-node 4 -m torchopt_ext condense ...) the cells to condense and then the
(cell, evaluation net) trainings form one queue, each unit taken by the first free rank and run with its
own seeds, so the numbers are those of one process with the same --threads; rank 0 alone writes DIR."""


def _words(text):
    return [w for w in text.replace(",", " ").split() if w]


def _ints(text):
    try:
        return [int(w) for w in _words(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub):
    from torchopt_ext.condense.methods import load_methods
    from torchopt_ext.condense.nets import NETS
    methods = ", ".join(sorted(load_methods()))
    p = sub.add_parser(
        "condense", help="condense an image set with several methods and tabulate test accuracy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Dataset condensation on images (docs/CONDENSE.md). For every --method and --ipc (images per "
        "class) it builds the synthetic set, then trains --eval-models fresh nets of each --eval-nets on that set "
        "only and tests them on the real test part. Protocol: SGD lr 0.01, momentum 0.9, weight decay 5e-4, "
        "batch 256, --eval-epochs epochs with the lr x0.1 from half of them, cross-entropy against the set's "
        "(soft) labels, no augmentation unless --eval-augment; results are mean ± std over the nets. Outputs in --out: "
        "cells/<method>_ipc<k>.pt (the set; torch.load(weights_only=True)), cells/<method>_ipc<k>.png (its images "
        "per class), results.json (every number: per-net accuracies, wall times), results.md (rows methods with "
        "random first and the whole-data row last, columns ipc per evaluation net), config.json. "
        "Nothing is written when an option, the data or an image size is wrong.", epilog=EPILOG)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=_D.dataset, help="one of " + ", ".join(DATASETS) + ": digits is "
                   "scikit-learn's 8x8 digits (built in); the others read files from --data-root")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="folder with the files (no download): mnist / fashion_mnist: train-images-idx3-ubyte, "
                   "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally "
                   ".gz); cifar10: data_batch_1..5 and test_batch (or a cifar-10-batches-py folder)")
    g.add_argument("--test-fraction", type=float, default=_D.test_fraction,
                   help="digits only: the seeded stratified test share (the files' own split elsewhere)")
    g.add_argument("--zca", action="store_true", help="ZCA-whiten the standardised images (fitted on the training "
                   "part, eigenvalues + 0.1 x their mean)")
    g = p.add_argument_group("the grid")
    g.add_argument("--method", dest="methods", type=_words, default=",".join(_D.methods),
                   help=f"comma-separated methods: {methods}")
    g.add_argument("--ipc", dest="ipcs", type=_ints, default=",".join(str(k) for k in _D.ipcs),
                   help="comma-separated images per class")
    g.add_argument("--no-whole", dest="whole", action="store_false", default=argparse.SUPPRESS,
                   help="leave out the whole-training-data row (included by default)")
    g = p.add_argument_group("networks")
    g.add_argument("--net", default=_D.net, help="the net methods distil with: " + ", ".join(NETS))
    g.add_argument("--width", type=int, default=_D.width, help="channels of convnet / hidden units of mlp")
    g.add_argument("--depth", type=int, default=None,
                   help="conv blocks of convnet (default min(3, floor(log2(side)) - 1): 8x8 -> 2, 28/32 -> 3) "
                   "or hidden layers of mlp (default 2)")
    g.add_argument("--distill-nets", type=_words, default=None,
                   help="comma-separated nets to condense with at once (dc, dsa, dm draw each iteration's fresh net "
                   "among them; the multi-architecture remedy for transfer); default: --net")
    g.add_argument("--eval-nets", type=_words, default=None,
                   help="comma-separated nets to evaluate on (the cross-architecture table); default: --net")
    g = p.add_argument_group("evaluation protocol")
    g.add_argument("--eval-models", type=int, default=_D.eval_models, help="fresh nets per cell and evaluation net")
    g.add_argument("--eval-epochs", type=int, default=_D.eval_epochs, help="training epochs on the synthetic set")
    g.add_argument("--whole-epochs", type=int, default=None,
                   help="epochs for the whole-data row (default --eval-epochs); stated under the table")
    g.add_argument("--eval-optimizer", default=_D.eval_optimizer, choices=EVAL_OPTIMIZERS,
                   help="sgd: the protocol; implicit: ImplicitSGD with the Linear layers made implicit, same "
                   "settings; adaptive: AdaptiveLRSGD's five-probe lr from 0.01, no schedule")
    g.add_argument("--use-learned-lrs", action="store_true",
                   help="train on sets with learned step sizes (dd) by replaying their distilled steps instead")
    g.add_argument("--eval-augment", action="store_true",
                   help="augment every training batch of the evaluation nets by DSA (one family per batch from "
                   "color, crop, cutout, flip, scale, rotate; flip left out on digit data sets; parameters per image, "
                   "seeded per net)")
    g.add_argument("--seed", type=int, default=_D.seed,
                   help="seeds the split, every method (with its name and ipc) and the evaluation nets")
    g.add_argument("--dtype", default=_D.dtype, choices=("float32", "float64"))
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 can be faster on a shared machine)")
    g = p.add_argument_group("method options")
    g.add_argument("--herding-space", default=_D.herding_space, choices=HERDING_SPACES,
                   help="herding's feature space: features of a randomly initialised --net, or standardised pixels")
    _add_method_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="condense_out", metavar="DIR", help="output directory; must not exist "
                   "unless --resume")
    g.add_argument("--resume", action="store_true",
                   help="reuse the finished cells in --out (same options; --method, --ipc, --no-whole, --whole-epochs "
                   "may change); missing or damaged files are computed again, and the run says which")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=run)
    return p


def _typed(default, optional=False):
    """A parser for an option whose default is ``default``: bools take true/false; None (or any ``optional``
    field) takes none or a number."""
    def parse(text):
        low = text.strip().lower()
        if isinstance(default, bool):
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if (default is None or optional) and low == "none":
            return None
        kind = type(default) if default is not None else (int if low.lstrip("-").isdigit() else float)
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    return parse


def _field_comments(cls):
    """name -> the trailing comment of its line in the dataclass (and its bases): the option's meaning,
    written once beside its default."""
    import inspect
    import re
    out = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _add_method_options(p):
    """One flag --<method>-<name> per field of each method's options dataclass."""
    from torchopt_ext.condense.methods import OPTIONS
    for method, cls in sorted(OPTIONS.items()):
        g = p.add_argument_group(f"{method} options")
        meaning = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            g.add_argument(f"--{method}-{f.name.replace('_', '-')}", dest=f"opt:{method}_{f.name}",
                           type=_typed(default, "Optional" in str(f.type)), default=argparse.SUPPRESS, metavar="V",
                           help=f"{meaning.get(f.name, '')} (default: {default})".strip())


def config_from_args(args) -> CondenseConfig:
    names = {f.name for f in dataclasses.fields(CondenseConfig)}
    values = vars(args)
    options = {k[4:]: v for k, v in values.items() if k.startswith("opt:")}
    return CondenseConfig(**{k: v for k, v in values.items() if k in names}, options=options).validate()


def run(args):
    from torchopt_ext._distributed import process_group
    from torchopt_ext.distill.rundir import write_error
    try:
        config = config_from_args(args)
        from torchopt_ext.condense.grid import run_grid
        with process_group() as (rank, _):
            results = run_grid(config, args.out, resume=args.resume, progress=not args.no_progress)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        text = write_error(exc, args.out)
        if text is None:
            raise
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if rank == 0:
        from torchopt_ext.condense.report import results_markdown
        print(results_markdown(results))
    return 0
