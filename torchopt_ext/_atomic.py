"""Writing a file so that a reader sees the old file or the whole new one, never a part of it."""
from __future__ import annotations

import collections
import contextlib
import os
import tempfile

KILL_AT = "TORCHOPT_EXT_TEST_KILL_AT"
_writes: collections.Counter = collections.Counter()


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **open_kwargs):
    """Yields a new file in ``path``'s folder; a clean exit flushes, syncs and renames it onto
    ``path``, an error removes it. The file gets an ordinary new file's permissions (the umask),
    not mkstemp's owner-only ones, so shared results and caches stay readable. Every call writes
    its own uniquely named temporary, so concurrent writers never write into one file.
    ``open_kwargs`` (encoding, newline) go to ``open``. An OSError from writing is raised with
    ``filename`` set to ``path``, so a message names the file the caller meant, not the temporary."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            _test_kill_hook(path, f.fileno())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(folder)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


def _sync_folder(folder: str) -> None:
    # the rename itself survives a power cut only once the folder's entry is on disk
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_kill_hook(path: str, fd: int) -> None:
    """Test hook, inert unless the environment sets it: ``TORCHOPT_EXT_TEST_KILL_AT=NAME`` (or
    ``NAME@N``) SIGKILLs this process at the first (N-th) write of a file named NAME, with half of
    the bytes in the temporary file and ``path`` untouched: a real crash in the middle of a write."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != os.path.basename(path):
        return
    _writes[name] += 1
    if _writes[name] == int(nth or 1):
        import signal
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
