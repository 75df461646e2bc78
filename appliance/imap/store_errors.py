"""How a command that failed in the store (or in reading a message for FETCH) is answered.

The one translation from the store's errors to tagged IMAP replies; the session runs every command
inside `store_errors`, so a handler lets a StoreError through and the client gets NO with the
response code RFC 5530 names for it, never a traceback. Handlers still catch a store error where it
changes what the command does (APPEND takes back what it appended, LIST-STATUS skips a folder that
vanished), and let it go on afterwards.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Literal

from appliance.disk_full import DISK_FULL_TEXT, is_disk_full
from appliance.imap.errors import ImapError, ImapNo
from appliance.imap.fetch import NoSuchPart, UnknownCte
from appliance.store.model import FolderExists, NoSuchFolder, QuotaExceeded, StoreError, TooManyFolders

# RFC 3501 6.3.11 / 6.4.7 (and RFC 6851 for MOVE): a target folder that does not exist is answered
# NO [TRYCREATE], so the client may create it and try again; everywhere else RFC 5530 NONEXISTENT.
MissingFolderCode = Literal["NONEXISTENT", "TRYCREATE"]

log = logging.getLogger("letterbox.imap")


class store_errors:  # (lower case: used as a function, `with store_errors(name):`)
    """Run a command's store calls; a store error leaves as the ImapNo that answers it. A class, not
    a @contextmanager: every command goes through two of them, and a generator's context manager
    cost 5-7 times as much as this (issue 19)."""

    __slots__ = ("command_name", "missing_folder")

    def __init__(self, command_name: str, missing_folder: MissingFolderCode = "NONEXISTENT") -> None:
        self.command_name = command_name
        self.missing_folder = missing_folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # Nothing raised, the command's own answer (an ImapError), or no Exception (a cancel): as it is.
        if exc is None or isinstance(exc, ImapError) or not isinstance(exc, Exception):
            return
        answer = _answer(exc, self.command_name, self.missing_folder)
        if answer is None:
            return  # a bug: the server logs it and says BYE
        raise answer from None


def _answer(exc: Exception, command_name: str, missing_folder: MissingFolderCode) -> ImapNo | None:
    if is_disk_full(exc):
        # Dovecot's answer, whether the file or the database found no room (the store's "cannot write
        # the message" included); what failed left nothing half-written, so the session goes on.
        log.warning("IMAP %s refused: the disk is full (%s)", command_name, exc)
        return ImapNo(DISK_FULL_TEXT, "OVERQUOTA")
    if isinstance(exc, NoSuchFolder):
        return ImapNo("Mailbox does not exist", missing_folder)
    if isinstance(exc, FolderExists):
        return ImapNo("Mailbox already exists", "ALREADYEXISTS")
    if isinstance(exc, QuotaExceeded):
        return ImapNo("Quota exceeded", "OVERQUOTA")
    if isinstance(exc, TooManyFolders):
        return ImapNo(str(exc), "LIMIT")  # RFC 5530 3
    if isinstance(exc, StoreError):
        # The store's messages are written to be shown to a user (StoreError).
        return ImapNo(str(exc) or f"{command_name} failed", "CANNOT")
    if isinstance(exc, UnknownCte):
        return ImapNo("Unknown Content-Transfer-Encoding", "UNKNOWN-CTE")  # RFC 3516 4.3
    if isinstance(exc, NoSuchPart):
        return ImapNo("No such part", "CANNOT")
    return None
