"""The web console's administrators (not mailboxes: their names have no '@'). The last one cannot
be removed, and the wizard's first one is created only while there is none."""

from __future__ import annotations

import asyncio
import logging

from argon2 import PasswordHasher

from appliance import passwords
from appliance.account_errors import AlreadyExists, InUse, NotFound, WeakPassword
from appliance.accounts.checks import admin_name
from appliance.accounts.credentials import CredentialStore
from appliance.accounts.rows import now, one
from appliance.db import Database
from appliance.web_sessions import end_account_sessions

log = logging.getLogger("letterbox.accounts")


class WebAdmins:
    def __init__(self, db: Database, credentials: CredentialStore, hasher: PasswordHasher) -> None:
        self._db = db
        self._credentials = credentials
        self.hasher = hasher

    async def add_admin(self, username: str, password: str) -> None:
        name = admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        if await self._credentials.admin_credentials(name):
            raise AlreadyExists(f"admin {name} already exists")
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            if await one(tx, "SELECT 1 FROM admins WHERE username = ?", (name,)):
                raise AlreadyExists(f"admin {name} already exists")
            await tx.execute(
                "INSERT INTO admins (username, password_hash, created_at) VALUES (?, ?, ?)",
                (name, password_hash, now()),
            )
        log.info("admin added: %s", name)

    async def add_first_admin(self, username: str, password: str) -> None:
        """The wizard's administrator: created only while no admin exists. The check and the insert
        are one statement in one BEGIN IMMEDIATE transaction, so of many simultaneous first-run
        requests exactly one succeeds; the others get AlreadyExists."""
        name = admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        password_hash = await asyncio.to_thread(passwords.hash_password, password, self.hasher)
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO admins (username, password_hash, created_at)"
                " SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM admins)",
                (name, password_hash, now()),
            )
            if cur.rowcount != 1:
                raise AlreadyExists("the administrator was already created")
        log.info("first admin added: %s", name)

    async def has_admin(self) -> bool:
        return await self._db.fetchone("SELECT 1 FROM admins LIMIT 1") is not None

    async def list_admins(self) -> list[str]:
        rows = await self._db.fetchall("SELECT username FROM admins ORDER BY username")
        return [str(r["username"]) for r in rows]

    async def first_admin(self) -> str | None:
        """The administrator made first (the wizard's), or None while there is none."""
        row = await self._db.fetchone("SELECT username FROM admins ORDER BY created_at, id LIMIT 1")
        return None if row is None else str(row["username"])

    async def set_admin_password(self, username: str, password: str) -> None:
        name = admin_name(username)
        problem = passwords.password_problem(password, address=name)
        if problem:
            raise WeakPassword(problem)
        if await self._credentials.admin_credentials(name) is None:
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
        name = admin_name(username)
        async with self._db.transaction() as tx:
            if await one(tx, "SELECT 1 FROM admins WHERE username = ?", (name,)) is None:
                raise NotFound(f"no admin {name}")
            count = await one(tx, "SELECT COUNT(*) AS n FROM admins")
            if count is not None and int(count["n"]) <= 1:
                raise InUse(f"admin {name} is the last admin; add another one first")
            await tx.execute("DELETE FROM admins WHERE username = ?", (name,))
            await end_account_sessions(tx, "admin", name)
        log.info("admin removed: %s", name)
