"""Address resolution: where mail for an address goes (resolve) and which sender addresses a logged-in
mailbox may use (may_send_as). The rules are in the package docstring (appliance/accounts/__init__.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.account_errors import InvalidAddress
from appliance.accounts.checks import mailbox_address
from appliance.accounts.domains import Domains
from appliance.accounts.records import Resolution
from appliance.address import Address, parse_address, parse_domain, split_plus
from appliance.db import Database

log = logging.getLogger("letterbox.accounts")

MAX_ALIAS_DEPTH = 20  # a chain of aliases longer than this is treated as a loop
MAX_EXPANSION = 1000  # addresses one resolve() may visit; bounds the work a crafted alias graph causes


@dataclass
class _Expansion:
    """The state of one resolve(): results in discovery order, and what has been visited."""

    use_catch_all: bool
    mailboxes: dict[str, None] = field(default_factory=dict)
    forwards: dict[str, str] = field(default_factory=dict)  # canonical -> as written
    expanded: set[str] = field(default_factory=set)
    visits: int = 0
    warned: bool = False
    stopped: str = ""  # Resolution.stopped


class Resolver:
    def __init__(self, db: Database, domains: Domains) -> None:
        self._db = db
        self._domains = domains

    async def resolve(self, address: str) -> Resolution:
        """Final local mailboxes and external forwards for mail to `address` (see the module docstring).
        Empty for unknown local parts, remote domains, address literals and malformed input."""
        try:
            addr = parse_address(address, smtputf8=True)
        except InvalidAddress:
            return Resolution((), ())
        if addr.is_literal or not await self._domains.is_local_domain(addr.domain):
            return Resolution((), ())
        expansion = _Expansion(use_catch_all=True)
        await self._expand(addr, (), expansion)
        mailboxes, forwards = tuple(expansion.mailboxes), tuple(expansion.forwards.values())
        return Resolution(mailboxes, forwards, "" if mailboxes or forwards else expansion.stopped)

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
        if addr.is_literal or not await self._domains.is_local_domain(addr.domain):
            return False
        domain_id = await self._domains.domain_id(addr.domain)
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
            ex.stopped = ex.stopped or "too deep"
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
            if t.is_literal or not await self._domains.is_local_domain(t.domain):
                ex.forwards.setdefault(t.canonical, str(t))
                continue
            if t.canonical == key or t.canonical in path:
                # A self-reference (alice -> alice, keep a copy) or a loop: stop here either way.
                own = await self._mailbox(t)
                if own is not None:
                    ex.mailboxes[own] = None
                else:
                    if t.canonical != key:
                        # Back to an earlier alias of the chain. A name to itself (a catch-all behind
                        # a removed mailbox) is no loop but nobody, as Postfix's "User unknown".
                        ex.stopped = ex.stopped or "loop"
                    log.warning("alias loop: %s leads back to %s; that branch is dropped",
                                key, t.canonical)
                continue
            await self._expand(t, (*path, key), ex)

    async def _lookup(self, addr: Address, use_catch_all: bool) -> str | list[str]:
        """One step: alias targets, or a mailbox's canonical address, or [] when nothing matches."""
        domain_id = await self._domains.domain_id(addr.domain)
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
        domain_id = await self._domains.domain_id(addr.domain)
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


def _expand_target(target: str, addr: Address) -> Address | None:
    """A stored target as an address; '@domain' keeps the local part being resolved."""
    try:
        if target.startswith("@"):
            return Address(addr.local, parse_domain(target[1:]))
        return parse_address(target)
    except InvalidAddress:
        return None
