"""The README and the user pages do what they show: their Python examples run, the commands they
print parse with the real command line, and every name in the README's API table exists."""
import contextlib
import importlib
import inspect
import io
import re
import shlex

import pytest

from tests.helpers.doc_refs import ROOT, code_blocks
from torchopt_ext.cli import COMMANDS, build_parser

# pages whose Python blocks are complete programs (the other guides show fragments of a training loop)
RUNNABLE = ("README.md", "docs/ops.md", "docs/implicit.md")


def _blocks(page: str, language: str):
    return code_blocks((ROOT / page).read_text(encoding="utf-8"), language)


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_examples_run(page):
    blocks = _blocks(page, "python")
    assert blocks, f"{page} has no python block"
    for code in blocks:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, page, "exec"), {"__name__": "__example__"})


def test_readme_examples_train():
    """The two training loops of the README change the model (a loop that never steps would still run)."""
    blocks = _blocks("README.md", "python")
    assert len(blocks) == 2
    for code in blocks:
        scope = {"__name__": "__example__"}
        code_before, loop = code.split("for _ in range(5):", 1)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code_before, "README.md", "exec"), scope)
            before = [p.detach().clone() for p in scope["model"].parameters()]
            exec(compile("for _ in range(5):" + loop, "README.md", "exec"), scope)
        after = list(scope["model"].parameters())
        assert all(not b.equal(a) for b, a in zip(before, after))


def _commands():
    """Every ``python -m torchopt_ext ...`` command of the README's shell blocks, as argument lists."""
    found = []
    for block in _blocks("README.md", "bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:3] == ["python", "-m", "torchopt_ext"]:
                    found.append(words[3:])
    return found


def test_readme_commands_parse():
    commands = _commands()
    assert {c[0] for c in commands} >= {"distill", "condense"}
    for argv in commands:
        build_parser().parse_args(argv)   # an unknown option or value exits with status 2


def test_quick_start_matches_ci():
    """.ci/run runs the README's command (b) word for word."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = "\n".join(_blocks("README.md", "bash"))
    b = next(line for line in readme.splitlines() if "-e \".[test]\"" in line)
    assert b.strip() in [line.strip() for line in ci.splitlines()]   # the whole line, not a prefix of it


def _api_rows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    # the first cell of each row; "\|" is a pipe inside a cell
    return [re.split(r"(?<!\\)\|", line)[1] for line in section.splitlines() if line.startswith("| `")]


def _resolve(dotted: str):
    """The object a dotted name gives in user code: attributes first (``torchopt_ext.distill.distill``
    is the function the package exports, not its module), submodules where no attribute is."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for k in range(1, len(parts)):
        try:
            obj = getattr(obj, parts[k])
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: k + 1]))
    return obj


def test_readme_api_names_exist():
    rows = _api_rows()
    assert len(rows) >= 15
    checked = 0
    for cell in rows:
        for item in re.findall(r"`([^`]+)`", cell):
            if item.startswith("python -m torchopt_ext"):
                assert set(re.findall(r"\b(\w+)\b", item.split("torchopt_ext", 1)[1])) <= set(COMMANDS)
                continue
            m = re.fullmatch(r"(torchopt_ext(?:\.\w+)+)(?:\((.*)\))?", item)
            assert m, f"not a dotted name: {item}"
            obj = _resolve(m.group(1))
            if m.group(2):   # the arguments shown must be real parameter names
                params = inspect.signature(obj).parameters
                for arg in m.group(2).split(","):
                    assert arg.split("=")[0].strip() in params, f"{item}: no parameter {arg}"
            checked += 1
    assert checked >= 20
