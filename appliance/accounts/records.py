"""The values the accounts layer hands out (never rows of the database)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MailboxInfo:
    address: str  # canonical: lower-case local part @ lower-case A-label domain
    display_name: str
    quota_bytes: int  # 0 = unlimited
    enabled: bool
    created_at: int

@dataclass(frozen=True)
class AliasInfo:
    source: str  # 'name@domain', or '@domain' for a catch-all
    targets: tuple[str, ...]

@dataclass(frozen=True)
class Resolution:
    """Where mail for one address goes after alias expansion. Both empty = unknown recipient."""

    mailboxes: tuple[str, ...]  # canonical local mailbox addresses
    forwards: tuple[str, ...]  # external addresses
    # Both empty, why: "loop" (an alias chain back to an earlier alias of it) or "too deep" (past
    # MAX_ALIAS_DEPTH or MAX_EXPANSION): the box's misconfiguration, not an unknown user, and the
    # refusal says so. "" otherwise.
    stopped: str = ""

@dataclass(frozen=True)
class Credentials:
    """What auth.py needs to check a login; never leaves the process."""

    name: str  # canonical mailbox address or admin name
    password_hash: str
    enabled: bool
