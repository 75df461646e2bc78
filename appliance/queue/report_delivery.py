"""Handing a delivery report (DSN, RFC 3464) to the sender it is about: the one path for the SMTP
server's reports (a copy it accepted but could not write) and the queue's (a remote failure).

A sender of one of the box's domains gets the report in each mailbox its address resolves to, and
through each of its forwards; any other sender through the queue. Reports go out with the null
sender, so a report is never reported on (RFC 5321 6.1, RFC 3464 section 1)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from appliance.smtp import headers

if TYPE_CHECKING:
    import aiosqlite

    from appliance.accounts import Accounts
    from appliance.queue.spool import Spool
    from appliance.store.mailstore import MailStore

log = logging.getLogger("letterbox.reports")


class ReportRefused(Exception):
    """The store would not take the report for a local mailbox (full, or gone meanwhile)."""


async def report_destinations(accounts: Accounts, address: str) -> tuple[tuple[str, ...], list[str]]:
    """(local mailboxes, remote addresses) a report for `address` goes to."""
    if not await accounts.is_local_domain(address.rpartition("@")[2]):
        return (), [address]
    resolution = await accounts.resolve(address)
    if not resolution.mailboxes and not resolution.forwards:
        log.warning("report for <%s> dropped: no such local address", address)
    return resolution.mailboxes, list(resolution.forwards)


async def deliver_report_to_sender(
    accounts: Accounts,
    store: MailStore,
    spool: Spool,
    sender: str,
    report: bytes,
    *,
    before_local: Callable[[], Awaitable[object]] | None = None,
    already_in: Callable[[str], Awaitable[bool]] | None = None,
    copied: Callable[[str], object] | None = None,
    with_spooling: Callable[[aiosqlite.Connection], Awaitable[None]] | None = None,
) -> bool:
    """Write `report` into each local mailbox of `sender` and spool it for the remote ones. Returns
    whether anything was spooled. Raises ReportRefused (or the store's or spool's error) at the first
    copy that could not be handed over: the caller decides whether to try again later.

    The hooks are how the queue makes a report exactly-once across crashes: `before_local` records
    that the report was begun (before any copy is written), `already_in(mailbox)` skips a mailbox
    holding it from before a restart (or an earlier try), `copied(mailbox)` is told of each copy
    written, `with_spooling` runs in the spool's own transaction."""
    mailboxes, remote = await report_destinations(accounts, sender)
    if mailboxes and before_local is not None:
        await before_local()
    for mailbox in mailboxes:
        if already_in is not None and await already_in(mailbox):
            continue
        copy = headers.return_path("") + headers.delivered_to(mailbox) + report
        result = (await store.deliver([mailbox], copy)).get(mailbox)
        if not isinstance(result, int):
            raise ReportRefused(f"the store refused the report for {mailbox}: {result!r}")
        if copied is not None:
            copied(mailbox)
    if remote:
        await spool.enqueue("", remote, report, also=with_spooling)
    return bool(remote)
