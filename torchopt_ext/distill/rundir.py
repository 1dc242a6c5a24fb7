"""The output directory of one run: created without races, used by one writer at a time.

The writer holds an exclusive OS advisory lock (``filelock``, flock on Unix) on ``DIR/.lock`` for
the whole run; the kernel drops it when the process ends, however it ends, so a lock file left by a
killed run is simply taken over. ``DIR/.lock.info`` says who holds it (pid, host, start time).
"""
import json
import os
import re
import socket
import time

from torchopt_ext._atomic import atomic_open
from torchopt_ext.distill.config import DistillError

LOCK = ".lock"
LOCK_INFO = ".lock.info"
CONFIG = "config.json"
# what a run writes before it has learned anything: a directory holding only these is not worth keeping
DISPOSABLE = {CONFIG, "split.json", "manifest.json", LOCK, LOCK_INFO}
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # atomic_open's mkstemp names


class RunLock:
    """The exclusive lock on ``out``; ``acquire`` raises DistillError when another process holds it."""

    def __init__(self, out: str):
        self.out = out
        self._lock = None

    def acquire(self) -> "RunLock":
        import filelock  # only the driver needs it: importing torchopt_ext does not
        lock = filelock.FileLock(os.path.join(self.out, LOCK), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise DistillError(in_use_message(self.out)) from None
        except OSError as exc:
            raise DistillError(f"--out: cannot lock {self.out} ({exc.strerror}); expected a writable "
                               "directory") from None
        self._lock = lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with atomic_open(os.path.join(self.out, LOCK_INFO), "w", encoding="utf-8") as fh:
                json.dump(info, fh)
        except BaseException:  # the caller gets no lock object to release
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:  # before unlocking: once unlocked, the info file may already be the next holder's
            os.unlink(os.path.join(self.out, LOCK_INFO))
        except OSError:
            pass
        self._lock.release()
        self._lock = None


def in_use_message(out: str) -> str:
    try:
        with open(os.path.join(out, LOCK_INFO), encoding="utf-8") as fh:
            info = json.load(fh)
        who = f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder may not have written it yet
        who = "pid unknown"
    return f"--out: {out} is in use by another run ({who}); wait for it or choose another --out"


def _held_by_another(out: str) -> bool:
    """Whether a live process holds ``out``'s lock; creates nothing in a directory that is not ours."""
    if not os.path.isfile(os.path.join(out, LOCK)):
        return False
    import filelock
    probe = filelock.FileLock(os.path.join(out, LOCK), timeout=0)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    except OSError:  # cannot even open it: say "exists", the safe answer
        return False
    probe.release()
    return False


def exists_message(out: str) -> str:
    if _held_by_another(out):
        return in_use_message(out)
    return (f"--out: {out} already exists; expected a new directory (nothing was overwritten). Pass --resume "
            "to continue that run, or choose another --out")


def check_new(out: str) -> None:
    """Everything about a new --out that can be checked before any work: raises DistillError."""
    if not out:
        raise DistillError("--out: expected a directory path, got ''")
    if os.path.lexists(out):
        raise DistillError(exists_message(out))
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DistillError(f"--out: the parent directory {parent} of {out} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DistillError(f"--out: cannot create {out}: the parent directory {parent} is not writable")


def create(out: str) -> RunLock:
    """Makes the new directory and locks it; a run that lost a race for the name gets the clean error."""
    try:
        os.mkdir(out)
    except FileExistsError:
        raise DistillError(exists_message(out)) from None
    except OSError as exc:
        raise DistillError(f"--out: cannot create {out}: {exc.strerror}") from None
    return RunLock(out).acquire()


def check_resumable(out: str) -> None:
    if not out:
        raise DistillError("--out: expected a directory path, got ''")
    if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, CONFIG)):
        raise DistillError(f"--resume: {out} is not a run directory (no {CONFIG}); expected the --out of "
                           "an earlier run")
    if not os.access(out, os.W_OK | os.X_OK):
        raise DistillError(f"--out: {out} is not writable; --resume needs to write there")


def open_existing(out: str) -> RunLock:
    """Locks an earlier run's directory for --resume."""
    check_resumable(out)
    return RunLock(out).acquire()


def remove_temporaries(out: str) -> list:
    """Deletes the temporary files of writers that died mid-write (call only while holding the lock)."""
    gone = []
    for name in sorted(os.listdir(out)):
        if _TEMPORARY.match(name) and os.path.isfile(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
            gone.append(name)
    return gone


def _only_temporaries(folder: str) -> bool:
    return os.path.isdir(folder) and all(_TEMPORARY.match(n) for n in os.listdir(folder))


def remove_if_disposable(lock: RunLock, disposable=DISPOSABLE, folders=()) -> bool:
    """Removes a new run's directory, and releases the lock, when it holds nothing worth keeping: only
    files named in ``disposable``, temporaries, and subfolders from ``folders`` holding only temporaries."""
    out = lock.out
    names = [n for n in os.listdir(out) if not _TEMPORARY.match(n)]
    empty = {f for f in folders if _only_temporaries(os.path.join(out, f))}
    if not set(names) <= set(disposable) | {LOCK, LOCK_INFO} | empty:
        return False
    remove_temporaries(out)
    for name in names:
        if name in empty:
            remove_temporaries(os.path.join(out, name))
            os.rmdir(os.path.join(out, name))
        elif name not in (LOCK, LOCK_INFO):
            os.unlink(os.path.join(out, name))
    lock.release()
    os.unlink(os.path.join(out, LOCK))
    os.rmdir(out)
    return True


def removed_note(out: str) -> str:
    """What a failed new run says after remove_if_disposable removed its directory."""
    return f"{out} was removed, as nothing worth keeping had been written"


def write_error(exc: OSError, out: str):
    """The one-line message for a write the system refused (disk full, read-only, quota: the user's to
    fix), with how to continue; None for an OSError that names no file, which is a bug to show in full."""
    if exc.filename is None or exc.strerror is None:
        return None
    reason = exc.strerror[:1].lower() + exc.strerror[1:]
    hint = ""
    if out and os.path.isfile(os.path.join(out, CONFIG)):
        hint = f"; once that is fixed, continue with --resume --out {out}"
    return f"cannot write {exc.filename}: {reason}{hint}"
