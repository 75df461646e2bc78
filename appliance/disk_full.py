"""A full disk told apart from other failures, so that each protocol answers it as what it is and the
session goes on: SMTP and LMTP `452 4.3.1 Insufficient system storage` (RFC 3463 X.3.1, Postfix's
words), IMAP `NO [OVERQUOTA] Not enough disk space` (Dovecot's), POP3 `-ERR [SYS/TEMP]`. Before, a
full data disk was a generic "451 local error" in SMTP and an IMAP session closed with BYE "Internal
server error" (seen with the data directory on a full file system).

New mail stops before the disk is full, as Postfix's does (it wants 1.5 times its message size limit
free): an SMTP/LMTP sender or an IMAP APPEND is refused while less than RESERVE_OCTETS (plus what the
message says it will take, plus the messages being received meanwhile: MessageMemory.others) is free,
and an SMTP/LMTP message once it has arrived, when the messages received with it leave less (452 4.3.1
after DATA). The part of a large SMTP message spooled as it comes (message_spool.py) is on the disk
already, and may take at most half the room above the reserve (smtp/data_phase.Spill, 452 4.3.1 after
the dot). Concurrent APPENDs, or DATA sent after MAIL FROM's check, each saw the room before any
of them was written, and together went below it. What is left is for reading and deleting mail: opening a folder,
setting flags and EXPUNGE write to the database too, and a user must be able to delete mail to make
room.

Sessions between MAIL FROM and DATA are not counted: nothing of theirs is on the disk or in memory
yet, and DATA's check, made before anything is written, counts every message then arriving. Holding
SIZE= announced at MAIL FROM would only refuse some of them sooner, and would let a client that
announces the largest size on many connections and sends nothing refuse everyone's mail; Postfix's
smtpd, one process per session, does not count other sessions' SIZE either."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from appliance.smtp.limits import MAX_MESSAGE_OCTETS

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_TEXT = "Not enough disk space"
RESERVE_OCTETS = MAX_MESSAGE_OCTETS * 3 // 2  # Postfix: 1.5 x message_size_limit


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether this error, or one it was raised from or during, is a file system or SQLite that had no
    room (ENOSPC, a disk quota, SQLITE_FULL: "database or disk is full")."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def room_for(directory: Path, octets: int = 0, reserve: int = RESERVE_OCTETS) -> bool:
    """Whether the file system of `directory` keeps `reserve` free once `octets` more are written (the
    space an unprivileged process may use: root's reserved blocks are not the box's). An error reading
    it says yes: the write itself will tell."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return True
    return stat.f_bavail * stat.f_frsize >= reserve + max(octets, 0)


def used_percent(used: int, available: int) -> int:
    """How full the disk is as `df` says it: of the space the box can use (what is used plus what is
    still available to a user other than root), not of the whole file system, whose blocks reserved for
    root the box, running as its own user, can never fill."""
    return -(-100 * used // (used + available)) if used + available else 0  # rounded up, as df does
