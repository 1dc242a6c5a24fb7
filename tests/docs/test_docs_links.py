"""The documentation's references hold: every file path that the docs, code comments and docstrings
mention exists in the repository, every anchor they name exists in its page, design.md's table of
where each formula lives names functions that are there, and nothing cites design notes kept
outside the repository."""
import ast
import functools
import os
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from tests.helpers.doc_refs import ROOT, Mention, anchors, mentions, resolve

SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".venv", "venv"}
CODE_SUFFIXES = (".py", ".h", ".cpp", ".cu", ".sh")
# the design notes this repository grew from live outside it; written in two parts so that this
# file does not cite them itself
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")
# the solver headers, checked as their own case: they cited OUTSIDE longest
HEADERS = ("csrc/include/torchopt_ext/ib_alpha_math.h", "csrc/include/torchopt_ext/probe_math.h")


def _files(folder: Path, suffixes) -> List[Path]:
    """The files under ``folder`` with one of ``suffixes``, build and cache folders left out."""
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(top, name) for name in names if Path(name).suffix in suffixes]
    return sorted(found)


@functools.lru_cache(maxsize=None)
def documents() -> Tuple[Path, ...]:
    """The prose whose references are checked: the top-level pages, docs/, and the comments and
    docstrings of the code."""
    pages = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md") if (ROOT / name).is_file()]
    pages += _files(ROOT / "docs", (".md",))
    for folder in ("torchopt_ext", "csrc", "tests", "benchmarks"):
        pages += _files(ROOT / folder, CODE_SUFFIXES)
    return tuple(pages)


@functools.lru_cache(maxsize=None)
def all_mentions() -> Tuple[Mention, ...]:
    """Every mention of every checked document, read once for the tests below."""
    return tuple(m for doc in documents() for m in mentions(doc))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_checked_documents_include_code_and_docs():
    """The scan reaches each kind of file (a glob gone wrong would make every test below vacuous)."""
    names = {_rel(p) for p in documents()}
    for expected in ("README.md", "docs/design.md", "torchopt_ext/nn/functional.py",
                     "csrc/implicit_linear.cpp", "csrc/cuda/ib_alpha_kernel.cu", "tests/ops/test_ib_alpha_math.py"):
        assert expected in names


def test_every_mentioned_path_exists():
    found = all_mentions()
    assert len(found) >= 100 and sum(m.is_link for m in found) >= 20   # the scan itself works
    broken = [f"{_rel(m.source)}:{m.line}: {m.target}" for m in found if resolve(m) is None]
    assert not broken, "paths that resolve to no file:\n" + "\n".join(broken)


def test_every_mentioned_anchor_exists():
    cache: Dict[Path, Set[str]] = {}
    broken, checked = [], 0
    for m in all_mentions():
        target = resolve(m)
        if m.anchor is None or target is None or target.suffix != ".md":
            continue
        if target not in cache:
            cache[target] = anchors(target)
        checked += 1
        if m.anchor not in cache[target]:
            broken.append(f"{_rel(m.source)}:{m.line}: {m.target}#{m.anchor}")
    assert checked >= 20   # the code cites design.md by anchor
    assert not broken, "anchors that name no heading:\n" + "\n".join(broken)


def _outside_citations() -> List[Tuple[str, int]]:
    hits = []
    for path in _files(ROOT, {".md", ".py", ".h", ".cpp", ".cu", ".sh", ".toml", ".txt", ".cfg", ".json"}) \
            + [ROOT / ".ci" / "run"]:
        if not path.is_file():
            continue
        for k, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                hits.append((_rel(path), k))
    return hits


@pytest.mark.parametrize("part", [
    "everything else",
    "solver headers",
])
def test_nothing_cites_design_notes_outside_the_repository(part):
    hits = [f"{path}:{line}" for path, line in _outside_citations() if (path in HEADERS) == (part == "solver headers")]
    assert not hits, "cite docs/design.md instead:\n" + "\n".join(hits)


def _formula_table() -> List[str]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## Where each formula lives", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]


def _named_in(cell: str) -> List[Tuple[str, str]]:
    """(name, file) pairs of a cell such as "`f`, `g` in `x.py` (reference: `h`); `k` in `y.h`":
    each name belongs to the file after it, names after a cell part's last file to that file."""
    pairs = []
    for part in cell.split(";"):
        names: List[str] = []
        last = None
        for item in re.findall(r"`([^`]+)`", part):
            if "/" in item:
                pairs += [(name, item) for name in names]
                names, last = [], item
            elif re.fullmatch(r"[A-Za-z_][\w.]*", item):
                names.append(item)
        if last is not None:
            pairs += [(name, last) for name in names]
    return pairs


def _defines(path: Path, name: str) -> bool:
    text = path.read_text(encoding="utf-8")
    short = name.split(".")[-1]
    if path.suffix == ".py":
        return any(isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.name == short
                   for node in ast.walk(ast.parse(text)))
    return re.search(rf"(\b(struct|class|enum)\s+{short}\b)|(\b{short}\s*\()", text) is not None


def test_the_formula_table_names_functions_that_exist():
    rows = _formula_table()
    assert len(rows) >= 15
    pairs = [pair for row in rows for cell in row.strip("|").split("|")[1:] for pair in _named_in(cell)]
    assert len(pairs) >= 30
    missing = [f"{name} in {file}" for name, file in pairs
               if not (ROOT / file).is_file() or not _defines(ROOT / file, name)]
    assert not missing, "docs/design.md's formula table names what is not there:\n" + "\n".join(missing)
