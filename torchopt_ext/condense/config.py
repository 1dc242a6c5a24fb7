"""The grid's configuration: one dataclass, range-checked before anything is written, with a JSON round trip."""
import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import List, Optional

from torchopt_ext.distill.config import DistillError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
EVAL_OPTIMIZERS = ("sgd", "implicit", "adaptive")
HERDING_SPACES = ("features", "pixels")
MULTI_NET_METHODS = ("dc", "dsa", "dm")   # methods that draw a fresh net per iteration
NETLESS_METHODS = ("random", "whole")


class CondenseError(DistillError):
    """A user-facing error of the image pipeline: bad option, missing or corrupt data, refused overwrite."""


def derive_seed(*parts) -> int:
    """A seed in [0, 2**63) from the run's seed and names (method, ipc, model index), stable across processes
    (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class CondenseConfig:
    # data
    dataset: str = "digits"
    data_root: Optional[str] = None      # folder of the mnist / fashion_mnist / cifar10 files
    test_fraction: float = 1 / 3         # digits only: the seeded stratified 2:1 split
    zca: bool = False
    # the grid
    methods: List[str] = field(default_factory=lambda: ["random"])
    ipcs: List[int] = field(default_factory=lambda: [1, 10])
    whole: bool = True                   # add the whole-training-data row
    # networks: `net` is the one methods distil with, `eval_nets` the ones the set is tested on
    net: str = "convnet"
    width: int = 128
    depth: Optional[int] = None          # default: nets.default_depth
    eval_nets: Optional[List[str]] = None  # default: [net]
    distill_nets: Optional[List[str]] = None  # several: dc/dsa/dm draw each iteration's net among them
    # evaluation protocol (evaluate.py)
    eval_models: int = 5
    eval_epochs: int = 300
    whole_epochs: Optional[int] = None   # default: eval_epochs
    eval_optimizer: str = "sgd"
    use_learned_lrs: bool = False
    eval_augment: bool = False           # train the evaluation nets on DSA-augmented batches (evaluate.py)
    seed: int = 0
    dtype: str = "float32"
    threads: Optional[int] = None        # torch intra-op threads; default: evaluate.compute_threads's choice
    herding_space: str = "features"
    # the methods' own options, ``<method>_<name>`` -> value (flags --<method>-<name>); the fields and
    # defaults are the methods' option dataclasses (methods.OPTIONS), read as attributes of this config
    options: dict = field(default_factory=dict)

    def __getattr__(self, name):
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(name)

    @property
    def test_nets(self) -> List[str]:
        return list(self.eval_nets or [self.net])

    @property
    def train_nets(self) -> List[str]:
        """The architectures methods condense with: --distill-nets, else --net alone."""
        return list(self.distill_nets or [self.net])

    def cell_epochs(self, method: str) -> int:
        """Training epochs of the evaluation nets of a ``method`` cell (the whole-data row may have its own)."""
        return (self.whole_epochs or self.eval_epochs) if method == "whole" else self.eval_epochs

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    def validate(self) -> "CondenseConfig":
        from torchopt_ext.condense.methods import load_methods
        from torchopt_ext.condense.nets import NETS

        def need(ok, arg, expected, got):
            if not ok:
                raise CondenseError(f"{arg}: expected {expected}, got {got!r}")

        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        need(self.dataset in DATASETS, "--dataset", "one of " + ", ".join(DATASETS), self.dataset)
        need(self.data_root is None or isinstance(self.data_root, str), "--data-root", "a folder", self.data_root)
        need(isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1, "--test-fraction",
             "a number in (0, 1)", self.test_fraction)
        methods = load_methods()
        need(isinstance(self.methods, list) and len(self.methods) >= 1, "--method", "at least one method",
             self.methods)
        for m in self.methods:
            need(m in methods, "--method", "names from " + ", ".join(sorted(methods)), m)
        need(len(set(self.methods)) == len(self.methods), "--method", "each method once", self.methods)
        need(isinstance(self.ipcs, list) and len(self.ipcs) >= 1 and all(positive_int(k) for k in self.ipcs),
             "--ipc", "integers >= 1 (images per class)", self.ipcs)
        need(len(set(self.ipcs)) == len(self.ipcs), "--ipc", "each value once", self.ipcs)
        need(self.net in NETS, "--net", "one of " + ", ".join(NETS), self.net)
        for n in self.test_nets:
            need(n in NETS, "--eval-nets", "names from " + ", ".join(NETS), n)
        need(len(set(self.test_nets)) == len(self.test_nets), "--eval-nets", "each net once", self.test_nets)
        for n in self.train_nets:
            need(n in NETS, "--distill-nets", "names from " + ", ".join(NETS), n)
        need(len(set(self.train_nets)) == len(self.train_nets), "--distill-nets", "each net once",
             self.train_nets)
        if len(self.train_nets) > 1:
            for m in self.methods:
                need(m in MULTI_NET_METHODS + NETLESS_METHODS, "--distill-nets",
                     "one net for --method " + m + " (several nets work with " + ", ".join(MULTI_NET_METHODS)
                     + ")", self.train_nets)
        need(positive_int(self.width), "--width", "an integer >= 1", self.width)
        need(self.depth is None or positive_int(self.depth), "--depth", "an integer >= 1", self.depth)
        for name in ("eval_models", "eval_epochs"):
            need(positive_int(getattr(self, name)), "--" + name.replace("_", "-"), "an integer >= 1",
                 getattr(self, name))
        need(self.whole_epochs is None or positive_int(self.whole_epochs), "--whole-epochs", "an integer >= 1",
             self.whole_epochs)
        need(self.eval_optimizer in EVAL_OPTIMIZERS, "--eval-optimizer", "|".join(EVAL_OPTIMIZERS),
             self.eval_optimizer)
        need(isinstance(self.eval_augment, bool), "--eval-augment", "true or false", self.eval_augment)
        need(isinstance(self.seed, int) and self.seed >= 0, "--seed", "an integer >= 0", self.seed)
        need(self.dtype in ("float32", "float64"), "--dtype", "float32 or float64", self.dtype)
        need(self.threads is None or positive_int(self.threads), "--threads", "an integer >= 1", self.threads)
        need(isinstance(self.options, dict), "config options", "a mapping", self.options)
        from torchopt_ext.condense.methods import OPTIONS
        known = {f"{m}_{f.name}" for m, cls in OPTIONS.items() for f in dataclasses.fields(cls)}
        for key in self.options:
            need(key in known, "--" + str(key).replace("_", "-"), "a method option listed in --help", key)
        for m in self.methods:  # range-check every chosen method's options before anything is written
            if m in OPTIONS:
                OPTIONS[m].from_config(self, m)
        need(self.herding_space in HERDING_SPACES, "--herding-space", " or ".join(HERDING_SPACES),
             self.herding_space)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CondenseConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CondenseError(f"config: unknown keys {unknown}")
        return cls(**raw)

    def command(self, out: str) -> str:
        """The command line that reproduces this grid (options at their defaults left out)."""
        default = CondenseConfig()
        words = ["python", "-m", "torchopt_ext", "condense"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if f.name == "options":
                for key, v in sorted(value.items()):
                    words += ["--" + key.replace("_", "-"), str(v)]
                continue
            flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                words += [flag, ",".join(str(v) for v in value)]
            else:
                words += [flag, str(value)]
        return " ".join(shlex.quote(w) for w in words + ["--out", out])


# config field -> CLI flag where the two differ
_FLAGS = {"methods": "--method", "ipcs": "--ipc"}
