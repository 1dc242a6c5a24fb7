"""The jsb-chorales task: piano rolls from music21's Bach chorales, their cache, the split, the
loss, the EB twin of ImplicitRNN and a tiny ``compare --tasks jsb`` run."""
import json
import os
import sys

import pytest
import torch

from torchopt_ext.cli import main
from torchopt_ext.compare import music


def _midi(frame):
    return sorted((frame.nonzero().flatten() + 21).tolist())  # key 0 is A0, MIDI 21


def _bwv1_6():
    paths = [p for p in music.corpus_paths() if os.path.basename(p) == "bwv1.6.mxl"]
    assert paths, "music21's corpus has no bwv1.6.mxl"
    return paths[0]


def test_roll_frames_are_quarter_notes_of_the_vocal_parts_only():
    pytest.importorskip("music21")
    from music21 import note, stream

    score = stream.Score()
    soprano = stream.Part()
    soprano.partName = "Soprano"
    for n in (note.Note("C4", quarterLength=2), note.Note("D4", quarterLength=1),
              note.Note("E4", quarterLength=0.5), note.Note("F4", quarterLength=0.5),
              note.Rest(quarterLength=1), note.Note("G4", quarterLength=1.5),
              note.Note("A4", quarterLength=0.5)):
        soprano.append(n)
    horn = stream.Part()
    horn.partName = "Horn 1"
    horn.append(note.Note("C6", quarterLength=9))
    score.insert(0, soprano)
    score.insert(0, horn)
    roll = music.piano_roll(score)
    # a half note fills 2 frames, a frame samples its quarter's start, the horn is not sung
    assert [_midi(f) for f in roll] == [[60], [60], [62], [64], [], [67], [67]]


def test_roll_of_one_chorale():
    pytest.importorskip("music21")
    roll = music.parse_chorale(_bwv1_6())
    assert roll.shape == (80, 88)  # 20 bars of 4/4, one frame per quarter note
    assert roll.dtype == torch.uint8 and set(roll.unique().tolist()) <= {0, 1}
    assert _midi(roll[0]) == [53, 57, 60, 65]  # F3 A3 C4 F4: bass, tenor, alto, soprano
    # the second quarter: the voices' E3 G3 C4 C5, without the horn's G4 eighth
    assert _midi(roll[1]) == [52, 55, 60, 72]


def test_cache_round_trip_is_atomic_and_reused(tmp_path, monkeypatch):
    pytest.importorskip("music21")
    paths = music.corpus_paths()[:2]
    names, rolls = music.load_rolls(paths, data_root=str(tmp_path))
    cached = music.cache_path(paths, str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(cached)]  # no temporary file left behind
    assert names == [os.path.basename(p) for p in paths]

    def no_parse(path):
        raise AssertionError("parsed although the cache holds the rolls")

    monkeypatch.setattr(music, "parse_chorale", no_parse)
    names2, rolls2 = music.load_rolls(paths, data_root=str(tmp_path))
    assert names2 == names and all(torch.equal(a, b) for a, b in zip(rolls, rolls2))
    monkeypatch.undo()

    # a cache that does not hold what it should is rebuilt, not trusted
    with open(cached, "wb") as f:
        f.write(b"not an npz")
    names3, rolls3 = music.load_rolls(paths, data_root=str(tmp_path))
    assert names3 == names and all(torch.equal(a, b) for a, b in zip(rolls, rolls3))

    # the data is written beside the cache file, which appears only once complete; a write that
    # fails half way leaves neither a cache file nor a temporary one
    os.remove(cached)
    seen = []

    def broken(f, **arrays):
        f.write(b"partial")
        f.flush()
        seen.append(os.path.exists(cached))
        raise OSError("disk full")

    monkeypatch.setattr(music.np, "savez_compressed", broken)
    with pytest.raises(OSError, match="disk full"):
        music.load_rolls(paths, data_root=str(tmp_path))
    assert seen == [False]
    assert os.listdir(tmp_path) == []


