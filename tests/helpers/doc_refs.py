"""Reading the repository's prose for the documentation tests: markdown code blocks, headings and
links, comments and docstrings of source files, and the file paths they mention."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Set, Tuple


def repo_root() -> Path:
    """The checkout's root: the nearest folder above this file holding pyproject.toml."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("no pyproject.toml above tests/")


ROOT = repo_root()
FENCE = re.compile(r"^\s*(```|~~~)")
# extensions of the files prose points at; a mention must name one to be checked
EXTENSIONS = "md|py|h|cpp|cu|json|sh|png|toml|txt|cfg|yml|yaml|csv"
# a relative path with at least one folder, not part of a URL, an absolute path or a $VARIABLE
PATH = re.compile(r"(?<![\w./~$-])((?:\.\.?/)*(?:[\w.-]+/)+[\w.-]+\.(?:" + EXTENSIONS + r"))(?:#([\w-]+))?(?![\w/])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


class Mention(NamedTuple):
    source: Path   # the file that mentions it
    line: int
    target: str    # the path as written
    anchor: Optional[str]
    is_link: bool  # a markdown link: relative to its file's folder only, as GitHub resolves it


def code_blocks(text: str, language: str) -> List[str]:
    """The fenced blocks of a markdown text whose info string is ``language``, in order."""
    blocks: List[str] = []
    lines: Optional[List[str]] = None   # the open block's lines; None outside a block
    keep = False
    for line in text.splitlines():
        if FENCE.match(line):
            if lines is None:
                lines, keep = [], line.strip()[3:].strip() == language
            else:
                if keep:
                    blocks.append("\n".join(lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> Set[str]:
    """Every anchor a markdown file defines: its headings' slugs (outside code blocks, duplicates
    numbered as GitHub numbers them) and explicit ``<a id=...>`` / ``<a name=...>``."""
    found: Set[str] = set()
    fenced = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            name, k = base, 0
            while name in found:
                k += 1
                name = f"{base}-{k}"
            found.add(name)
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def python_prose(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    # docstrings sit in statement lists only, so expressions (most of the tree) are not visited
    todo: List[ast.AST] = [ast.parse(source)]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo += [child for child in getattr(node, field, ()) if isinstance(child, ast.AST)]


def c_prose(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every // and /* */ comment of a C++ or CUDA file (string literals skipped)."""
    text = path.read_text(encoding="utf-8")
    i, n, line = 0, len(text), 1
    while i < n:
        ch = text[i]
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            yield line, text[i:end]
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            yield line, text[i:end]
            line += text.count("\n", i, end)
            i = end
        elif ch in "\"'":
            j = i + 1
            while j < n and text[j] != ch and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
        else:
            line += ch == "\n"
            i += 1


def shell_prose(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every # comment of a shell script."""
    for k, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "#" in text and not text.lstrip().startswith("#!"):
            yield k, text[text.index("#"):]


def markdown_prose(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, text) of every line of a markdown file, code blocks included (their commands name files)."""
    yield from enumerate(path.read_text(encoding="utf-8").splitlines(), 1)


def prose(path: Path) -> Iterator[Tuple[int, str]]:
    """The parts of ``path`` written for people, by its kind."""
    if path.suffix == ".md":
        return markdown_prose(path)
    if path.suffix == ".py":
        return python_prose(path)
    if path.suffix in (".h", ".cpp", ".cu"):
        return c_prose(path)
    return shell_prose(path)


def _bases(source: Path, is_link: bool) -> List[Path]:
    """Where a mention may be relative to: a link to its file's folder (as GitHub resolves it), a
    path in prose to that folder or any folder above it up to the root."""
    if is_link:
        return [source.parent]
    return [base for base in (source.parent, *source.parent.parents) if ROOT in (base, *base.parents)]


def _names_a_folder(source: Path, target: str) -> bool:
    """Whether ``target``'s first folder exists from one of its bases: in code comments a path such as
    ``out/runs.json`` (``out`` a parameter) or ``x_avx2/avx512.cpp`` (two file names) is no reference."""
    prefix, rest = re.match(r"((?:\.\.?/)*)(.*)", target).groups()
    first = rest.split("/")[0]
    return any((base / prefix / first).is_dir() for base in _bases(source, False))


def mentions(path: Path) -> Iterator[Mention]:
    """Every file path (with its anchor) that ``path``'s prose mentions, and its markdown links.
    In a markdown page every path counts; in code, those whose first folder exists."""
    for line, text in prose(path):
        for k, chunk in enumerate(text.splitlines()):
            for m in PATH.finditer(chunk):
                if path.suffix == ".md" or _names_a_folder(path, m.group(1)):
                    yield Mention(path, line + k, m.group(1), m.group(2), False)
            if path.suffix == ".md":
                for m in LINK.finditer(chunk):
                    target = m.group(1)
                    if re.match(r"^[a-z]+:", target):   # a URL
                        continue
                    file, _, anchor = target.partition("#")
                    file = file or path.name             # "#anchor": a heading of this page
                    yield Mention(path, line + k, file, anchor or None, True)


def placeholder_glob(name: str) -> Optional[str]:
    """``name`` as a glob when it holds a placeholder (``test_X.py``, ``runN.json``), else None."""
    glob = re.sub(r"(?<![A-Za-z])[A-Z](?![A-Za-z])|(?<=[a-z])N(?=\.)", "*", name)
    return glob if glob != name else None


def resolve(m: Mention) -> Optional[Path]:
    """The file or folder a mention points at (the first match of a placeholder), or None."""
    for base in _bases(m.source, m.is_link):
        candidate = base / m.target
        pattern = placeholder_glob(candidate.name)
        if pattern is not None:
            hits = sorted(candidate.parent.glob(pattern))
            if hits:
                return hits[0]
        elif candidate.exists():
            return candidate.resolve()
    return None
