"""The run configuration: one dataclass, validated, with an exact JSON round trip."""
import dataclasses
import json
from dataclasses import dataclass, field
from typing import List, Optional

DATASETS = ("moons", "circles", "blobs", "iris", "wine", "breast_cancer", "digits")
HYPERGRADS = ("unroll", "implicit")
EVAL_OPTIMIZERS = ("sgd", "implicit", "adaptive")
ARCHS = (1, 2, 4)


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
    strategy2_decay: float = 0.9   # DESIGN.md §4 (the paper's text says 0.98)
    baseline_steps: int = 500      # full-batch Adam steps for the "original" row
    # output
    dtype: str = "float32"
    plots: bool = True
    plot_steps: Optional[List[int]] = None

    @property
    def n_inner(self) -> int:
        return self.steps * self.epochs

    def validate(self) -> "DistillConfig":
        def need(ok, arg, expected, got):
            if not ok:
                raise DistillError(f"{arg}: expected {expected}, got {got!r}")
        if self.csv is None:
            need(self.dataset in DATASETS, "--dataset", f"one of {', '.join(DATASETS)} (or --csv)", self.dataset)
        else:
            need(self.target is not None, "--target", "the name of the label column when --csv is given", None)
        for name in ("steps", "epochs", "per_class", "hidden", "models", "outer_epochs", "batch_size",
                     "restarts", "eval_models", "neumann_terms", "baseline_steps"):
            need(int(getattr(self, name)) >= 1, "--" + name.replace("_", "-"), "an integer >= 1", getattr(self, name))
        need(0 < self.test_fraction < 1, "--test-fraction", "a number in (0, 1)", self.test_fraction)
        need(len(self.arch) >= 1 and all(a in ARCHS for a in self.arch), "--arch", f"layer counts from {ARCHS}", self.arch)
        if self.eval_arch is not None:
            need(all(a in ARCHS for a in self.eval_arch), "--eval-arch", f"layer counts from {ARCHS}", self.eval_arch)
        need(all(s in (0, 1, 2, 3) for s in self.strategies), "--strategy", "a list from 0,1,2,3", self.strategies)
        need(self.hypergrad in HYPERGRADS, "--hypergrad", " or ".join(HYPERGRADS), self.hypergrad)
        need(self.eval_optimizer in EVAL_OPTIMIZERS, "--eval-optimizer", "|".join(EVAL_OPTIMIZERS), self.eval_optimizer)
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "--checkpoint-every", "an integer >= 1",
             self.checkpoint_every)
        need(self.outer_lr > 0, "--outer-lr", "a positive number", self.outer_lr)
        need(self.dtype in ("float32", "float64"), "--dtype", "float32 or float64", self.dtype)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DistillConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DistillError(f"config: unknown keys {unknown}")
        return cls(**raw)
