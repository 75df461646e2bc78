"""The local mail domains: add (checked by checks.new_mail_domain), remove (refused while in use; the
DKIM keys move aside), list, and the lookups the other modules of the package share."""

from __future__ import annotations

import logging
from pathlib import Path

from appliance import dkim_keys
from appliance.account_errors import AlreadyExists, InUse, InvalidAddress, NotFound
from appliance.accounts.checks import new_mail_domain, stored_domain
from appliance.accounts.files import AccountFiles
from appliance.accounts.rows import now, one
from appliance.address import idn
from appliance.db import Database

log = logging.getLogger("letterbox.accounts")


class Domains:
    def __init__(self, db: Database, files: AccountFiles) -> None:
        self._db = db
        self._files = files

    async def add_domain(self, name: str) -> str:
        """Add a local mail domain; returns the canonical (A-label) name."""
        domain = new_mail_domain(name)
        async with self._db.transaction() as tx:
            if await one(tx, "SELECT 1 FROM domains WHERE name = ?", (domain,)):
                raise AlreadyExists(f"domain {idn(domain)} already exists")
            await tx.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", (domain, now()))
        log.info("domain added: %s", domain)
        return domain

    async def remove_domain(self, name: str) -> None:
        """Refused while the domain has mailboxes or aliases: removing mail by accident is worse. Its DKIM
        keys (and the empty mail/<domain>/) are moved aside under deleted/."""
        domain = stored_domain(name)
        files = self._files.domain_files(domain)
        entry: Path | None = None
        try:
            async with self._db.transaction() as tx:
                row = await one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
                if row is None:
                    raise NotFound(f"no domain {idn(domain)}")
                counts = await one(
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
                entry = await self._files.move_aside("domain", domain, files, row["id"])
        except BaseException:
            await self._files.put_back(entry, files)
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
        return await self.domain_id(domain) is not None

    async def domain_id(self, domain: str) -> int | None:
        row = await self._db.fetchone("SELECT id FROM domains WHERE name = ?", (domain,))
        return int(row["id"]) if row else None

    async def require_domain(self, domain: str) -> int:
        domain_id = await self.domain_id(domain)
        if domain_id is None:
            raise NotFound(f"unknown domain {idn(domain)}: add the domain first")
        return domain_id
