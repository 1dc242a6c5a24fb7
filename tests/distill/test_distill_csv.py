"""The CSV reader: the streaming parse against a whole-file reference, each user mistake as one DistillError that
names the argument, file, line and column, a standardisation that stays finite, and the memory bound."""
import contextlib
import csv
import json
import os
import signal
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from tests.helpers.csv_tables import peak_memory, write_table
from torchopt_ext.distill import csvread, data
from torchopt_ext.distill.config import DistillConfig, DistillError
from torchopt_ext.distill.data import load_split, read_csv


def write(tmp_path, content, name="t.csv"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, newline="")
    return str(path)


def cfg(path, target="y", **kw):
    kw.setdefault("steps", 1)
    kw.setdefault("per_class", 1)
    return DistillConfig(csv=path, target=target, **kw)


def table(rows, columns=("a", "b")):
    """A CSV text: the given numeric rows (tuples) and a label column y alternating cat/dog."""
    lines = [",".join(list(columns) + ["y"])]
    lines += [",".join(map(repr, r)) + (",cat" if i % 2 else ",dog") for i, r in enumerate(rows)]
    return "\n".join(lines) + "\n"


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds):
    """Turns a read that never returns into a failure instead of a hung test."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def reference_read(path, target):
    """The plain whole-file reading: every row in memory, one float() per field."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip() for h in rows[0]]
    t = header.index(target)
    x, y = [], []
    for row in rows[1:]:
        if any(c.strip() for c in row):
            x.append([float(c) for i, c in enumerate(row) if i != t])
            y.append(row[t].strip())
    return np.array(x, dtype=np.float64), y, [h for i, h in enumerate(header) if i != t]


# --- the streaming parse is the plain parse ---------------------------------------------------------------------

def messy_table(rng, n_rows, n_cols, t):
    """Numbers written every way a spreadsheet might: padded, quoted, exponents, -0, integers; CRLF, blank lines."""
    header = [f"c{j}" for j in range(n_cols)]
    header[t] = "y"
    lines = [",".join(header)]
    for i in range(n_rows):
        cells = []
        for j in range(n_cols):
            v = float(rng.standard_normal() * 10.0 ** rng.integers(-5, 6))
            form = rng.integers(6)
            cells.append(("cat", " dog ", '"bird"', "7")[i % 4] if j == t else
                         (repr(v), f" {v:.3e} ", f'"{v}"', "-0", str(int(v)), f"{v:.17g}")[form])
        lines.append(",".join(cells))
        if i % 7 == 3:
            lines.append("")
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("n_cols,t", [(5, 4), (5, 0), (5, 2), (2, 1), (2, 0)])
def test_streaming_read_equals_the_whole_file_reference(tmp_path, n_cols, t):
    path = write(tmp_path, messy_table(np.random.default_rng(n_cols + t), 300, n_cols, t))
    x, y, features = read_csv(path, "y")
    rx, ry, rfeatures = reference_read(path, "y")
    assert x.dtype == np.float64 and x.shape == rx.shape == (300, n_cols - 1)
    np.testing.assert_array_equal(x, rx)
    assert y == ry and features == rfeatures
    assert set(y) == {"cat", "dog", "bird", "7"}


@pytest.mark.parametrize("text,line", [
    ('a,b,y\n1,"2\n",0\n3,x,1\n', 4),  # after a quoted field spanning two lines
    ('a,b,y\n1,2,0\n3,"x\n",1\n', 3),  # in a row spanning lines 3 and 4: where it starts
    ('a,b,y\n3,x,1\n', 2),  # the first row after the header
])
def test_lines_are_counted_in_the_file_not_in_rows(tmp_path, text, line):
    with pytest.raises(DistillError, match=rf"non-numeric value 'x' in column 'b' at line {line};"):
        read_csv(write(tmp_path, text), "y")


def test_blank_and_all_empty_rows_are_skipped(tmp_path):
    x, y, _ = read_csv(write(tmp_path, "a,b,y\n\n1,2,0\n,,\n  \n3,4,1\n"), "y")
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and y == ["0", "1"]


