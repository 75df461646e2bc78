"""One `letterbox serve` per data directory: an advisory lock on the directory itself.

The lock is `flock` on an open descriptor of the data directory, so it needs no file of its own (none to
leave behind after a crash: the kernel drops it with the process) and it follows the directory, not its
path: after a restore swaps the directories, the box takes the lock on the restored one again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class DataDirInUse(Exception):
    """Another process (a running `letterbox serve`) holds the data directory."""


class DataDirLock:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DataDirInUse at once (never wait: a second box must not start)."""
        self.release()
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(
                f"letterbox serve is already running on {self.root} (stop it first)") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def data_dir_in_use(root: Path) -> bool:
    """True while a `letterbox serve` holds `root` (a missing directory is not in use)."""
    try:
        lock = DataDirLock(root)
        lock.acquire()
    except DataDirInUse:
        return True
    except FileNotFoundError:
        return False
    lock.release()
    return False
