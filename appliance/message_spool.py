"""The part of an incoming message past SPOOL_AFTER_OCTETS, on disk while it arrives.

SMTP DATA kept a whole message in memory while it came, and a message may take 30 minutes to come
(limits.MAX_DATA_SECONDS): a few slow senders each holding 36 MiB filled the box's budget for messages
being received (appliance/message_memory.py), and every other sender got 452 4.3.1 until they
stopped. Postfix writes each message to its queue file as it arrives. Here the first
SPOOL_AFTER_OCTETS stay in memory (most mail is smaller: its path is as before) and the rest goes to
a file in <data>/tmp, on the same file system as the Maildirs and the queue, so the disk reserve
(appliance/disk_full.py) judges it. IMAP APPEND's literals past the same bound go there too
(imap/server.py), for the same reason: a logged-in client trickling a 64 MiB message held it all.

The file is made with O_TMPFILE: it has no name from the start, so a client that goes, a timeout, a
refusal or a crash leaves nothing behind (closing the descriptor frees the octets). Where the file
system cannot (O_TMPFILE is Linux's, on ext4, xfs, btrfs, tmpfs), a named file is unlinked at once;
what a crash could leave between the two is removed at start (clean_stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import secrets
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from appliance.disk_full import is_disk_full
from appliance.message_memory import Hold

log = logging.getLogger("letterbox.spool")
T = TypeVar("T")

# 256 KiB: under it a message is read as before (the bench's SMTP rows, most mail). Over it, a DATA
# holds at most this much of the box's memory however long it trickles: the MX listener's 500
# connections together hold at most 125 MiB, half the budget (a network, 100 connections, 25 MiB),
# so senders on port 25 alone can no longer fill it.
SPOOL_AFTER_OCTETS = 256 * 1024
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


def _open_unlinked(directory: Path) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(directory, flags | os.O_TMPFILE, 0o600)
    except OSError as exc:
        if exc.errno not in _NO_TMPFILE:
            raise
    path = directory / f"incoming.{secrets.token_hex(8)}"
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


class SpoolFile:
    """One message's spooled octets; blocking methods, called through asyncio.to_thread."""

    def __init__(self, directory: Path) -> None:
        self._fd = _open_unlinked(directory)
        self.octets = 0

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.octets += len(data)

    def read_after(self, head: bytes | bytearray) -> bytearray:
        """`head` and then the file's octets, in one buffer allocated once and filled in place."""
        buffer = bytearray(len(head) + self.octets)
        buffer[: len(head)] = head
        with memoryview(buffer) as view:
            done = len(head)
            while done < len(buffer):
                got = os.preadv(self._fd, [view[done:]], done - len(head))
                if got <= 0:
                    raise OSError(errno.EIO, "the spooled message is shorter than written")
                done += got
        return buffer

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SpoolRefusal(enum.Enum):
    """Why a Spill took no more; each protocol says it in its own words after the message has come."""

    BUSY = "the box's bound of spooled octets is reached"  # message_memory.Hold.spool
    DISK_FULL = "the data disk keeps too little"  # disk_full.room_for, or ENOSPC and its kin
    FAILED = "the spool file could not be written"


class Spill:
    """Where a message's octets past `after` go (SMTP DATA, IMAP APPEND's literals): a spool file in `directory`, its octets counted by
    `hold`, while `room(n)` says the data disk keeps its reserve with n more (disk_full.room_for)."""

    def __init__(self, directory: Path, hold: Hold, room: Callable[[int], bool],
                 after: int = SPOOL_AFTER_OCTETS, what: str = "DATA") -> None:
        self.directory = directory
        self.what = what  # the command, in the log's lines (IMAP's APPEND spools its literals too)
        self.hold = hold
        self.room = room
        self.after = after
        self.file: SpoolFile | None = None
        self._busy: asyncio.Future[Any] | None = None  # the worker thread's call on the file

    async def in_thread(self, work: Callable[[], T]) -> T:
        """`work` in a worker thread; a cancelled caller (the client went) leaves it to finish, and
        close() waits for it: the descriptor is never closed under a write (its number could be
        another file's by then)."""
        self._busy = asyncio.ensure_future(asyncio.to_thread(work))
        result: T = await asyncio.shield(self._busy)
        return result

    async def write(self, chunk: bytes | bytearray) -> SpoolRefusal | None:
        """None once `chunk` is in the file, else the refusal to give once the message has come."""
        if not self.hold.spool(len(chunk)):  # the box's bound of spooled octets (message_memory.py)
            return SpoolRefusal.BUSY
        return await self.in_thread(partial(self._write, chunk))

    def _write(self, chunk: bytes | bytearray) -> SpoolRefusal | None:
        if not self.room(len(chunk)):
            log.warning("%s refused while spooling: the disk is nearly full", self.what)
            return SpoolRefusal.DISK_FULL
        try:
            if self.file is None:
                self.file = SpoolFile(self.directory)
            self.file.write(chunk)
        except OSError as exc:
            if is_disk_full(exc):
                log.warning("%s refused while spooling: the disk is full (%s)", self.what, exc)
                return SpoolRefusal.DISK_FULL
            log.error("%s refused: cannot spool the message in %s: %s", self.what, self.directory, exc)
            return SpoolRefusal.FAILED
        return None

    async def read_after(self, head: bytearray) -> bytearray:
        """`head` and then the file's octets, as written (an IMAP literal has no dots to take out)."""
        assert self.file is not None
        return await self.in_thread(partial(self.file.read_after, head))

    def close(self) -> None:
        if self._busy is not None and not self._busy.done():
            self._busy.add_done_callback(self._closed_after)
            return
        if self.file is not None:
            self.file.close()
            self.file = None

    def _closed_after(self, busy: asyncio.Future[Any]) -> None:
        if not busy.cancelled() and busy.exception() is not None:
            log.warning("spooling a message whose client went failed: %s", busy.exception())
        self.close()


def clean_stale(directory: Path) -> int:
    """At start, before any listener: remove what an earlier run left in `directory` (named spool
    files a crash caught before their unlink). Returns how many went."""
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed
