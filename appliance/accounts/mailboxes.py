"""The mailboxes (a person's account): add, change, remove (its Maildir moves aside), look up; and
mailbox_record, the one narrow view the mail store has of them (store.model.MailboxDirectory)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from appliance import passwords
from appliance.account_errors import AlreadyExists, InvalidAddress, NotFound, WeakPassword
from appliance.accounts.checks import (
    clean_display_name,
    clean_quota,
    mailbox_address,
    stored_domain,
)
from appliance.accounts.domains import Domains
from appliance.accounts.files import AccountFiles
from appliance.accounts.records import MailboxInfo
from appliance.accounts.rows import now, one
from appliance.address import idn
from appliance.db import Database
from appliance.store.model import MailboxRecord
from appliance.web_sessions import end_account_sessions

log = logging.getLogger("letterbox.accounts")

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


class Mailboxes:
    def __init__(self, db: Database, domains: Domains, files: AccountFiles, hasher: PasswordHasher) -> None:
        self._db = db
        self._domains = domains
        self._files = files
        self.hasher = hasher

    async def add_user(
        self, address: str, password: str, *, display_name: str = "", quota_bytes: int = 0,
        password_hash: str | None = None, enabled: bool = True,
    ) -> MailboxInfo:
        """`password_hash` instead of `password`: an account put back as a backup had it (its hash and
        `enabled` in the same transaction as the row, so a kill never leaves it with another password)."""
        addr = mailbox_address(address)
        name = clean_display_name(display_name)
        quota = clean_quota(quota_bytes)
        problem = passwords.password_problem(password, address=addr.canonical) if password_hash is None else None
        if problem:
            raise WeakPassword(problem)
        # Cheap refusals before the deliberately slow hash; checked again in the transaction.
        await self._domains.require_domain(addr.domain)
        if await self.get_user(addr.canonical):
            raise AlreadyExists(f"mailbox {idn(addr.canonical)} already exists")
        if password_hash is None:
            password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        created = now()
        async with self._db.transaction() as tx:
            row = await one(tx, "SELECT id FROM domains WHERE name = ?", (addr.domain,))
            if row is None:
                raise NotFound(f"unknown domain {idn(addr.domain)}: add the domain first")
            if await one(tx, "SELECT 1 FROM mailboxes WHERE domain_id = ? AND local_part = ?",
                          (row["id"], addr.local)):
                raise AlreadyExists(f"mailbox {idn(addr.canonical)} already exists")
            if await one(tx, "SELECT 1 FROM aliases WHERE domain_id = ? AND local_part = ?", (row["id"], addr.local)):
                raise AlreadyExists(
                    f"{addr.canonical} is already an alias; a mailbox of the same name would never get its mail:"
                    " remove the alias first or choose another name"
                )
            await tx.execute(
                "INSERT INTO mailboxes (domain_id, local_part, display_name, password_hash, quota_bytes,"
                " enabled, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row["id"], addr.local, name, password_hash, quota, int(enabled), created),
            )
        log.info("mailbox added: %s", addr.canonical)
        return MailboxInfo(addr.canonical, name, quota, enabled, created)

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
            changes["display_name"] = clean_display_name(display_name)
        if quota_bytes is not None:
            changes["quota_bytes"] = clean_quota(quota_bytes)
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
        files = self._files.mailbox_files(addr)
        entry: Path | None = None
        try:
            async with self._db.transaction() as tx:
                row = await one(
                    tx,
                    "DELETE FROM mailboxes WHERE local_part = ?"
                    " AND domain_id = (SELECT id FROM domains WHERE name = ?) RETURNING id",
                    (addr.local, addr.domain),
                )
                if row is None:
                    raise NotFound(f"no mailbox {addr.canonical}")
                await end_account_sessions(tx, "mailbox", addr.canonical)
                entry = await self._files.move_aside("mailbox", addr.canonical, files, row["id"])
        except BaseException:
            await self._files.put_back(entry, files)
            raise
        log.info("mailbox removed: %s%s", addr.canonical, f" (its mail moved to {entry})" if entry else "")
        return str(entry) if entry else None

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
            await self._domains.require_domain(name)
            rows = await self._db.fetchall(
                f"SELECT {_MAILBOX_COLUMNS} WHERE d.name = ? ORDER BY m.local_part", (name,)
            )
        return [_mailbox_info(r) for r in rows]

    async def mailbox_record(self, domain: str, local: str) -> MailboxRecord | None:
        """The mailbox `local`@`domain` as stored (parts already canonical), or None: what the mail
        store needs of it (its row id, never reused, its quota, and the password hash its sessions
        logged in under), and nothing more."""
        row = await self._db.fetchone(
            "SELECT m.id, m.quota_bytes, m.local_part, d.name, m.enabled, m.password_hash FROM mailboxes m"
            " JOIN domains d ON d.id = m.domain_id WHERE d.name = ? AND m.local_part = ?", (domain, local))
        return (MailboxRecord(int(row[0]), int(row[1]), str(row[2]), str(row[3]), bool(row[4]), str(row[5]))
                if row is not None else None)
