"""Domains, mailboxes, aliases and address resolution: the one place that knows who lives here.

Rules every caller can rely on:
- Addresses are compared in their canonical form (appliance.address): lower-case local part, lower-case
  A-label domain. Mailbox local parts are restricted further (MAILBOX_LOCAL_PART) because they name a
  directory under mail/.
- resolve(address) follows Postfix's virtual alias semantics: an exact alias wins over a mailbox of the
  same name (so `alice -> alice, alice@elsewhere` keeps a copy and forwards); then the exact mailbox;
  then, for `base+tag`, the alias or mailbox `base`; then the catch-all `@domain`. An alias target that
  is already being expanded (a self-reference or a loop) delivers to the mailbox of that name if there is
  one and is otherwise dropped with a warning, so a loop never hangs and mail goes where it can.
- Only addresses in local domains resolve. resolve() of a remote address is empty: forwards only come
  from aliases, so nothing here can make the box an open relay.
- A disabled mailbox still receives mail (as Postfix and Mail-in-a-Box do); it only cannot log in.
- An alias never has the address of a mailbox, nor a mailbox that of an alias (issue 10 item 10): such
  an alias would silently take all of that person's mail and let its targets send as them. Aliases made
  by an earlier version keep working by the rule above.
- Removing a mailbox moves its Maildir aside (appliance/store/trash.py), so a mailbox created later
  under the same address starts empty; removing a domain moves its DKIM keys aside the same way.
  Row ids are never reused (migration 0007), so nothing keyed by an id can reach a new owner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import sqlite3
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosqlite
from argon2 import PasswordHasher

from appliance import dkim_keys, passwords
from appliance.account_errors import (
    AccountError,
    AlreadyExists,
    InUse,
    InvalidAddress,
    NotFound,
    WeakPassword,
)
from appliance.address import Address, parse_address, parse_domain, split_plus
from appliance.config import DataLayout
from appliance.db import Database
from appliance.store import trash
from appliance.web_sessions import end_account_sessions

log = logging.getLogger("letterbox.accounts")

MAX_ALIAS_DEPTH = 20  # a chain of aliases longer than this is treated as a loop
MAX_EXPANSION = 1000  # addresses one resolve() may visit; bounds the work a crafted alias graph causes
MAX_ALIAS_TARGETS = 200
MAX_DISPLAY_NAME = 200
MAX_ADMIN_NAME = 64
# Mailbox local parts name a directory (mail/<domain>/<local>/), so only a path-safe subset of
# RFC 5321 atext: no '/', no quoting, nothing non-ASCII. Dot rules come from the dot-string syntax.
_MAILBOX_LOCAL_PART = re.compile(r"[a-z0-9_][a-z0-9._+-]*")
# Admin names never contain '@': the login form tells admins from mailbox owners by it, so an admin
# named with one could never log in. The one rule for the wizard, the CLI and the console.
_ADMIN_NAME = re.compile(r"[a-z0-9_][a-z0-9._-]*")

__all__ = [
    "AccountError", "Accounts", "AliasInfo", "AlreadyExists", "Credentials", "InUse", "InvalidAddress",
    "MailboxInfo", "NotFound", "Resolution", "WeakPassword",
]


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


@dataclass(frozen=True)
class Credentials:
    """What auth.py needs to check a login; never leaves the process."""

    name: str  # canonical mailbox address or admin name
    password_hash: str
    enabled: bool


@dataclass
class _Expansion:
    """The state of one resolve(): results in discovery order, and what has been visited."""

    use_catch_all: bool
    mailboxes: dict[str, None] = field(default_factory=dict)
    forwards: dict[str, str] = field(default_factory=dict)  # canonical -> as written
    expanded: set[str] = field(default_factory=set)
    visits: int = 0
    warned: bool = False


# --- input checks (pure) -------------------------------------------------------------------------------

def mail_domain(name: str) -> str:
    """A DNS name that can be a mail domain or a host name: A-label, lower-case, its last label not all
    digits; never an address literal or a bare IP address (issue 10 item 8). new_mail_domain() adds
    the rules for a domain of this box."""
    text = name.strip()
    if text.startswith("["):
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (an address literal cannot be a mail domain)")
    if _is_ip_address(text):
        raise InvalidAddress(
            f"not a valid domain name: {name[:80]!r} (an IP address cannot be a mail domain; enter a name like example.org)"
        )
    domain = parse_domain(text)
    labels = domain.split(".")
    # RFC 3696 2: a top-level domain is never all-numeric, so '10.0.0.1' or '1.2.3.4.5' is not a
    # domain name even though each label is valid on its own.
    if labels[-1].isdigit():
        raise InvalidAddress(
            f"not a valid domain name: {name[:80]!r} (the last part cannot be a number; an IP address cannot be a mail domain)"
        )
    return domain


def new_mail_domain(name: str) -> str:
    """The one check of a domain added to the box, whether by the wizard, the console or the CLI (all
    through Accounts.add_domain): mail_domain() and at least two labels, since mail for a one-label
    name ('localhost', 'mail') can never come from outside."""
    domain = mail_domain(name)
    if "." not in domain:
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (a mail domain has at least one dot, e.g. example.org)")
    return domain


def stored_domain(name: str) -> str:
    """The canonical spelling of a domain to look up: lenient where mail_domain is strict, so a
    domain an earlier version accepted (an IP address, one label) can still be found and removed."""
    if name.strip().startswith("["):
        raise InvalidAddress(f"not a valid domain name: {name[:80]!r} (an address literal cannot be a mail domain)")
    return parse_domain(name.strip())


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.rstrip("."))
    except ValueError:
        return False
    return True


def mailbox_address(address: str) -> Address:
    """Parse an address meant to be a mailbox of this box, with the stricter local-part rule."""
    addr = parse_address(address)
    if addr.is_literal:
        raise InvalidAddress(f"not a valid mailbox address: {address[:80]!r} (an address literal is never local)")
    local = addr.local.lower()
    if not _MAILBOX_LOCAL_PART.fullmatch(local):
        raise InvalidAddress(
            f"not a valid mailbox address: {address[:80]!r} (mailbox names use letters, digits and . _ + -)"
        )
    return Address(local, addr.domain)


def _display_name(text: str) -> str:
    name = text.strip()
    if len(name) > MAX_DISPLAY_NAME:
        raise AccountError(f"the display name is longer than {MAX_DISPLAY_NAME} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise AccountError("the display name contains a control character")
    return name


def _quota(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AccountError(f"the quota must be a whole number of bytes, 0 for no limit (got {value!r})")
    return value


def admin_name_problem(username: str) -> str | None:
    """Why this cannot be an administrator's name (None: it can, as username.strip().lower())."""
    name = username.strip().lower()
    if not name:
        return "choose a name to log in with"
    if len(name) > MAX_ADMIN_NAME or not _ADMIN_NAME.fullmatch(name):
        return f"use letters, digits and . _ - only (at most {MAX_ADMIN_NAME}; no @)"
    return None


