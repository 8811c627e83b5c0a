"""Crash-safe files for session folders: atomic writes, one writer per folder, the user's umask.

* :func:`atomic_text` / :func:`atomic_npz` write a temporary file beside the target, fsync
  it, rename it into place and fsync the folder, so after a crash the target holds either
  the old or the new content, never a mix, and the rename itself is on disk.
* :class:`FolderLock` holds an exclusive ``flock`` on ``<folder>/.lock`` for as long as a
  session journals there, and writes the holder's pid and host into it. The kernel drops
  the lock when the process dies (kill -9 included), so a crashed session never leaves a
  stale lock behind; a second writer gets :class:`FolderLockedError` naming the holder.
* Files get the permissions a plain ``open`` would give (``0o666`` less the umask), not
  ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np

try:  # POSIX; elsewhere the lock falls back to an exclusive-create file (see FolderLock)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["FolderLock", "FolderLockedError", "atomic_npz", "atomic_text", "fsync_folder", "file_mode"]

_UMASK_LOCK = threading.Lock()
_UMASK: int | None = None


def file_mode() -> int:
    """The mode a new file gets from ``open`` under the process's umask (read once)."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return 0o666 & ~_UMASK


def fsync_folder(folder: "str | Path") -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: str, path: Path) -> None:
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path`` atomically and durably."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        _replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderLockedError(RuntimeError):
    """Another live process (or another session in this one) journals to the folder."""


class FolderLock:
    """An exclusive lock on ``<folder>/.lock`` held until :meth:`release` (or process exit).

    POSIX ``flock`` locks belong to the open file, so the lock also excludes a second
    session object in the same process, and the kernel releases it when the holder dies.
    Without ``fcntl`` the lock file is created exclusively and removed on release; a lock
    left by a crashed process must then be removed by hand (the error says which file).
    """

    NAME = ".lock"

    def __init__(self, folder: "str | Path") -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8").split()
        except OSError:
            text = []
        if len(text) >= 2:
            return f"pid {text[0]} on {text[1]}"
        return "another process"

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                raise FolderLockedError(f"{self.folder}: session is open elsewhere ({self._holder()}); "
                                        f"if that process is gone, remove {self.path}") from None
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FolderLockedError(f"{self.folder}: session is open elsewhere ({self._holder()})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:  # pragma: no cover - the folder was removed under us
            pass
        if fcntl is None:  # pragma: no cover
            self.path.unlink(missing_ok=True)
        os.close(fd)  # closing drops the flock

    def __del__(self) -> None:  # a session dropped without close() frees its folder
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