@pytest.mark.parametrize("text,match", [
    ("a,b,y\n1,2,0\n3,inf,1\n", "non-finite value 'inf' in column 'b' at line 3"),
    ("a,b,y\n1,2,0\n3,1e999,1\n", "non-finite value '1e999' in column 'b' at line 3"),
    ("a,b,y\n1,2,0\nnull,4,1\n", "missing value in column 'a' at line 3"),
    ("a,b,y\n1,2,0\n3,4, \n", "missing value in target column 'y' at line 3"),
    ("a,b,y\n1,2,0\n3,4,1,5\n", "line 3 has 4 fields, expected 3"),
])
def test_row_errors_name_column_and_line(tmp_path, text, match):
    with pytest.raises(DistillError, match=match):
        read_csv(write(tmp_path, text), "y")


def test_finite_values_whose_sum_overflows_are_kept(tmp_path):
    x, _, _ = read_csv(write(tmp_path, "a,b,y\n1e308,1e308,0\n1,2,1\n"), "y")
    assert x.tolist() == [[1e308, 1e308], [1.0, 2.0]]


# --- 1. encodings ------------------------------------------------------------------------------------------------

def test_latin1_file_names_line_and_byte(tmp_path):
    raw = "a,b,y\n1,2,cat\n3,4,café\n5,6,dog\n".encode("latin-1")
    path = write(tmp_path, raw)
    with pytest.raises(DistillError, match=rf"--csv: .*t\.csv is not UTF-8: line 3 has the byte 0xe9 "
                                           rf"\(offset {raw.index(0xe9)} in the file\).*re-save the file as UTF-8"):
        load_split(cfg(path))


def test_bad_byte_far_into_the_file_is_located_exactly(tmp_path):
    # beyond the blocks the text layer decodes ahead of the csv reader, and after a long line
    head = "a,b,y\n" + "1.25,2.5,0\n" * 20000 + "1," * 40000 + "\n"
    raw = head.encode() + b"3,4,\xff1\n5,6,1\n"
    path = write(tmp_path, raw)
    with pytest.raises(DistillError, match=rf"line 20003 has the byte 0xff \(offset {len(head) + 4} in the file\)"):
        read_csv(path, "y")


def test_sequence_cut_off_at_the_end_is_located(tmp_path):
    raw = "a,b,y\n1,2,0\n3,4,é".encode()[:-1]  # the first byte of a two-byte sequence, then the end
    with pytest.raises(DistillError, match=rf"line 3 has the byte 0xc3 \(offset {len(raw) - 1} in the file\)"):
        read_csv(write(tmp_path, raw), "y")


def test_utf8_bom_is_stripped_and_utf8_labels_kept(tmp_path):
    raw = "\ufeffa,b,y\n" + "".join(f"{i},{i % 3},{'café' if i % 2 else 'naïve'}\n" for i in range(10))
    split = load_split(cfg(write(tmp_path, raw.encode())))
    assert split.classes == ["café", "naïve"] and split.feature_names == ["a", "b"]


# --- 2. fields and lines too long --------------------------------------------------------------------------------

def test_field_over_the_limit_names_line_and_column(tmp_path):
    path = write(tmp_path, "a,b,y\n1,2,0\n3," + "7" * 140_000 + ",1\n")
    with pytest.raises(DistillError, match=r"t\.csv line 3, column 'b': a field longer than 131072 characters; "
                                           "too long for a numeric table$"):
        load_split(cfg(path))


def test_unclosed_quote_is_suggested(tmp_path):
    path = write(tmp_path, 'a,b,y\n1,2,0\n3,"4,0\n' + "5,6,1\n" * 30_000)
    with pytest.raises(DistillError, match=r"line 3, column 'b': .*\(a quote that is never closed\?\)"):
        read_csv(path, "y")


def test_field_over_the_limit_in_the_header(tmp_path):
    with pytest.raises(DistillError, match=r"line 1, field 2: a field longer than"):
        read_csv(write(tmp_path, "a," + "h" * 140_000 + ",y\n1,2,0\n"), "y")


def test_line_over_max_line_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(csvread, "MAX_LINE", 1000)
    path = write(tmp_path, "a,b,y\n1,2,0\n" + "1," * 600 + "\n")
    with pytest.raises(DistillError, match=r"line 3 is longer than 1000 characters"):
        read_csv(path, "y")


