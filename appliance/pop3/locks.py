"""The POP3 maildrop locks every POP3 listener shares (Services.maildrop_locks). A module of its own: the
box makes them before its console answers, and the POP3 session (with the store it reads) is imported
only with the mail listeners, after the console (issue 15)."""

from __future__ import annotations


class MaildropLocks:
    """RFC 1939 8: the server locks the maildrop for one session. In memory: one process owns the
    store, and a lock that dies with the process cannot be left stale."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, mailbox: str) -> bool:
        if mailbox in self._held:
            return False
        self._held.add(mailbox)
        return True

    def release(self, mailbox: str) -> None:
        self._held.discard(mailbox)

    def __contains__(self, mailbox: str) -> bool:
        return mailbox in self._held
