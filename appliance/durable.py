"""Writes that survive a power cut, in the order DESIGN.md's storage rules give: a file's data is fsynced
before its name points at it, and the directory holding the name is fsynced after the rename. One
place for it: the Maildir (messages, dovecot-keywords, subscriptions), removed mailboxes (trash.py),
updates (their status.json too), TLS and DKIM keys each had a copy of their own, and dovecot-keywords was renamed into place
without its directory fsynced (a power cut could bring back the old keyword map after a STORE was
answered: a keyword's letter then named nothing, or another keyword once reused).

Errors are the callers': every function raises what the system call raised, except fsync_dir's
`quiet`, for a caller (trash.py) that moves on when a directory it syncs is gone."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | Path, *, quiet: bool = False) -> None:
    """The directory's entries (a rename, a link, an unlink in it) made durable. `quiet`: a directory
    that cannot be opened (gone meanwhile) is let be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if quiet:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """A file written by other code (a copy, a tool) made durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes | bytearray, *, mode: int = 0o600, exclusive: bool = True) -> None:
    """`data` written to `path` and fsynced (its name is not: see replace_file). `exclusive`: the file
    must not exist (a unique name); else it is truncated."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes | bytearray, *, tmp: Path | None = None, mode: int = 0o600,
                 prepare: Callable[[Path], None] | None = None) -> None:
    """Atomic and durable: `path` holds the old content or `data`, never half of either, after a crash
    or a power cut; once this returns, `data` stays. Written to `tmp` (beside `path`, in the same
    directory; `.NAME.tmp` when not given), fsynced, renamed over `path`, the directory fsynced. The
    file gets `mode` whatever the umask; `prepare(tmp)` runs just before the rename (letterbox-update,
    as root, gives the file to the box's user there)."""
    tmp = tmp if tmp is not None else path.with_name(f".{path.name}.tmp")
    write_file(tmp, data, mode=mode, exclusive=False)
    os.chmod(tmp, mode)
    if prepare is not None:
        prepare(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
