"""The condensation methods, by name: each is ``fn(data, ipc, config, generator, progress) -> SyntheticSet``.

``data``: ImageData; ``ipc``: images per class; ``config``: the run's CondenseConfig (method options);
``generator``: a seeded torch.Generator that makes the run reproducible; ``progress``: show tqdm.
Methods register themselves with :func:`register`; ``METHODS`` maps names to functions. A method may also
register ``prepare(data, config, progress)``: work its cells share (mtt's expert trajectories), which the grid
runs once, on every rank of a torchrun together, before any cell (it may spread the work over the ranks).
"""
from typing import Callable, Dict, Optional

METHODS: Dict[str, Callable] = {}
OPTIONS: Dict[str, type] = {}   # method -> the dataclass of its options (``config.<method>_<name>``)
PREPARE: Dict[str, Callable] = {}   # method -> its shared work, run collectively before the cells


def register(name: str, options: Optional[type] = None, prepare: Optional[Callable] = None):
    def deco(fn):
        METHODS[name] = fn
        if options is not None:
            OPTIONS[name] = options
        if prepare is not None:
            PREPARE[name] = prepare
        return fn
    return deco


# the method modules, imported by load_methods(); a module not written yet is skipped
MODULES = ("baselines", "dd", "ld", "gtn", "kip", "dc", "dm", "mtt")


def load_methods() -> Dict[str, Callable]:
    """Import every method module that exists (each registers its methods) and return ``METHODS``."""
    import importlib
    for module in MODULES:
        path = f"{__name__}.{module}"
        try:
            importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:   # the module exists but one of its imports is missing: say so
                raise
    return METHODS