def _admin_name(username: str) -> str:
    problem = admin_name_problem(username)
    if problem:
        raise AccountError(f"not a valid admin name: {username.strip()[:80]!r}: {problem}")
    return username.strip().lower()


def _alias_source(source: str) -> tuple[str, str]:
    """(local part, domain) with '' as the local part of a catch-all '@domain'."""
    text = source.strip()
    if text.startswith("@"):
        return "", stored_domain(text[1:])
    addr = parse_address(text)
    if addr.is_literal:
        raise InvalidAddress(f"not a valid alias address: {source[:80]!r} (an address literal is never local)")
    return addr.local.lower(), addr.domain


def _source_label(local: str, domain: str) -> str:
    return f"{local}@{domain}"  # '' local part gives '@domain', the catch-all spelling


def _alias_targets(targets: Iterable[str], *, catch_all: bool) -> list[str]:
    """Normalised, de-duplicated targets. '@domain' (same local part, other domain) is for catch-alls."""
    if isinstance(targets, str):
        targets = [targets]
    seen: dict[str, str] = {}
    for raw in targets:
        text = raw.strip()
        if text.startswith("@"):
            if not catch_all:
                raise InvalidAddress(
                    f"not a valid alias target: {raw[:80]!r} (a bare @domain target is only for a catch-all)"
                )
            domain = mail_domain(text[1:])
            seen.setdefault(f"@{domain}", f"@{domain}")
            continue
        addr = parse_address(text)
        if addr.is_literal:
            raise InvalidAddress(f"not a valid alias target: {raw[:80]!r} (address literals are not allowed)")
        seen.setdefault(addr.canonical, str(addr))
    if not seen:
        raise AccountError("an alias needs at least one target address")
    if len(seen) > MAX_ALIAS_TARGETS:
        raise AccountError(f"an alias can have at most {MAX_ALIAS_TARGETS} targets")
    return list(seen.values())


