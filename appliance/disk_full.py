"""A full disk told apart from other failures, so that each protocol answers it as what it is and the
session goes on: SMTP and LMTP `452 4.3.1 Insufficient system storage` (RFC 3463 X.3.1, Postfix's
words), IMAP `NO [OVERQUOTA] Not enough disk space` (Dovecot's), POP3 `-ERR [SYS/TEMP]`. Before, a
full data disk was a generic "451 local error" in SMTP and an IMAP session closed with BYE "Internal
server error" (seen with the data directory on a full file system)."""

from __future__ import annotations

import errno
import sqlite3

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_TEXT = "Not enough disk space"


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
