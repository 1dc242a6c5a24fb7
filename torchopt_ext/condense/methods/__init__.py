"""The condensation methods, by name: each is ``fn(data, ipc, config, generator, progress) -> SyntheticSet``.

``data``: ImageData; ``ipc``: images per class; ``config``: the run's CondenseConfig (method options);
``generator``: a seeded torch.Generator that makes the run reproducible; ``progress``: show tqdm.
Methods register themselves with :func:`register`; ``METHODS`` maps names to functions.
"""
from typing import Callable, Dict

METHODS: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco
