"""``python -m torchopt_ext compare --tiny`` end to end, and its error paths."""
import json

from torchopt_ext.cli import main


def test_compare_tiny_writes_table_plot_and_json(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--tiny", "--seeds", "2", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    for task in ("digits-mlp", "digits-autoencoder", "adding-rnn"):
        assert f"## {task}" in md
    assert "divergence lr" in md
    assert (out / "loss_vs_lr.png").stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 3 * 2 * 3 * 2  # tasks x methods x lrs x seeds
    assert {r["method"] for r in data["summary"]} == {"eb", "ib"}


def test_compare_adaptive_missing_module_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_adaptive(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torchopt_ext.compare" and fromlist and "adaptive" in fromlist:
            raise ImportError("No module named 'torchopt_ext.compare.adaptive'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_adaptive)
    assert main(["compare", "--optimizer", "adaptive", "--tiny", "--out", str(tmp_path)]) == 2
    assert "torchopt_ext.compare.adaptive" in capsys.readouterr().err


def test_compare_rejects_zero_seeds(tmp_path, capsys):
    assert main(["compare", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