field_text = st.text(alphabet='ab",', max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(field_text, min_size=1, max_size=6), st.integers(0, 4))
def test_long_field_locator_agrees_with_the_csv_module(cells, limit):
    text = ",".join(cells)
    fields = next(csv.reader([text]), [])
    long = [i for i, f in enumerate(fields) if len(f) > limit]
    if long:
        assert csvread._long_field(text, limit)[0] == long[0]


@pytest.mark.parametrize("text,expected", [
    ('"ab""cd",x', (0, True)), ('"ab"cd,x', (0, False)), ('a,"b,c', (1, True)), ('a"b"c', (0, False)),
])
def test_long_field_locator_knows_when_inside_quotes(text, expected):
    assert csvread._long_field(text, 2) == expected


# --- 3. not a regular file ---------------------------------------------------------------------------------------

def test_directory_is_refused(tmp_path):
    with pytest.raises(DistillError, match=rf"--csv: {tmp_path} is a directory; expected a regular CSV file"):
        load_split(cfg(str(tmp_path)))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe.csv")
    os.mkfifo(fifo)
    with deadline(3), pytest.raises(DistillError, match=r"pipe\.csv is a FIFO \(named pipe\)"):
        load_split(cfg(fifo))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_is_refused_at_once():
    with deadline(3), pytest.raises(DistillError, match=r"--csv: /dev/zero is a character device"):
        load_split(cfg("/dev/zero"))


def test_link_to_a_regular_file_is_followed(tmp_path):
    target = write(tmp_path, table([(i, i % 3) for i in range(12)]))
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert load_split(cfg(str(link))).n_classes == 2


# --- 4. no data rows ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["a,b,y\n", "a,b,y\n\n \n"])
def test_header_only_says_no_data_rows(tmp_path, text):
    with pytest.raises(DistillError, match=r"--csv: .*t\.csv has a header but no data rows"):
        load_split(cfg(write(tmp_path, text)))


# --- 5. standardisation ------------------------------------------------------------------------------------------

def strict_json(split):
    return json.loads(json.dumps(split.record(), allow_nan=False))


def plain_standardise(x, train_idx):
    """The textbook formula, in float64: constant columns divided by 1."""
    mean, std = x[train_idx].mean(0), x[train_idx].std(0)
    std[std == 0] = 1.0
    return (x - mean) / std, mean, std


@pytest.mark.parametrize("name", ["moons", "digits"])
def test_ordinary_data_standardise_bitwise_as_the_plain_formula(name):
    split = load_split(DistillConfig(dataset=name, steps=1, per_class=1), dtype=torch.float64)
    x, _ = data._builtin(name, 1500, 0.1, 0)
    z, mean, std = plain_standardise(np.asarray(x, dtype=np.float64), split.train_index)
    assert torch.equal(split.x_train, torch.from_numpy(z[split.train_index]))
    assert torch.equal(split.x_test, torch.from_numpy(z[split.test_index]))
    assert split.mean == mean.tolist() and split.std == std.tolist()


