"""Domains, mailboxes, aliases, address resolution, credentials and web admins: the one place that knows
who lives here.

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
- A disabled mailbox still receives mail (as Postfix and Mail-in-a-Box do); it cannot log in, and the
  sessions it has open end.
- An alias never has the address of a mailbox, nor a mailbox that of an alias (issue 10 item 10): such
  an alias would silently take all of that person's mail and let its targets send as them. Aliases made
  by an earlier version keep working by the rule above.
- Removing a mailbox moves its Maildir aside (appliance/store/trash.py), so a mailbox created later
  under the same address starts empty; removing a domain moves its DKIM keys aside the same way.
  Row ids are never reused (migration 0007), so nothing keyed by an id can reach a new owner.

The package: checks.py (pure input rules), records.py (the values handed out), domains.py,
mailboxes.py, aliases.py, resolution.py, credentials.py (for auth.py), admins.py (web admins),
files.py (moving removed mail and keys aside) and rows.py (the shared query helpers). `Accounts`
below is the one object the rest of the box holds: it builds those parts on one database and
forwards to them, so a caller needs one service.
"""

from __future__ import annotations

from typing import Literal

from argon2 import PasswordHasher

from appliance import passwords
from appliance.account_errors import (
    AccountError,
    AlreadyExists,
    InUse,
    InvalidAddress,
    NotFound,
    WeakPassword,
)
from appliance.accounts.admins import WebAdmins
from appliance.accounts.aliases import Aliases
from appliance.accounts.checks import (
    MAX_ADMIN_NAME,
    MAX_ALIAS_TARGETS,
    MAX_DISPLAY_NAME,
    admin_name_problem,
    mail_domain,
    mailbox_address,
    new_mail_domain,
    stored_domain,
)
from appliance.accounts.credentials import CredentialStore
from appliance.accounts.domains import Domains
from appliance.accounts.files import AccountFiles
from appliance.accounts.lookup_cache import LookupCache
from appliance.accounts.mailboxes import Mailboxes
from appliance.accounts.records import AliasInfo, Credentials, MailboxInfo, Resolution
from appliance.accounts.resolution import MAX_ALIAS_DEPTH, MAX_EXPANSION, Resolver
from appliance.config import DataLayout
from appliance.db import Database
from appliance.store.model import MailboxRecord

__all__ = [
    "MAX_ADMIN_NAME", "MAX_ALIAS_DEPTH", "MAX_ALIAS_TARGETS", "MAX_DISPLAY_NAME", "MAX_EXPANSION",
    "AccountError", "Accounts", "AliasInfo", "AlreadyExists", "Credentials", "InUse", "InvalidAddress",
    "MailboxInfo", "NotFound", "Resolution", "WeakPassword", "admin_name_problem", "mail_domain",
    "mailbox_address", "new_mail_domain", "stored_domain",
]


