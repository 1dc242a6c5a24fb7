"""benchmarks/compare_builds.py: a shift counts as a change only when the two builds' runs do not overlap
and the shift exceeds both spreads; the archived comparison's tables are what its runs give."""
import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
spec = importlib.util.spec_from_file_location("compare_builds", os.path.join(BENCH, "compare_builds.py"))
compare_builds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_builds)


def _runs(values):
    return [[{"activation": "relu", "kernel_ms": v, "add_ms": 1.0, "kernel_over_add": v}] for v in values]


def _verdict(old, new):
    rows = compare_builds.compare(_runs(old), _runs(new), "kernels")
    return {r["field"]: (round(r["ratio"], 3), r["moved"]) for r in rows}


def test_only_a_shift_beyond_both_spreads_counts():
    assert _verdict([1.0, 1.02], [1.2, 1.22])["kernel_ms"] == (1.198, "yes, higher")
    assert _verdict([1.0, 1.02], [0.8, 0.81])["kernel_ms"] == (0.797, "yes, lower")
    assert _verdict([1.0, 1.3], [1.25, 1.5])["kernel_ms"][1] == "no"    # the ranges overlap
    assert _verdict([1.0, 1.3], [1.35, 1.4])["kernel_ms"][1] == "no"    # apart, but inside the old spread
    assert _verdict([1.0, 1.02], [1.0, 1.02])["add_ms"] == (1.0, "no")


def test_the_archived_tables_are_what_their_runs_give(tmp_path):
    folder = os.path.join(BENCH, "archive", "refactor-check")
    old, new, tables = (os.path.join(folder, name) for name in ("old", "new", "tables.md"))
    assert compare_builds.main([old, new, "--out", tables, "--check"]) == 0
    text = open(tables).read()
    assert "Moved beyond the spread: none." in text    # the kernels
    assert len(json.load(open(os.path.join(folder, "loads.json")))) == 24
    changed = tmp_path / "tables.md"
    changed.write_text(text.replace("| 0.90 |", "| 0.91 |", 1))
    assert compare_builds.main([old, new, "--out", str(changed), "--check"]) == 1


def test_a_folder_without_runs_is_one_clear_error(tmp_path, capsys):
    new = os.path.join(BENCH, "archive", "refactor-check", "new")
    assert compare_builds.main([str(tmp_path), new, "--out", str(tmp_path / "t.md")]) == 2
    assert capsys.readouterr().err == f"error: old: {tmp_path} holds no kernels-N.json or layers-N.json bench runs\n"
    assert not (tmp_path / "t.md").exists()