def test_statistics_in_column_blocks_match_one_block(monkeypatch):
    x = np.random.default_rng(1).standard_normal((200, 7)) * np.logspace(-3, 3, 7) + np.arange(7)
    idx = np.arange(0, 200, 3)
    whole = data._train_stats(x.copy(), idx)
    monkeypatch.setattr(data, "STATS_BLOCK_BYTES", 8 * len(idx) * 2)  # two columns per block, the last one alone
    blocks = data._train_stats(x.copy(), idx)
    for a, b in zip(whole, blocks):
        np.testing.assert_allclose(b, a, rtol=1e-14, atol=0)
    np.testing.assert_allclose(whole[0], x[idx].mean(0), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(whole[1], x[idx].std(0), rtol=1e-14)


def test_huge_column_standardises_to_unit_scale(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(float(s) * 1e300, float(v)) for s, v in zip(rng.choice([-1, 1], 40), rng.standard_normal(40))]
    split = load_split(cfg(write(tmp_path, table(rows))), dtype=torch.float64)
    rec = strict_json(split)
    a = [rows[i][0] for i in split.train_index]
    assert rec["mean"][0] == pytest.approx(statistics.mean(a), rel=1e-12, abs=1e-12 * 1e300)
    assert rec["std"][0] == pytest.approx(statistics.pstdev(a), rel=1e-12)
    za = split.x_train[:, 0]
    torch.testing.assert_close(za.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
    assert za.abs().max() < 3 and torch.isfinite(split.x_test).all()


def test_constant_column_standardises_to_exactly_zero(tmp_path):
    split = load_split(cfg(write(tmp_path, table([(0.1, float(i)) for i in range(30)]))))
    assert split.mean[0] == 0.1 and split.std[0] == 1.0
    assert (split.x_train[:, 0] == 0).all() and (split.x_test[:, 0] == 0).all()


def test_row_beyond_float32_after_standardising_names_the_column(tmp_path):
    rows = [(float(i % 5), float(i % 3)) for i in range(30)]
    test_row = load_split(cfg(write(tmp_path, table(rows)))).test_index[0]
    rows[test_row] = (1.0, 1e39)  # the training rows keep the std near 1
    path = write(tmp_path, table(rows), "far.csv")
    with pytest.raises(DistillError, match=r"--csv .*far\.csv: column 'b' does not fit float32 once standardised: "
                                           r"a row lies [\d.]+e\+39 training standard deviations"):
        load_split(cfg(path))
    split = load_split(cfg(path), dtype=torch.float64)
    assert torch.isfinite(split.x_test).all() and split.x_test.abs().max() > 1e38


def test_non_finite_statistics_are_refused(tmp_path, monkeypatch):
    def overflowing(x, train_idx):
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        std[1] = np.inf
        return mean, std
    monkeypatch.setattr(data, "_train_stats", overflowing)
    with pytest.raises(DistillError, match=r"column 'b' has a mean or standard deviation beyond float64"):
        load_split(cfg(write(tmp_path, table([(float(i), float(i)) for i in range(12)]))))


magnitudes = st.sampled_from([0.0, 5e-324, 1e-310, 1e-300, 1e-5, 1.0, 1e10, 1e154, 1e300, 1.7976931348623157e308])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(magnitudes, st.floats(-1, 1)), min_size=2, max_size=25), st.floats(-1e300, 1e300))
def test_train_stats_match_exact_rational_statistics(pairs, offset):
    with np.errstate(over="ignore"):
        col = np.array([m * f for m, f in pairs]) + offset
    assume(np.isfinite(col).all())
    x = np.column_stack([col, np.arange(len(col), dtype=np.float64)])
    idx = np.arange(len(col))
    mean, std = data._train_stats(x.copy(), idx)
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    if col.min() == col.max():
        assert mean[0] == col[0] and std[0] == 1.0
        return
    # float64 rounding of the mean bounds what the std can get right on a column of nearly equal values
    slack = 1e-13 * float(np.abs(col).max()) + 1e-320
    assert abs(mean[0] - statistics.mean(col.tolist())) <= slack
    ref = statistics.pstdev(col.tolist())
    assert abs(std[0] - ref) <= 1e-12 * ref + slack


extreme = st.sampled_from([0.0, 1e-300, -1e-300, 5e-324, 1.0, -2.5, 1e38, 1e39, 1e300, -1e300,
                           1.7976931348623157e308, -1.7976931348623157e308])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(extreme, extreme), min_size=12, max_size=12), st.sampled_from(["float32", "float64"]))
def test_any_accepted_table_records_finite_json(tmp_path_factory, rows, dtype):
    path = write(tmp_path_factory.mktemp("x"), table(rows))
    try:
        split = load_split(cfg(path), dtype=getattr(torch, dtype))
    except DistillError as exc:
        assert "column 'a'" in str(exc) or "column 'b'" in str(exc)
        return
    rec = strict_json(split)
    assert all(np.isfinite(rec["mean"])) and all(np.isfinite(rec["std"]))
    assert torch.isfinite(split.x_train).all() and torch.isfinite(split.x_test).all()


# --- 6. memory ---------------------------------------------------------------------------------------------------

def test_peak_memory_is_a_small_multiple_of_the_file(tmp_path):
    path = str(tmp_path / "big.csv")
    size = write_table(path, 50_000)
    assert size > 8 << 20
    m = peak_memory(path, timeout=300)
    assert m["rows"] == 50_000
    assert m["ratio"] < 5, m
