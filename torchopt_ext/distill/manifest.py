"""``manifest.json``: what a run directory must contain, file name -> size and sha256.

Rewritten (atomically, after the files it lists) when the run starts, after each restart and at
the end; ``--resume`` compares the directory with it to find what is missing or damaged.
"""
import hashlib
import json
import os

from torchopt_ext._atomic import atomic_open

NAME = "manifest.json"
VERSION = 1


def file_record(path: str) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


class Manifest:
    def __init__(self, out: str, files: dict = None, complete: bool = False):
        self.out = out
        self.files = dict(files or {})
        self.complete = complete

    @classmethod
    def load(cls, out: str):
        """(manifest, note): an unreadable or absent manifest gives an empty one and says why."""
        path = os.path.join(out, NAME)
        if not os.path.exists(path):
            return cls(out), f"no {NAME}: every output is treated as unverified"
        try:
            with open(path, encoding="utf-8") as fh:
                raw = json.load(fh)
            files = raw["files"]
            if raw.get("version") != VERSION or not all(
                    isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                    for v in files.values()):
                raise ValueError("unexpected layout")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return cls(out), f"{NAME} is unreadable ({exc}): every output is treated as unverified"
        return cls(out, files, bool(raw.get("complete"))), None

    def problem(self, name: str):
        """None when ``name`` is on disk exactly as recorded, else why not (missing, empty, ...)."""
        path = os.path.join(self.out, name)
        if not os.path.isfile(path):
            return "missing"
        if os.path.getsize(path) == 0:
            return "empty"
        if name not in self.files:
            return f"not recorded in {NAME}"
        if file_record(path) != self.files[name]:
            return f"its size or sha256 differs from {NAME}"
        return None

    def record(self, *names: str) -> None:
        for name in names:
            self.files[name] = file_record(os.path.join(self.out, name))

    def forget(self, *names: str) -> None:
        for name in names:
            self.files.pop(name, None)

    def save(self, complete: bool = False) -> None:
        self.complete = complete
        with atomic_open(os.path.join(self.out, NAME), "w", encoding="utf-8") as fh:
            json.dump({"version": VERSION, "complete": complete, "files": self.files}, fh, indent=1, sort_keys=True)