def _now() -> int:
    return int(time.time())


async def _one(
    tx: aiosqlite.Connection, sql: str, params: Sequence[Any] | dict[str, Any] = ()
) -> sqlite3.Row | None:
    async with tx.execute(sql, params) as cur:
        return await cur.fetchone()


async def _refuse_hidden_mailbox(tx: aiosqlite.Connection, domain_id: int, local: str, label: str,
                                 targets: Sequence[str]) -> None:
    """An alias wins over a mailbox of the same name (resolve()), so one that does not deliver to the
    mailbox itself would silently take all of that person's mail (issue 10 item 10). Allowed only as an
    explicit forward that keeps a copy: the mailbox is one of its own targets."""
    if not local or await _one(
        tx, "SELECT 1 FROM mailboxes WHERE domain_id = ? AND local_part = ?", (domain_id, local)
    ) is None:
        return
    canonical = {t.lower() if t.startswith("@") else parse_address(t).canonical for t in targets}
    if label not in canonical:
        raise AlreadyExists(
            f"{label} is a mailbox: an alias of the same name would take all of its mail. Choose another name,"
            f" or, to forward its mail and keep a copy, include {label} itself among the targets"
        )


_MAILBOX_COLUMNS = (
    "m.local_part, d.name AS domain, m.display_name, m.quota_bytes, m.enabled, m.created_at"
    " FROM mailboxes m JOIN domains d ON d.id = m.domain_id"
)


def _mailbox_info(row: sqlite3.Row) -> MailboxInfo:
    return MailboxInfo(
        address=f"{row['local_part']}@{row['domain']}",
        display_name=str(row["display_name"]),
        quota_bytes=int(row["quota_bytes"]),
        enabled=bool(row["enabled"]),
        created_at=int(row["created_at"]),
    )


@dataclass(frozen=True)
class MailboxRecord:
    """What the mail store needs of a mailbox: its row id (never reused), quota and canonical parts."""

    id: int
    quota_bytes: int
    local: str
    domain: str


async def mailbox_record(db: Database, domain: str, local: str) -> MailboxRecord | None:
    """The mailbox `local`@`domain` as stored (parts already canonical), or None. A plain function on
    the database, not an Accounts method: the store calls it on its own connection, with no hasher."""
    row = await db.fetchone(
        "SELECT m.id, m.quota_bytes, m.local_part, d.name FROM mailboxes m JOIN domains d ON d.id = m.domain_id"
        " WHERE d.name = ? AND m.local_part = ?", (domain, local))
    return MailboxRecord(int(row[0]), int(row[1]), str(row[2]), str(row[3])) if row is not None else None