def test_missing_music21_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "music21", None)  # makes `import music21` fail
    with pytest.raises(music.Music21Missing, match="pip install"):
        music.load_rolls(data_root=str(tmp_path))
    assert main(["compare", "--tasks", "jsb", "--tiny", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "music21" in err and "[music]" in err
    assert not (tmp_path / "out").exists()


def test_split_has_the_jsb_proportions_and_a_fixed_seed():
    names = [f"bwv{i}.mxl" for i in range(409)]
    parts = music.split(names, seed=0)
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [245, 81, 83]
    assert sorted(parts["train"] + parts["valid"] + parts["test"]) == list(range(409))
    # the split follows the names, not the order they come in
    shuffled = names[::-1]
    again = music.split(shuffled, seed=0)
    assert sorted(shuffled[i] for i in again["test"]) == sorted(names[i] for i in parts["test"])
    assert music.split(names, seed=1)["test"] != parts["test"]
    jsb = music.split([str(i) for i in range(382)])
    assert [len(jsb[k]) for k in ("train", "valid", "test")] == [229, 76, 77]


def test_frame_nll_averages_each_piece_over_its_own_frames():
    rolls = [torch.randint(0, 2, (4, 88), dtype=torch.uint8), torch.randint(0, 2, (7, 88), dtype=torch.uint8)]
    x, y, lengths = music.next_frame_tensors(rolls)
    assert lengths.tolist() == [3, 6] and x.shape == y.shape == (2, 6, 88)
    assert torch.equal(x[0, :3], rolls[0][:-1].float()) and torch.equal(y[0, :3], rolls[0][1:].float())
    assert (y[0, 3:] == -1).all() and (x[0, 3:] == 0).all()
    logits = torch.randn(2, 6, 88)
    logits[0, 3:] = 1e4  # padding must not count
    p = torch.sigmoid(logits)
    expected = []
    for i, n in enumerate(lengths.tolist()):
        t = y[i, :n]
        nll = -(t * p[i, :n].log() + (1 - t) * (1 - p[i, :n]).log()).sum(-1)  # summed over keys
        expected.append(nll.mean())  # averaged over this piece's frames
    assert torch.allclose(music.frame_nll(logits, y), torch.stack(expected).mean(), rtol=1e-5)


def test_eb_twin_of_implicit_rnn_starts_from_the_same_weights_and_computes_the_same():
    from torchopt_ext.compare.tasks import ExplicitArctanRNN
    from torchopt_ext.nn import ImplicitRNN

    torch.manual_seed(3)
    ib = ImplicitRNN(5, 7, "arctan")
    torch.manual_seed(3)
    eb = ExplicitArctanRNN(5, 7)
    assert [n for n, _ in ib.named_parameters()] == [n for n, _ in eb.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ib.parameters(), eb.parameters()))
    x = torch.randn(6, 3, 5)
    (out_i, h_i), (out_e, h_e) = ib(x), eb(x)
    assert torch.allclose(out_i, out_e, atol=1e-6) and torch.allclose(h_i, h_e, atol=1e-6)


def test_eb_clip_clips_the_gradient_norm():
    from torchopt_ext.compare.experiment import task_methods, train
    from torchopt_ext.compare.tasks import adding_problem

    task = adding_problem(n_seq=40, steps=4, hidden=4)
    task.batch = 4
    assert task_methods(task) == ("eb", "ib")
    task.clip = 1e-6
    assert task_methods(task) == ("eb", "ib", "eb-clip")
    eb, clipped = train(task, "eb", 0.1, 0, 1), train(task, "eb-clip", 0.1, 0, 1)
    # ten steps of length at most lr * 1e-6 leave the loss nearly where it started, EB's do not
    assert abs(clipped["final"] - clipped["initial"]) < 1e-4 < abs(eb["final"] - eb["initial"])
    task.clip = 1e9
    assert train(task, "eb-clip", 0.1, 0, 1) == eb


def test_compare_tiny_on_jsb(tmp_path):
    pytest.importorskip("music21")
    out = tmp_path / "cmp"
    assert main(["compare", "--tasks", "jsb", "--tiny", "--seeds", "1", "--data-root", str(tmp_path),
                 "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "## jsb-chorales" in md and "EB-clip (8) mean ± std" in md and "valid loss after training" in md
    assert (out / "loss_vs_lr.png").stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 3 * 3  # methods x lrs x seeds
    assert {r["method"] for r in data["runs"]} == {"eb", "ib", "eb-clip"}
    cfg = data["config"]["tasks"]["jsb-chorales"]
    assert cfg["chorales"] == 3 and cfg["split"] == {"train": 2, "valid": 1, "test": 0}
    # one starting point for all methods: the initial losses agree
    assert len({round(r["initial"], 5) for r in data["runs"]}) == 1
    assert any(f.startswith("bach-rolls-") for f in os.listdir(tmp_path))


def test_cutting_batches_to_their_longest_sequence_changes_nothing():
    from torchopt_ext.compare.experiment import train
    from torchopt_ext.compare.tasks import Task, _NextFrame, ExplicitArctanRNN
    from torchopt_ext.nn import ImplicitRNN

    g = torch.Generator().manual_seed(0)
    rolls = [torch.randint(0, 2, (n, 88), generator=g, dtype=torch.uint8) for n in (5, 9, 3, 12)]
    x, y, lengths = music.next_frame_tensors(rolls)

    def build(method):
        rnn = ImplicitRNN(88, 6, "arctan") if method == "ib" else ExplicitArctanRNN(88, 6)
        return _NextFrame(rnn, 6, 88)

    for method in ("eb", "ib"):
        cut = train(Task("t", x, y, music.frame_nll, build, batch=2, lengths=lengths), method, 0.05, 0, 2)
        full = train(Task("t", x, y, music.frame_nll, build, batch=2), method, 0.05, 0, 2)
        assert cut["final"] == pytest.approx(full["final"], rel=1e-6)
        assert cut["final"] < cut["initial"]