class Accounts:
    """The facade: each method is the part's method of the same name (see the part for what it does)."""

    def __init__(self, db: Database, *, hasher: PasswordHasher | None = None, data: DataLayout | None = None) -> None:
        self._db = db
        # One hasher for new hashes everywhere; auth.py rehashes old ones to these parameters.
        self.hasher = hasher or passwords.DEFAULT_HASHER
        files = self._files = AccountFiles(data)
        self.domains = Domains(db, files)
        self.mailboxes = Mailboxes(db, self.domains, files, self.hasher)
        self.aliases = Aliases(db, self.domains)
        self.resolver = Resolver(db, self.domains)
        self.credentials = CredentialStore(db)
        self.admins = WebAdmins(db, self.credentials, self.hasher)
        # The look-ups every message makes, kept while the accounts are unchanged (lookup_cache.py).
        self.lookups = LookupCache(db.counters)

    async def recover(self) -> None:
        """At start: the files of a removal killed before its commit go back (files.py)."""
        await self._files.recover(self._db)

    # --- domains ---------------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> str:
        return await self.domains.add_domain(name)

    async def remove_domain(self, name: str) -> None:
        await self.domains.remove_domain(name)

    async def list_domains(self) -> list[str]:
        return await self.domains.list_domains()

    async def is_local_domain(self, name: str) -> bool:
        return await self.lookups.get("domain", name, lambda: self.domains.is_local_domain(name))

    # --- mailboxes -------------------------------------------------------------------------------------

    async def add_user(
        self, address: str, password: str, *, display_name: str = "", quota_bytes: int = 0,
        password_hash: str | None = None, enabled: bool = True,
    ) -> MailboxInfo:
        return await self.mailboxes.add_user(address, password, display_name=display_name, quota_bytes=quota_bytes,
                                             password_hash=password_hash, enabled=enabled)

    async def set_password(self, address: str, password: str) -> None:
        await self.mailboxes.set_password(address, password)

    async def update_user(
        self, address: str, *, display_name: str | None = None, quota_bytes: int | None = None,
        enabled: bool | None = None,
    ) -> MailboxInfo:
        return await self.mailboxes.update_user(address, display_name=display_name, quota_bytes=quota_bytes,
                                                enabled=enabled)

    async def remove_user(self, address: str) -> str | None:
        return await self.mailboxes.remove_user(address)

    async def get_user(self, address: str) -> MailboxInfo | None:
        return await self.mailboxes.get_user(address)

    async def list_users(self, domain: str | None = None) -> list[MailboxInfo]:
        return await self.mailboxes.list_users(domain)

    async def mailbox_record(self, domain: str, local: str) -> MailboxRecord | None:
        """store.model.MailboxDirectory: the mail store's one view of the accounts."""
        return await self.lookups.get("mailbox", f"{local}@{domain}",
                                      lambda: self.mailboxes.mailbox_record(domain, local))

    # --- aliases ---------------------------------------------------------------------------------------

    async def add_alias(self, source: str, targets: list[str]) -> AliasInfo:
        return await self.aliases.add_alias(source, targets)

    async def set_alias_targets(self, source: str, targets: list[str]) -> AliasInfo:
        return await self.aliases.set_alias_targets(source, targets)

    async def remove_alias(self, source: str) -> None:
        await self.aliases.remove_alias(source)

    async def get_alias(self, source: str) -> AliasInfo | None:
        return await self.aliases.get_alias(source)

    async def list_aliases(self, domain: str | None = None) -> list[AliasInfo]:
        return await self.aliases.list_aliases(domain)

    # --- resolution ------------------------------------------------------------------------------------

    async def resolve(self, address: str) -> Resolution:
        return await self.lookups.get("resolve", address, lambda: self.resolver.resolve(address))

    async def may_send_as(self, mailbox: str, address: str) -> bool:
        return await self.lookups.get("send-as", f"{mailbox}\0{address}",
                                      lambda: self.resolver.may_send_as(mailbox, address))

    # --- credentials (for auth.py) ---------------------------------------------------------------------

    async def mailbox_credentials(self, address: str) -> Credentials | None:
        return await self.credentials.mailbox_credentials(address)

    async def may_log_in(self, address: str, password_hash: str) -> bool:
        """The mailbox exists, is enabled and still has the password hash a session logged in under
        (auth.Principal.password_hash): what that session must still find (kept while the accounts
        are unchanged, so the check costs no database trip)."""
        async def load() -> str | None:
            found = await self.credentials.mailbox_credentials(address)
            return found.password_hash if found is not None and found.enabled else None

        return await self.lookups.get("login-hash", address, load) == password_hash

    async def admin_credentials(self, username: str) -> Credentials | None:
        return await self.credentials.admin_credentials(username)

    async def replace_password_hash(
        self, kind: Literal["mailbox", "admin"], name: str, old_hash: str, new_hash: str
    ) -> bool:
        return await self.credentials.replace_password_hash(kind, name, old_hash, new_hash)

    # --- web admins ------------------------------------------------------------------------------------

    async def add_admin(self, username: str, password: str) -> None:
        await self.admins.add_admin(username, password)

    async def add_first_admin(self, username: str, password: str) -> None:
        await self.admins.add_first_admin(username, password)

    async def has_admin(self) -> bool:
        return await self.admins.has_admin()

    async def list_admins(self) -> list[str]:
        return await self.admins.list_admins()

    async def first_admin(self) -> str | None:
        return await self.admins.first_admin()

    async def set_admin_password(self, username: str, password: str) -> None:
        await self.admins.set_admin_password(username, password)

    async def remove_admin(self, username: str) -> None:
        await self.admins.remove_admin(username)
