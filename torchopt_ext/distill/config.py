"""The run configuration: one dataclass, validated, with an exact JSON round trip."""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import List, Optional

DATASETS = ("moons", "circles", "blobs", "iris", "wine", "breast_cancer", "digits")
HYPERGRADS = ("unroll", "implicit")
EVAL_OPTIMIZERS = ("sgd", "implicit", "adaptive")
ARCHS = (1, 2, 4)
SEED_MAX = 2 ** 32 - 1  # numpy's and sklearn's seeds are 32-bit
FLOAT_MAX = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}
ADAM_FIRST_STEP = 10  # Adam's first step is lr / (1 - beta1) with beta1 = 0.9
# fields that change only what is drawn, not what is learned or measured: --resume may change them
PRESENTATION_FIELDS = ("plots", "plot_steps")


class DistillError(ValueError):
    """A user-facing error: bad input, bad checkpoint, refused overwrite, diverged run."""


@dataclass
class DistillConfig:
    # data
    dataset: str = "moons"
    csv: Optional[str] = None
    target: Optional[str] = None
    n_samples: int = 1500          # built-in synthetic datasets only
    noise: float = 0.1             # moons / circles
    test_fraction: float = 1 / 3   # the paper's 2:1 split
    # what is learned
    steps: int = 40                # s: synthetic batches per internal epoch
    epochs: int = 5                # internal epochs; n = steps * epochs inner steps
    per_class: int = 4             # k: synthetic objects per class per step
    learn_lrs: bool = True
    soft_labels: bool = False
    lr_init: float = 0.1
    # internal models
    arch: List[int] = field(default_factory=lambda: [2])  # layers of each internal model, cycled
    hidden: int = 10
    models: int = 3                # m internal models per outer step
    fixed_init: bool = False       # one theta_0 per restart instead of a fresh draw per outer step
    # outer loop
    outer_epochs: int = 50
    batch_size: int = 64
    outer_lr: float = 0.01
    restarts: int = 1
    batch_restarts: Optional[int] = None  # restarts distilled together; default all of them
    seed: int = 0
    # hypergradient
    hypergrad: str = "unroll"
    checkpoint_every: Optional[int] = None
    neumann_terms: int = 20
    neumann_alpha: Optional[float] = None  # default: the mean learned rate
    # evaluation
    eval_models: int = 5
    eval_arch: Optional[List[int]] = None  # default: 1, 2, 4 layers
    strategies: List[int] = field(default_factory=lambda: [0, 1, 2, 3])
    eval_optimizer: str = "sgd"
    strategy2_decay: float = 0.9   # docs/design.md#dataset-distillation (the paper's text says 0.98)
    baseline_steps: int = 500      # full-batch Adam steps for the "original" row
    # output
    dtype: str = "float32"
    plots: bool = True
    plot_steps: Optional[List[int]] = None

    @property
    def n_inner(self) -> int:
        return self.steps * self.epochs

    def validate(self) -> "DistillConfig":
        """Types and ranges of every field; raises DistillError naming the option and what was expected."""
        _check_types(self)

        def need(ok, arg, expected, got):
            if not ok:
                raise DistillError(f"{arg}: expected {expected}, got {got!r}")

        def positive(arg, value):
            need(math.isfinite(value) and value > 0, arg, "a finite number > 0", value)

        if self.csv is None:
            need(self.dataset in DATASETS, "--dataset", f"one of {', '.join(DATASETS)} (or --csv)", self.dataset)
        else:
            need(self.target is not None, "--target", "the name of the label column when --csv is given", None)
        for name in ("steps", "epochs", "per_class", "hidden", "models", "outer_epochs", "batch_size",
                     "restarts", "eval_models", "neumann_terms", "baseline_steps", "n_samples"):
            need(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "an integer >= 1", getattr(self, name))
        need(0 < self.test_fraction < 1, "--test-fraction", "a number in (0, 1)", self.test_fraction)
        need(math.isfinite(self.noise) and self.noise >= 0, "--noise", "a finite number >= 0", self.noise)
        need(0 <= self.seed <= SEED_MAX, "--seed", f"an integer in [0, {SEED_MAX}]", self.seed)
        need(self.dtype in ("float32", "float64"), "--dtype", "float32 or float64", self.dtype)
        positive("--lr-init", self.lr_init)
        positive("--outer-lr", self.outer_lr)
        top = FLOAT_MAX[self.dtype]
        need(self.lr_init <= top, "--lr-init", f"a rate that fits {self.dtype} (at most {top:.3g})", self.lr_init)
        need(self.outer_lr * ADAM_FIRST_STEP <= top, "--outer-lr",
             f"a rate whose Adam step fits {self.dtype} (at most {top / ADAM_FIRST_STEP:.3g})", self.outer_lr)
        if self.neumann_alpha is not None:
            positive("--neumann-alpha", self.neumann_alpha)
        need(0 < self.strategy2_decay <= 1, "--strategy2-decay", "a number in (0, 1]", self.strategy2_decay)
        need(len(self.arch) >= 1 and all(a in ARCHS for a in self.arch), "--arch",
             f"a non-empty list of layer counts from {ARCHS}", self.arch)
        if self.eval_arch is not None:
            need(len(self.eval_arch) >= 1 and all(a in ARCHS for a in self.eval_arch), "--eval-arch",
                 f"a non-empty list of layer counts from {ARCHS}", self.eval_arch)
        need(len(self.strategies) >= 1 and all(s in (0, 1, 2, 3) for s in self.strategies), "--strategy",
             "a non-empty list from 0,1,2,3", self.strategies)
        if self.plot_steps is not None:
            need(len(self.plot_steps) >= 1 and all(0 <= k < self.steps for k in self.plot_steps), "--plot-steps",
                 f"a non-empty list of steps in [0, {self.steps}) (0-based, below --steps)", self.plot_steps)
        need(self.hypergrad in HYPERGRADS, "--hypergrad", " or ".join(HYPERGRADS), self.hypergrad)
        need(self.eval_optimizer in EVAL_OPTIMIZERS, "--eval-optimizer", "|".join(EVAL_OPTIMIZERS), self.eval_optimizer)
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "--checkpoint-every", "an integer >= 1",
             self.checkpoint_every)
        need(self.batch_restarts is None or self.batch_restarts >= 1, "--batch-restarts", "an integer >= 1",
             self.batch_restarts)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DistillConfig":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise DistillError(f"config: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DistillError(f"config: unknown keys {unknown}")
        return cls(**raw)


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value, tp) -> bool:
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:  # an integer is a number too (JSON writes 1.0 as 1 in hand-edited files)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _kind(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join("null" if a is type(None) else _kind(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_kind(typing.get_args(tp)[0])}s".replace("an ", "", 1)
    return _KINDS[tp]


def _check_types(config) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, hints[f.name]):
            raise DistillError(f"{f.name}: expected {_kind(hints[f.name])}, got {value!r}")
