"""What auth.py reads and writes of logins: the stored password hashes of mailboxes and web admins."""

from __future__ import annotations

from typing import Literal

from appliance.account_errors import AccountError, InvalidAddress
from appliance.accounts.checks import admin_name, mailbox_address
from appliance.accounts.records import Credentials
from appliance.db import Database


class CredentialStore:
    def __init__(self, db: Database) -> None:
        self._db = db

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
            name = admin_name(username)
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
