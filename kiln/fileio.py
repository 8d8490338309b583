"""Kiln's one way to write a file: atomic, durable, with the process umask's mode, no litter.

``atomic_write(path, data, what)`` writes `data` to a temp file in the target's folder, fsyncs it,
gives it the mode an ordinary ``open(path, "w")`` would (0o666 & ~umask; mkstemp's own 0o600 would
surprise), and renames it over `path`: readers see the old file or the new one, never half of one.
The temp file is removed on any failure, and also when SIGINT or SIGTERM arrives during the write
(in the main thread the two signals are held back while writing; once the temp file is gone the
signal is delivered as it would have been: the previous handler runs, or KeyboardInterrupt /
SystemExit(128 + signum) for the default action).

Every failure a user can cause (missing or unwritable folder, a target that is a folder, disk full)
is a KilnError with one line naming the path, never an OSError.
"""
from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
from typing import Any

from kiln.errors import KilnError

__all__ = ["atomic_write", "check_writable", "current_umask"]

CHUNK = 1 << 20  # bytes per write call; a pending signal is noticed between chunks
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _describe(e: OSError, path: str, folder: str) -> str:
    """One line for an OSError met while writing `path`."""
    if e.errno == errno.ENOENT:
        return f"folder {folder} does not exist"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"folder {folder} is not writable"
    if e.errno == errno.ENOTDIR:
        return f"{folder} is not a folder"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder"
    if e.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the device of {folder}"
    return (e.strerror or type(e).__name__).splitlines()[0]


def check_writable(path: str | os.PathLike, what: str) -> str:
    """Refuse, before any work, a target `atomic_write` could not write; returns the absolute path.

    Refused: a path that is a folder, a folder that does not exist or is not a folder, a folder the
    process may not write into. (Checked with os.access: as root an 0o500 folder is writable.)
    """
    path = os.fspath(path)
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise KilnError(f"cannot write {what} {path}: it is a folder")
    if not os.path.exists(folder):
        # walk up: the first existing ancestor tells "missing" from "under a regular file"
        up = folder
        while up and not os.path.exists(up) and os.path.dirname(up) != up:
            up = os.path.dirname(up)
        if os.path.exists(up) and not os.path.isdir(up):
            raise KilnError(f"cannot write {what} {path}: {up} is not a folder")
        raise KilnError(f"cannot write {what} {path}: folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise KilnError(f"cannot write {what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KilnError(f"cannot write {what} {path}: folder {folder} is not writable")
    return full


def _write_chunk(fd: int, chunk: memoryview) -> int:
    """One write call (a seam for tests that need a slow write)."""
    return os.write(fd, chunk)


class _SignalGuard:
    """Holds SIGINT/SIGTERM back while active (main thread only): the handler only records the signal."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.saved: dict[int, Any] = {}  # signal -> the handler before ours
        self.installed = False
        self.pending: tuple[int, Any] | None = None

    def _record(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            self.pending = (signum, frame)

    def __enter__(self) -> "_SignalGuard":
        if not self.active:
            return self
        for s in _SIGNALS:
            try:
                prev = signal.getsignal(s)
                if prev is None or prev == signal.SIG_IGN:
                    continue  # an ignored signal stays ignored; a handler set outside Python is left alone
                signal.signal(s, self._record)
                self.saved[s] = prev
            except (ValueError, OSError):  # not the main interpreter, or the platform refuses
                pass
        self.installed = True
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.restore()
        if exc_type is not None and self.pending is not None:
            self.deliver("", "", True)  # the signal wins over the exception in flight

    def restore(self) -> None:
        if not self.installed:
            return
        self.installed = False
        for s, prev in self.saved.items():
            try:
                signal.signal(s, prev)
            except (ValueError, OSError, TypeError):
                pass

    def deliver(self, what: str, path: str, completed: bool) -> None:
        """After cleanup: act on a recorded signal as the process would have without the guard."""
        if self.pending is None:
            return
        signum, frame = self.pending
        self.pending = None
        prev = self.saved.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)  # e.g. signal.default_int_handler raises KeyboardInterrupt
        elif signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)
        if not completed:  # a handler chose to carry on, but the file was not written
            raise KilnError(f"writing {what} {path} was interrupted by {signal.Signals(signum).name}; "
                            f"nothing was written")


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview, what: str = "file") -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename).

    what: names the file in error messages ("plan", "timing cache"). Errors: KilnError, one line.
    """
    path = os.fspath(path)
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise KilnError(f"cannot write {what} {path}: it is a folder")
    view = memoryview(data).cast("B")
    mode = 0o666 & ~current_umask()
    guard = _SignalGuard()
    tmp: str | None = None
    completed = False
    error: KilnError | None = None
    with guard:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(full)}.", suffix=".tmp", dir=folder)
            try:
                off = 0
                while off < len(view) and guard.pending is None:
                    off += _write_chunk(fd, view[off:off + CHUNK])
                if guard.pending is None:
                    os.fchmod(fd, mode)
                    os.fsync(fd)
            finally:
                os.close(fd)
            if guard.pending is None:
                os.replace(tmp, full)
                completed = True
                _fsync_dir(folder)
        except OSError as e:
            error = KilnError(f"cannot write {what} {path}: {_describe(e, path, folder)}")
        finally:
            if not completed:
                _remove(tmp)
    guard.deliver(what, path, completed)
    if error is not None:
        raise error


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
