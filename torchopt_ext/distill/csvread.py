"""The user's CSV table (a header row, numeric feature columns, one target column), read in one streaming pass."""
import codecs
import csv
import math
import os
import stat
from array import array
from operator import itemgetter

import numpy as np

from torchopt_ext.distill.config import DistillError

MAX_LINE = 1 << 24  # characters: bounds what a file without line breaks can take before it is refused
_MISSING = ("", "na", "nan", "null", "none")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_csv(path, target):
    """Features (n, d) float64, the n target labels (str) and the d feature names; errors name the line and column.

    Rows are parsed as they are read, so the peak memory is about the float64 table plus one row."""
    _check_regular(path)
    record = []  # the physical lines of the row being parsed
    header = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(_lines(fh, path, record))
            try:
                header, t, features = _header(next(reader, None), path, target)
                record.clear()
                width = len(header)
                fields = _picker([i for i in range(len(header)) if i != t])
                values, labels, seen = array("d"), [], {}
                for row in reader:
                    line = reader.line_num - len(record) + 1
                    record.clear()
                    try:
                        vals = list(map(float, fields(row))) if len(row) == width else None
                    except ValueError:
                        vals = None
                    label = row[t].strip() if vals is not None else ""
                    # one finite sum proves every value finite; anything else takes the checking path
                    if not label or not math.isfinite(sum(vals)):
                        checked = _checked_row(row, line, header, t, path, target)
                        if checked is None:
                            continue  # blank line
                        vals, label = checked
                    values.extend(vals)
                    labels.append(seen.setdefault(label, label))  # few distinct labels: share one string each
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc) from None
            except csv.Error as exc:
                raise _csv_error(path, exc, record, reader.line_num - len(record) + 1, header) from None
    except OSError as exc:
        raise DistillError(f"--csv: cannot read {path}: {exc.strerror}") from None
    if not labels:
        raise DistillError(f"--csv: {path} has a header but no data rows; expected a header row then data rows")
    return np.frombuffer(values, dtype=np.float64).reshape(len(labels), len(features)), labels, features


def _check_regular(path):
    # a FIFO blocks open() and a device such as /dev/zero never ends: refuse them before opening
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DistillError(f"--csv: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise DistillError(f"--csv: {path} is {kind}; expected a regular CSV file")


def _lines(fh, path, record):
    """The lines of fh for csv.reader, each also appended to record; a line over MAX_LINE characters is refused."""
    n = 0
    while line := fh.readline(MAX_LINE + 1):
        n += 1
        if len(line) > MAX_LINE:
            raise DistillError(f"--csv: {path} line {n} is longer than {MAX_LINE} characters; expected a CSV "
                               "table with one row per line")
        record.append(line)
        yield line


def _header(row, path, target):
    """(header, index of the target, feature names) from the first row."""
    if not row:
        raise DistillError(f"--csv: {path} is empty; expected a header row then data rows")
    header = [h.strip() for h in row]
    if target not in header:
        raise DistillError(f"--target: column {target!r} not in {path}; columns are {header}")
    t = header.index(target)
    features = [h for i, h in enumerate(header) if i != t]
    if not features:
        raise DistillError(f"--csv: {path} has no feature columns besides the target {target!r}")
    return header, t, features


def _picker(idx):
    """row -> the fields at idx, as a sequence (itemgetter alone returns a bare field for one index)."""
    get = itemgetter(*idx)
    return get if len(idx) > 1 else (lambda row: (get(row),))


def _checked_row(row, line, header, t, path, target):
    """(values, label) of one row, checking each field in order; None for a blank line."""
    if not any(c.strip() for c in row):
        return None
    if len(row) != len(header):
        raise DistillError(f"--csv: {path} line {line} has {len(row)} fields, expected {len(header)}")
    label = row[t].strip()
    if label == "":
        raise DistillError(f"--csv: missing value in target column {target!r} at line {line}")
    vals = []
    for i, cell in enumerate(row):
        if i == t:
            continue
        cell = cell.strip()
        if cell.lower() in _MISSING:
            raise DistillError(f"--csv: missing value in column {header[i]!r} at line {line}; "
                               "expected every feature filled (impute or drop the row first)")
        try:
            v = float(cell)
        except ValueError:
            raise DistillError(f"--csv: non-numeric value {cell!r} in column {header[i]!r} at line {line}; "
                               "expected numbers (encode categorical features first)") from None
        if not math.isfinite(v):
            raise DistillError(f"--csv: non-finite value {cell!r} in column {header[i]!r} at line {line}")
        vals.append(v)
    return vals, label


def _not_utf8(path, exc):
    where = _first_bad_byte(path)
    if where is None:  # the file changed since the failed read
        return DistillError(f"--csv: {path} is not UTF-8 ({exc.reason}); re-save it as UTF-8")
    line, offset, byte = where
    return DistillError(f"--csv: {path} is not UTF-8: line {line} has the byte 0x{byte:02x} (offset {offset} in "
                        "the file), which UTF-8 cannot decode; re-save the file as UTF-8 (a spreadsheet's "
                        "'CSV UTF-8'); other encodings are not guessed")


def _first_bad_byte(path):
    """(line, byte offset, byte) of the first byte of the file that is not valid UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    # latin-1 maps each byte to one character, so lines split as in read_csv and lengths count bytes
    with open(path, encoding="latin-1", newline="") as fh:
        while True:
            piece = fh.readline(MAX_LINE + 1)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished sequence carried from the last piece
            try:
                decoder.decode(piece.encode("latin-1"), final=not piece)
            except UnicodeDecodeError as exc:
                return line, offset - pending + exc.start, exc.object[exc.start]
            if not piece:
                return None
            offset += len(piece)
            line += piece[-1] in "\r\n"


def _csv_error(path, exc, record, line, header):
    if "field larger than field limit" not in str(exc):
        return DistillError(f"--csv: {path} line {line}: {exc}")
    limit = csv.field_size_limit()
    col, in_quotes = _long_field("".join(record), limit)
    where = f"column {header[col]!r}" if header is not None and col < len(header) else f"field {col + 1}"
    hint = " (a quote that is never closed?)" if in_quotes else ""
    return DistillError(f"--csv: {path} line {line}, {where}: a field longer than {limit} characters{hint}; "
                        "too long for a numeric table")


def _long_field(text, limit):
    """(index, inside quotes) of the first field of a CSV record with more than limit characters, following the
    csv module's default dialect (doubled quotes, text after a closing quote kept); the record is known to have one."""
    col, n, state = 0, 0, "start"
    for ch in text:
        if state == "quoted":
            if ch == '"':
                state = "quote"
                continue
        elif state == "quote":  # just after a quote inside a quoted field
            if ch == '"':
                state = "quoted"  # a doubled quote is one literal quote
            elif ch == ",":
                col, n, state = col + 1, 0, "start"
                continue
            else:
                state = "plain"
        elif ch == ",":
            col, n, state = col + 1, 0, "start"
            continue
        elif ch == '"' and state == "start":
            state = "quoted"
            continue
        else:
            state = "plain"
        n += 1
        if n > limit:
            return col, state in ("quoted", "quote")
    return col, state in ("quoted", "quote")
