"""Aliases: a name in a local domain (or '@domain', the catch-all) that delivers to other addresses,
local or remote. An alias never takes a mailbox's name unless it keeps a copy for it (issue 10 item 10)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aiosqlite

from appliance.account_errors import AlreadyExists, InvalidAddress, NotFound
from appliance.accounts.checks import alias_source, alias_targets, source_label, stored_domain
from appliance.accounts.domains import Domains
from appliance.accounts.records import AliasInfo
from appliance.accounts.rows import now, one
from appliance.address import idn, parse_address
from appliance.db import Database

log = logging.getLogger("letterbox.accounts")

async def _refuse_lost_mail(tx: aiosqlite.Connection, domain_id: int, local: str, label: str,
                            targets: Sequence[str]) -> None:
    """The two aliases that lose mail, told by the mailbox of the alias's own name. With one: an alias
    wins over a mailbox of the same name (resolve()), so one that does not deliver to the mailbox itself
    would silently take all of that person's mail (issue 10 item 10); allowed only as an explicit
    forward that keeps a copy, the mailbox among its own targets. Without one: an alias whose one target
    is its own address delivers nowhere (resolve() drops the loop: every message to it was refused 'No
    such user here', while the console listed the alias as made)."""
    if not local:
        return
    canonical = {t.lower() if t.startswith("@") else parse_address(t).canonical for t in targets}
    mailbox = await one(tx, "SELECT 1 FROM mailboxes WHERE domain_id = ? AND local_part = ?", (domain_id, local))
    if mailbox is not None and label not in canonical:
        raise AlreadyExists(
            f"{label} is a mailbox: an alias of the same name would take all of its mail. Choose another name,"
            f" or, to forward its mail and keep a copy, include {label} itself among the targets"
        )
    if mailbox is None and canonical == {label}:
        raise InvalidAddress(f"{label} would deliver only to itself, so its mail would go nowhere: "
                             "give the address (or addresses) it should deliver to")


class Aliases:
    def __init__(self, db: Database, domains: Domains) -> None:
        self._db = db
        self._domains = domains

    async def add_alias(self, source: str, targets: list[str]) -> AliasInfo:
        """`source` is 'name@domain' or '@domain' (catch-all) in a local domain; targets are addresses,
        local or remote, or '@otherdomain' for a catch-all that maps a whole domain (same local part)."""
        local, domain = alias_source(source)
        clean = alias_targets(targets, catch_all=local == "")
        label = source_label(local, domain)
        async with self._db.transaction() as tx:
            row = await one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
            if row is None:
                raise NotFound(f"unknown domain {idn(domain)}: add the domain first")
            if await one(tx, "SELECT 1 FROM aliases WHERE domain_id = ? AND local_part = ?", (row["id"], local)):
                raise AlreadyExists(f"alias {idn(label)} already exists")
            await _refuse_lost_mail(tx, row["id"], local, label, clean)
            cur = await tx.execute(
                "INSERT INTO aliases (domain_id, local_part, created_at) VALUES (?, ?, ?)",
                (row["id"], local, now()),
            )
            await tx.executemany(
                "INSERT INTO alias_targets (alias_id, target) VALUES (?, ?)", [(cur.lastrowid, t) for t in clean]
            )
        log.info("alias added: %s -> %s", label, ", ".join(clean))
        return AliasInfo(label, tuple(clean))

    async def set_alias_targets(self, source: str, targets: list[str]) -> AliasInfo:
        """Replace the targets of an existing alias (the console's edit form)."""
        local, domain = alias_source(source)
        clean = alias_targets(targets, catch_all=local == "")
        label = source_label(local, domain)
        async with self._db.transaction() as tx:
            row = await one(
                tx,
                "SELECT a.id FROM aliases a JOIN domains d ON d.id = a.domain_id WHERE d.name = ? AND a.local_part = ?",
                (domain, local),
            )
            if row is None:
                raise NotFound(f"no alias {label}")
            domain_id = await one(tx, "SELECT id FROM domains WHERE name = ?", (domain,))
            assert domain_id is not None
            await _refuse_lost_mail(tx, domain_id["id"], local, label, clean)
            await tx.execute("DELETE FROM alias_targets WHERE alias_id = ?", (row["id"],))
            await tx.executemany(
                "INSERT INTO alias_targets (alias_id, target) VALUES (?, ?)", [(row["id"], t) for t in clean]
            )
        log.info("alias changed: %s -> %s", label, ", ".join(clean))
        return AliasInfo(label, tuple(clean))

    async def remove_alias(self, source: str) -> None:
        local, domain = alias_source(source)
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "DELETE FROM aliases WHERE local_part = ? AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                (local, domain),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no alias {source_label(local, domain)}")
        log.info("alias removed: %s", source_label(local, domain))

    async def get_alias(self, source: str) -> AliasInfo | None:
        try:
            local, domain = alias_source(source)
        except InvalidAddress:
            return None
        rows = await self._db.fetchall(
            "SELECT t.target FROM aliases a JOIN domains d ON d.id = a.domain_id"
            " JOIN alias_targets t ON t.alias_id = a.id WHERE d.name = ? AND a.local_part = ? ORDER BY t.rowid",
            (domain, local),
        )
        return AliasInfo(source_label(local, domain), tuple(str(r["target"]) for r in rows)) if rows else None

    async def list_aliases(self, domain: str | None = None) -> list[AliasInfo]:
        sql = (
            "SELECT a.id, a.local_part, d.name AS domain, t.target FROM aliases a"
            " JOIN domains d ON d.id = a.domain_id JOIN alias_targets t ON t.alias_id = a.id"
        )
        params: tuple[str, ...] = ()
        if domain is not None:
            name = stored_domain(domain)
            await self._domains.require_domain(name)
            sql += " WHERE d.name = ?"
            params = (name,)
        rows = await self._db.fetchall(sql + " ORDER BY d.name, a.local_part, t.rowid", params)
        grouped: dict[int, tuple[str, list[str]]] = {}
        for r in rows:
            label = source_label(str(r["local_part"]), str(r["domain"]))
            grouped.setdefault(int(r["id"]), (label, []))[1].append(str(r["target"]))
        return [AliasInfo(label, tuple(targets)) for label, targets in grouped.values()]
