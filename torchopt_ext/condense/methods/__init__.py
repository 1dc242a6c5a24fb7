"""The condensation methods, by name: each is ``fn(data, ipc, config, generator, progress) -> SyntheticSet``.

``data``: ImageData; ``ipc``: images per class; ``config``: the run's CondenseConfig (method options);
``generator``: a seeded torch.Generator that makes the run reproducible; ``progress``: show tqdm.
Methods register themselves with :func:`register`; ``METHODS`` maps names to functions.
"""
from typing import Callable, Dict, Optional

METHODS: Dict[str, Callable] = {}
OPTIONS: Dict[str, type] = {}   # method -> the dataclass of its options (``config.<method>_<name>``)


def register(name: str, options: Optional[type] = None):
    def deco(fn):
        METHODS[name] = fn
        if options is not None:
            OPTIONS[name] = options
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