class Accounts:
    def __init__(self, db: Database, *, hasher: PasswordHasher | None = None, data: DataLayout | None = None) -> None:
        self._db = db
        # Where removals move mail and keys aside; None (unit tests of the db alone) leaves files be.
        self._data = data
        # One hasher for new hashes everywhere; auth.py rehashes old ones to these parameters.
        self.hasher = hasher or passwords.DEFAULT_HASHER

    # --- domains ---------------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> str:
        """Add a local mail domain; returns the canonical (A-label) name."""
        domain = new_mail_domain(name)
        async with self._db.transaction() as tx:
            if await _one(tx, "SELECT 1 FROM domains WHERE name = ?", (domain,)):
                raise AlreadyExists(f"domain {domain} already exists")
            await tx.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", (domain, _now()))
        log.info("domain added: %s", domain)
        return domain

    async def remove_domain(self, name: str) -> None:
        """Refused while the domain has mailboxes or aliases: removing mail by accident is worse. Its DKIM
        keys (and the empty mail/<domain>/) are moved aside under deleted/."""
        domain = stored_domain(name)
        files = self._domain_files(domain)
        entry: Path | None = None
        try:
            async with self._db.transaction() as tx:
                row = await _one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
                if row is None:
                    raise NotFound(f"no domain {domain}")
                counts = await _one(
                    tx,
                    "SELECT (SELECT COUNT(*) FROM mailboxes WHERE domain_id = :id) AS mailboxes,"
                    " (SELECT COUNT(*) FROM aliases WHERE domain_id = :id) AS aliases",
                    {"id": row["id"]},
                )
                assert counts is not None
                mailboxes, aliases = int(counts["mailboxes"]), int(counts["aliases"])
                if mailboxes or aliases:
                    raise InUse(
                        f"domain {domain} still has {mailboxes} mailbox(es) and {aliases} alias(es); remove them first"
                    )
                await tx.execute("DELETE FROM domains WHERE id = ?", (row["id"],))
                # The key in force goes with the domain; the same name added again gets a new one.
                await tx.execute("DELETE FROM settings WHERE key = ?", (dkim_keys.selector_setting(domain),))
                entry = await self._move_aside("domain", domain, files)
        except BaseException:
            await self._put_back(entry, files)
            raise
        log.info("domain removed: %s%s", domain, f" (its files moved to {entry})" if entry else "")

    async def list_domains(self) -> list[str]:
        rows = await self._db.fetchall("SELECT name FROM domains ORDER BY name")
        return [str(r["name"]) for r in rows]

    async def is_local_domain(self, name: str) -> bool:
        try:
            domain = stored_domain(name)
        except InvalidAddress:
            return False
        return await self._domain_id(domain) is not None

    async def _domain_id(self, domain: str) -> int | None:
        row = await self._db.fetchone("SELECT id FROM domains WHERE name = ?", (domain,))
        return int(row["id"]) if row else None

    async def _require_domain(self, domain: str) -> int:
        domain_id = await self._domain_id(domain)
        if domain_id is None:
            raise NotFound(f"unknown domain {domain}: add the domain first")
        return domain_id

    # --- mailboxes -------------------------------------------------------------------------------------

    async def add_user(
        self, address: str, password: str, *, display_name: str = "", quota_bytes: int = 0
    ) -> MailboxInfo:
        addr = mailbox_address(address)
        name = _display_name(display_name)
        quota = _quota(quota_bytes)
        problem = passwords.password_problem(password, address=addr.canonical)
        if problem:
            raise WeakPassword(problem)
        # Cheap refusals before the deliberately slow hash; checked again in the transaction.
        await self._require_domain(addr.domain)
        if await self.get_user(addr.canonical):
            raise AlreadyExists(f"mailbox {addr.canonical} already exists")
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        created = _now()
        async with self._db.transaction() as tx:
            row = await _one(tx, "SELECT id FROM domains WHERE name = ?", (addr.domain,))
            if row is None:
                raise NotFound(f"unknown domain {addr.domain}: add the domain first")
            if await _one(tx, "SELECT 1 FROM mailboxes WHERE domain_id = ? AND local_part = ?",
                          (row["id"], addr.local)):
                raise AlreadyExists(f"mailbox {addr.canonical} already exists")
            if await _one(tx, "SELECT 1 FROM aliases WHERE domain_id = ? AND local_part = ?", (row["id"], addr.local)):
                raise AlreadyExists(
                    f"{addr.canonical} is already an alias; a mailbox of the same name would never get its mail:"
                    " remove the alias first or choose another name"
                )
            await tx.execute(
                "INSERT INTO mailboxes (domain_id, local_part, display_name, password_hash, quota_bytes,"
                " enabled, created_at) VALUES (?, ?, ?, ?, ?, 1, ?)",
                (row["id"], addr.local, name, password_hash, quota, created),
            )
        log.info("mailbox added: %s", addr.canonical)
        return MailboxInfo(addr.canonical, name, quota, True, created)

    async def set_password(self, address: str, password: str) -> None:
        addr = mailbox_address(address)
        problem = passwords.password_problem(password, address=addr.canonical)
        if problem:
            raise WeakPassword(problem)
        if await self.get_user(addr.canonical) is None:
            raise NotFound(f"no mailbox {addr.canonical}")
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE mailboxes SET password_hash = ? WHERE local_part = ?"
                " AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                (password_hash, addr.local, addr.domain),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no mailbox {addr.canonical}")
            await end_account_sessions(tx, "mailbox", addr.canonical)  # a stolen session ends with the old password
        log.info("password changed: %s", addr.canonical)

    async def update_user(
        self, address: str, *, display_name: str | None = None, quota_bytes: int | None = None,
        enabled: bool | None = None,
    ) -> MailboxInfo:
        addr = mailbox_address(address)
        changes: dict[str, Any] = {}
        if display_name is not None:
            changes["display_name"] = _display_name(display_name)
        if quota_bytes is not None:
            changes["quota_bytes"] = _quota(quota_bytes)
        if enabled is not None:
            changes["enabled"] = 1 if enabled else 0
        if changes:
            assignments = ", ".join(f"{column} = :{column}" for column in changes)  # names from this code only
            async with self._db.transaction() as tx:
                cur = await tx.execute(
                    f"UPDATE mailboxes SET {assignments} WHERE local_part = :local"  # noqa: S608  column names from this code only
                    " AND domain_id = (SELECT id FROM domains WHERE name = :domain)",
                    {**changes, "local": addr.local, "domain": addr.domain},
                )
                if cur.rowcount == 0:
                    raise NotFound(f"no mailbox {addr.canonical}")
                if enabled is False:  # disabled means logged out everywhere, also after re-enabling
                    await end_account_sessions(tx, "mailbox", addr.canonical)
            log.info("mailbox changed: %s (%s)", addr.canonical, ", ".join(sorted(changes)))
        info = await self.get_user(addr.canonical)
        if info is None:
            raise NotFound(f"no mailbox {addr.canonical}")
        return info

    async def remove_user(self, address: str) -> str | None:
        """Removes the account and its index rows, and moves its Maildir aside under deleted/ (purged
        after trash.RETENTION_DAYS) so an address created again starts empty. Returns where the mail
        went (None: there was none)."""
        addr = mailbox_address(address)
        files = {"mail": self._data.mail / addr.domain / addr.local} if self._data else {}
        entry: Path | None = None
        try:
            async with self._db.transaction() as tx:
                cur = await tx.execute(
                    "DELETE FROM mailboxes WHERE local_part = ?"
                    " AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                    (addr.local, addr.domain),
                )
                if cur.rowcount == 0:
                    raise NotFound(f"no mailbox {addr.canonical}")
                await end_account_sessions(tx, "mailbox", addr.canonical)
                entry = await self._move_aside("mailbox", addr.canonical, files)
        except BaseException:
            await self._put_back(entry, files)
            raise
        log.info("mailbox removed: %s%s", addr.canonical, f" (its mail moved to {entry})" if entry else "")
        return str(entry) if entry else None

    def _domain_files(self, domain: str) -> dict[str, Path]:
        if self._data is None:
            return {}
        return {"dkim": self._data.dkim / domain, "mail": self._data.mail / domain}

    async def _move_aside(self, kind: str, name: str, files: dict[str, Path]) -> Path | None:
        """Called inside the removal's transaction, so a move that fails rolls the removal back."""
        if self._data is None or not files:
            return None
        return await asyncio.to_thread(trash.move_aside, files, self._data.deleted, kind, name)

    @staticmethod
    async def _put_back(entry: Path | None, files: dict[str, Path]) -> None:
        """The files were moved but the removal did not commit: the record is still there, so are they."""
        if entry is not None:
            await asyncio.to_thread(trash.restore, entry, files)

    async def get_user(self, address: str) -> MailboxInfo | None:
        try:
            addr = mailbox_address(address)
        except InvalidAddress:
            return None
        row = await self._db.fetchone(
            f"SELECT {_MAILBOX_COLUMNS} WHERE d.name = ? AND m.local_part = ?", (addr.domain, addr.local)
        )
        return _mailbox_info(row) if row else None

    async def list_users(self, domain: str | None = None) -> list[MailboxInfo]:
        if domain is None:
            rows = await self._db.fetchall(f"SELECT {_MAILBOX_COLUMNS} ORDER BY d.name, m.local_part")
        else:
            name = stored_domain(domain)
            await self._require_domain(name)
            rows = await self._db.fetchall(
                f"SELECT {_MAILBOX_COLUMNS} WHERE d.name = ? ORDER BY m.local_part", (name,)
            )
        return [_mailbox_info(r) for r in rows]

    # --- aliases ---------------------------------------------------------------------------------------

    async def add_alias(self, source: str, targets: list[str]) -> AliasInfo:
        """`source` is 'name@domain' or '@domain' (catch-all) in a local domain; targets are addresses,
        local or remote, or '@otherdomain' for a catch-all that maps a whole domain (same local part)."""
        local, domain = _alias_source(source)
        clean = _alias_targets(targets, catch_all=local == "")
        label = _source_label(local, domain)
        async with self._db.transaction() as tx:
            row = await _one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
            if row is None:
                raise NotFound(f"unknown domain {domain}: add the domain first")
            if await _one(tx, "SELECT 1 FROM aliases WHERE domain_id = ? AND local_part = ?", (row["id"], local)):
                raise AlreadyExists(f"alias {label} already exists")
            await _refuse_hidden_mailbox(tx, row["id"], local, label, clean)
            cur = await tx.execute(
                "INSERT INTO aliases (domain_id, local_part, created_at) VALUES (?, ?, ?)",
                (row["id"], local, _now()),
            )
            await tx.executemany(
                "INSERT INTO alias_targets (alias_id, target) VALUES (?, ?)", [(cur.lastrowid, t) for t in clean]
            )
        log.info("alias added: %s -> %s", label, ", ".join(clean))
        return AliasInfo(label, tuple(clean))

    async def set_alias_targets(self, source: str, targets: list[str]) -> AliasInfo:
        """Replace the targets of an existing alias (the console's edit form)."""
        local, domain = _alias_source(source)
        clean = _alias_targets(targets, catch_all=local == "")
        label = _source_label(local, domain)
        async with self._db.transaction() as tx:
            row = await _one(
                tx,
                "SELECT a.id FROM aliases a JOIN domains d ON d.id = a.domain_id WHERE d.name = ? AND a.local_part = ?",
                (domain, local),
            )
            if row is None:
                raise NotFound(f"no alias {label}")
            domain_id = await _one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
            assert domain_id is not None
            await _refuse_hidden_mailbox(tx, domain_id["id"], local, label, clean)
            await tx.execute("DELETE FROM alias_targets WHERE alias_id = ?", (row["id"],))
            await tx.executemany(
                "INSERT INTO alias_targets (alias_id, target) VALUES (?, ?)", [(row["id"], t) for t in clean]
            )
        log.info("alias changed: %s -> %s", label, ", ".join(clean))
        return AliasInfo(label, tuple(clean))

    async def remove_alias(self, source: str) -> None:
        local, domain = _alias_source(source)
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "DELETE FROM aliases WHERE local_part = ? AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                (local, domain),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no alias {_source_label(local, domain)}")
        log.info("alias removed: %s", _source_label(local, domain))

    async def get_alias(self, source: str) -> AliasInfo | None:
        try:
            local, domain = _alias_source(source)
        except InvalidAddress:
            return None
        rows = await self._db.fetchall(
            "SELECT t.target FROM aliases a JOIN domains d ON d.id = a.domain_id"
            " JOIN alias_targets t ON t.alias_id = a.id WHERE d.name = ? AND a.local_part = ? ORDER BY t.rowid",
            (domain, local),
        )
        return AliasInfo(_source_label(local, domain), tuple(str(r["target"]) for r in rows)) if rows else None

    async def list_aliases(self, domain: str | None = None) -> list[AliasInfo]:
        sql = (
            "SELECT a.id, a.local_part, d.name AS domain, t.target FROM aliases a"
            " JOIN domains d ON d.id = a.domain_id JOIN alias_targets t ON t.alias_id = a.id"
        )
        params: tuple[str, ...] = ()
        if domain is not None:
            name = stored_domain(domain)
            await self._require_domain(name)
            sql += " WHERE d.name = ?"
            params = (name,)
        rows = await self._db.fetchall(sql + " ORDER BY d.name, a.local_part, t.rowid", params)
        grouped: dict[int, tuple[str, list[str]]] = {}
        for r in rows:
            label = _source_label(str(r["local_part"]), str(r["domain"]))
            grouped.setdefault(int(r["id"]), (label, []))[1].append(str(r["target"]))
        return [AliasInfo(label, tuple(targets)) for label, targets in grouped.values()]

    # --- resolution ------------------------------------------------------------------------------------

    async def resolve(self, address: str) -> Resolution:
        """Final local mailboxes and external forwards for mail to `address` (see the module docstring).
        Empty for unknown local parts, remote domains, address literals and malformed input."""
        try:
            addr = parse_address(address, smtputf8=True)
        except InvalidAddress:
            return Resolution((), ())
        if addr.is_literal or not await self.is_local_domain(addr.domain):
            return Resolution((), ())
        expansion = _Expansion(use_catch_all=True)
        await self._expand(addr, (), expansion)
        return Resolution(tuple(expansion.mailboxes), tuple(expansion.forwards.values()))

    async def may_send_as(self, mailbox: str, address: str) -> bool:
        """May the logged-in `mailbox` use `address` as its sender? Its own address (with any plus tag)
        and every alias that delivers to it; not a catch-all, which would hand out every unused name."""
        try:
            own = mailbox_address(mailbox)
            addr = parse_address(address)
        except InvalidAddress:
            return False
        if addr.canonical == own.canonical:
            return True
        if addr.is_literal or not await self.is_local_domain(addr.domain):
            return False
        domain_id = await self._domain_id(addr.domain)
        if domain_id is not None and await self._mailbox_exists(domain_id, addr.local.lower()):
            # Someone else's mailbox: an alias of that name (a forward keeping a copy) sends its
            # mail on, but never lends its owner's name to the targets (issue 10 item 10).
            return False
        expansion = _Expansion(use_catch_all=False)
        await self._expand(addr, (), expansion)
        return own.canonical in expansion.mailboxes

    async def _expand(self, addr: Address, path: tuple[str, ...], ex: _Expansion) -> None:
        key = addr.canonical
        ex.visits += 1
        if ex.visits > MAX_EXPANSION or len(path) >= MAX_ALIAS_DEPTH:
            if not ex.warned:
                log.warning("alias expansion for %s stopped at %s: more than %d steps or %d levels deep",
                            path[0] if path else key, key, MAX_EXPANSION, MAX_ALIAS_DEPTH)
                ex.warned = True
            return
        if key in ex.expanded:  # reached twice by different branches: its results are already in
            return
        ex.expanded.add(key)
        found = await self._lookup(addr, ex.use_catch_all)
        if isinstance(found, str):
            ex.mailboxes[found] = None
            return
        for target in found:
            t = _expand_target(target, addr)
            if t is None:
                log.warning("alias target %r for %s is not a valid address; skipped", target, key)
                continue
            if t.is_literal or not await self.is_local_domain(t.domain):
                ex.forwards.setdefault(t.canonical, str(t))
                continue
            if t.canonical == key or t.canonical in path:
                # A self-reference (alice -> alice, keep a copy) or a loop: stop here either way.
                own = await self._mailbox(t)
                if own is not None:
                    ex.mailboxes[own] = None
                else:
                    log.warning("alias loop: %s leads back to %s; that branch is dropped",
                                key, t.canonical)
                continue
            await self._expand(t, (*path, key), ex)

    async def _lookup(self, addr: Address, use_catch_all: bool) -> str | list[str]:
        """One step: alias targets, or a mailbox's canonical address, or [] when nothing matches."""
        domain_id = await self._domain_id(addr.domain)
        if domain_id is None:
            return []
        local = addr.local.lower()
        targets = await self._alias_targets_of(domain_id, local)
        if targets:
            return targets
        if await self._mailbox_exists(domain_id, local):
            return f"{local}@{addr.domain}"
        base, tag = split_plus(local)
        if tag is not None:
            targets = await self._alias_targets_of(domain_id, base)
            if targets:
                return targets
            if await self._mailbox_exists(domain_id, base):
                return f"{base}@{addr.domain}"
        if use_catch_all:
            return await self._alias_targets_of(domain_id, "")
        return []

    async def _mailbox(self, addr: Address) -> str | None:
        domain_id = await self._domain_id(addr.domain)
        local = addr.local.lower()
        if domain_id is not None and await self._mailbox_exists(domain_id, local):
            return f"{local}@{addr.domain}"
        return None

    async def _alias_targets_of(self, domain_id: int, local: str) -> list[str]:
        rows = await self._db.fetchall(
            "SELECT t.target FROM aliases a JOIN alias_targets t ON t.alias_id = a.id"
            " WHERE a.domain_id = ? AND a.local_part = ? ORDER BY t.rowid",
            (domain_id, local),
        )
        return [str(r["target"]) for r in rows]

    async def _mailbox_exists(self, domain_id: int, local: str) -> bool:
        row = await self._db.fetchone(
            "SELECT 1 FROM mailboxes WHERE domain_id = ? AND local_part = ?", (domain_id, local)
        )
        return row is not None

    # --- credentials (for auth.py) ---------------------------------------------------------------------

    async def mailbox_credentials(self, address: str) -> Credentials | None:
        try:
            addr = mailbox_address(address)
        except InvalidAddress:
            return None
        row = await self._db.fetchone(
            "SELECT m.password_hash, m.enabled FROM mailboxes m JOIN domains d ON d.id = m.domain_id"
            " WHERE d.name = ? AND m.local_part = ?",
            (addr.domain, addr.local),
        )
        if row is None:
            return None
        return Credentials(addr.canonical, str(row["password_hash"]), bool(row["enabled"]))

    async def admin_credentials(self, username: str) -> Credentials | None:
        try:
            name = _admin_name(username)
        except AccountError:
            return None
        row = await self._db.fetchone("SELECT password_hash FROM admins WHERE username = ?", (name,))
        return Credentials(name, str(row["password_hash"]), True) if row else None

    async def replace_password_hash(
        self, kind: Literal["mailbox", "admin"], name: str, old_hash: str, new_hash: str
    ) -> bool:
        """Store a rehashed password only if the hash is still the one verified (compare-and-set), so a
        password change that raced with a login is never undone. True when stored."""
        async with self._db.transaction() as tx:
            if kind == "admin":
                cur = await tx.execute(
                    "UPDATE admins SET password_hash = ? WHERE username = ? AND password_hash = ?",
                    (new_hash, name, old_hash),
                )
            else:
                addr = mailbox_address(name)
                cur = await tx.execute(
                    "UPDATE mailboxes SET password_hash = ? WHERE local_part = ? AND password_hash = ?"
                    " AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                    (new_hash, addr.local, old_hash, addr.domain),
                )
            return cur.rowcount == 1

    # --- web admins ------------------------------------------------------------------------------------

    async def add_admin(self, username: str, password: str) -> None:
        name = _admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        if await self.admin_credentials(name):
            raise AlreadyExists(f"admin {name} already exists")
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            if await _one(tx, "SELECT 1 FROM admins WHERE username = ?", (name,)):
                raise AlreadyExists(f"admin {name} already exists")
            await tx.execute(
                "INSERT INTO admins (username, password_hash, created_at) VALUES (?, ?, ?)",
                (name, password_hash, _now()),
            )
        log.info("admin added: %s", name)

    async def add_first_admin(self, username: str, password: str) -> None:
        """The wizard's administrator: created only while no admin exists. The check and the insert
        are one statement in one BEGIN IMMEDIATE transaction, so of many simultaneous first-run
        requests exactly one succeeds; the others get AlreadyExists."""
        name = _admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO admins (username, password_hash, created_at)"
                " SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM admins)",
                (name, password_hash, _now()),
            )
            if cur.rowcount != 1:
                raise AlreadyExists("the administrator was already created")
        log.info("first admin added: %s", name)

    async def has_admin(self) -> bool:
        return await self._db.fetchone("SELECT 1 FROM admins LIMIT 1") is not None

    async def list_admins(self) -> list[str]:
        rows = await self._db.fetchall("SELECT username FROM admins ORDER BY username")
        return [str(r["username"]) for r in rows]

    async def set_admin_password(self, username: str, password: str) -> None:
        name = _admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        if await self.admin_credentials(name) is None:
            raise NotFound(f"no admin {name}")
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            cur = await tx.execute("UPDATE admins SET password_hash = ? WHERE username = ?", (password_hash, name))
            if cur.rowcount == 0:
                raise NotFound(f"no admin {name}")
            await end_account_sessions(tx, "admin", name)
        log.info("admin password changed: %s", name)

    async def remove_admin(self, username: str) -> None:
        """Refuses to remove the last admin: the console would be locked for good."""
        name = _admin_name(username)
        async with self._db.transaction() as tx:
            if await _one(tx, "SELECT 1 FROM admins WHERE username = ?", (name,)) is None:
                raise NotFound(f"no admin {name}")
            count = await _one(tx, "SELECT COUNT(*) AS n FROM admins")
            if count is not None and int(count["n"]) <= 1:
                raise InUse(f"admin {name} is the last admin; add another one first")
            await tx.execute("DELETE FROM admins WHERE username = ?", (name,))
            await end_account_sessions(tx, "admin", name)
        log.info("admin removed: %s", name)


def _expand_target(target: str, addr: Address) -> Address | None:
    """A stored target as an address; '@domain' keeps the local part being resolved."""
    try:
        if target.startswith("@"):
            return Address(addr.local, parse_domain(target[1:]))
        return parse_address(target)
    except InvalidAddress:
        return None
