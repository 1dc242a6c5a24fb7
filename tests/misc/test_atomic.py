"""atomic_open: readers see the old file or the whole new one; a failed write names the file meant."""
import errno
import os
import tempfile

import pytest

from torchopt_ext._atomic import atomic_open


def test_disk_full_keeps_the_old_file_and_names_it_not_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")
    real = tempfile.mkstemp

    def on_full_disk(*a, **k):  # the temporary is created, but its writes go to /dev/full (ENOSPC)
        fd, tmp = real(*a, **k)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp
    monkeypatch.setattr(tempfile, "mkstemp", on_full_disk)
    with pytest.raises(OSError) as e:
        with atomic_open(str(path)) as fh:
            fh.write("new")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_an_error_of_the_caller_keeps_the_old_file_and_passes_through(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    other = OSError(errno.ENOENT, "No such file or directory", "/somewhere/else")
    for exc in (ValueError("bug"), other):
        with pytest.raises(type(exc)) as e:
            with atomic_open(str(path)) as fh:
                fh.write("partial")
                raise exc
        assert e.value is exc  # an error about another file keeps its own name
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    path = tmp_path / "f.txt"
    with atomic_open(str(path)) as a, atomic_open(str(path)) as b:
        assert len([n for n in os.listdir(tmp_path) if n.startswith(".f.txt.")]) == 2
        a.write("A" * 10000)
        b.write("B" * 10000)
    assert path.read_text() == "A" * 10000  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["f.txt"]


def test_new_file_gets_umask_permissions_and_options_reach_open(tmp_path):
    path = tmp_path / "f.csv"
    umask = os.umask(0o022)
    try:
        with atomic_open(str(path), "w", newline="", encoding="utf-8") as fh:
            fh.write("é\r\n")
    finally:
        os.umask(umask)
    assert path.read_bytes() == "é\r\n".encode() and (path.stat().st_mode & 0o777) == 0o644
