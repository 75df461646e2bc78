"""How a command that failed in the store (or in reading a message for FETCH) is answered.

The one translation from the store's errors to tagged IMAP replies; the session runs every command
inside `store_errors`, so a handler lets a StoreError through and the client gets NO with the
response code RFC 5530 names for it, never a traceback. Handlers still catch a store error where it
changes what the command does (APPEND takes back what it appended, LIST-STATUS skips a folder that
vanished), and let it go on afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from appliance.imap.errors import ImapNo
from appliance.imap.fetch import NoSuchPart, UnknownCte
from appliance.store.model import FolderExists, NoSuchFolder, QuotaExceeded, StoreError

# RFC 3501 6.3.11 / 6.4.7 (and RFC 6851 for MOVE): a target folder that does not exist is answered
# NO [TRYCREATE], so the client may create it and try again; everywhere else RFC 5530 NONEXISTENT.
MissingFolderCode = Literal["NONEXISTENT", "TRYCREATE"]


@contextmanager
def store_errors(command_name: str, missing_folder: MissingFolderCode = "NONEXISTENT") -> Iterator[None]:
    """Run a command's store calls; a store error leaves as the ImapNo that answers it."""
    try:
        yield
    except NoSuchFolder:
        raise ImapNo("Mailbox does not exist", missing_folder) from None
    except FolderExists:
        raise ImapNo("Mailbox already exists", "ALREADYEXISTS") from None
    except QuotaExceeded:
        raise ImapNo("Quota exceeded", "OVERQUOTA") from None
    except StoreError as exc:
        # The store's messages are written to be shown to a user (StoreError).
        raise ImapNo(str(exc) or f"{command_name} failed", "CANNOT") from None
    except UnknownCte:
        raise ImapNo("Unknown Content-Transfer-Encoding", "UNKNOWN-CTE") from None  # RFC 3516 4.3
    except NoSuchPart:
        raise ImapNo("No such part", "CANNOT") from None
