"""The benchmark results pages are what ``benchmarks/render.py`` makes of their JSON, and the renderer
notices a changed figure, a JSON without its "meta", a bad template and a link to nowhere."""
import importlib.util
import json
import os
import re
import shutil
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def _load_render():
    spec = importlib.util.spec_from_file_location("benchmarks_render", os.path.join(BENCH, "render.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _load_render()


@pytest.fixture
def tree(tmp_path):
    """A copy of what the renderer reads and writes, to break without touching the checkout."""
    for rel in [*render.SOURCES.values(), *render.PAGES, *(f"templates/{p}.tmpl" for p in render.PAGES)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(BENCH, rel), tmp_path / rel)
    return tmp_path


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_pages_match_their_json(capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_on_a_changed_figure_and_render_rewrites_it(tree, capsys):
    _edit_json(tree / "cpu" / "kernels.json", lambda d: d["kernels"][0].update(kernel_ms=123.456))
    assert render.main(["--check", "--root", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "implicit-cpu.md differs" in err and "123.46" in err and "README.md differs" not in err
    assert render.main(["--root", str(tree)]) == 0
    assert "| relu | 19 | 0.69 | 123.46 |" in (tree / "implicit-cpu.md").read_text()
    assert render.main(["--check", "--root", str(tree)]) == 0


@pytest.mark.parametrize("field", ["date", "hardware", "load", "command"])
def test_a_json_without_its_meta_is_one_clear_error(tree, capsys, field):
    _edit_json(tree / "gpu" / "layers.json", lambda d: d["meta"].pop(field))
    assert render.main(["--check", "--root", str(tree)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'render: error: gpu/layers.json: "meta" lacks {field} (expected an object with ')


def test_an_unknown_placeholder_names_its_template(tree, capsys):
    tmpl = tree / "templates" / "adaptive-lr.md.tmpl"
    tmpl.write_text(tmpl.read_text() + "\n{{adaptive.nonesuch}}\n")
    assert render.main(["--root", str(tree)]) == 2
    assert "templates/adaptive-lr.md.tmpl: unknown placeholder {{adaptive.nonesuch}}" in capsys.readouterr().err


def test_every_link_on_the_pages_resolves():
    for page in [*render.PAGES, "archive/README.md"]:
        with open(os.path.join(BENCH, page)) as fh:
            targets = LINK.findall(fh.read())
        assert targets, page
        for target in targets:
            path = os.path.normpath(os.path.join(BENCH, os.path.dirname(page), target))
            assert os.path.exists(path), f"{page} links to {target}, which does not exist"


def test_every_archived_run_is_described():
    with open(os.path.join(BENCH, "archive", "README.md")) as fh:
        text = fh.read()
    for name in os.listdir(os.path.join(BENCH, "archive", "cpu")):
        assert f"`cpu/{name}`" in text, name


def test_bench_meta_names_the_run():
    from torchopt_ext.bench import meta

    m = meta.collect("cpu", ["bench", "--what", "kernels", "--json", "out dir/k.json"])
    assert all(m.get(k) for k in meta.REQUIRED), m
    assert m["command"].endswith("python -m torchopt_ext bench --what kernels --json 'out dir/k.json'")
    assert meta.command(["bench"], env={"THP_MEM_ALLOC_ENABLE": "1", "HOME": "/x"}) == \
        "THP_MEM_ALLOC_ENABLE=1 python -m torchopt_ext bench"


def test_a_json_the_bench_command_writes_renders(tree, monkeypatch, capsys):
    """The bench CLI's JSON carries the "meta" the renderer needs; the timing itself is
    test_bench_cli's, so the rows here are the current page's, not a new (load-bound) measurement."""
    from torchopt_ext import cli
    from torchopt_ext.bench import kernels

    rows = json.loads((tree / "cpu" / "kernels.json").read_text())["kernels"]
    monkeypatch.setattr(kernels, "run", lambda **kw: rows)
    out = tree / "cpu" / "kernels.json"
    argv = ["bench", "--what", "kernels", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["torchopt_ext", *argv])  # what `python -m torchopt_ext ...` sees
    assert cli.main(argv) == 0
    assert render.main(["--root", str(tree)]) == 0, capsys.readouterr().err
    page = (tree / "implicit-cpu.md").read_text()
    assert f"python -m torchopt_ext bench --what kernels --json {out}\n" in page and "| relu | 19 | 0.69 | 0.99 |" in page
