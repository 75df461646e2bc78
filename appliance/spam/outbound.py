"""Outbound abuse limits: a stolen family password must not turn the box into a spam cannon.

On submission (587/465), per logged-in user, over a sliding hour:
- at most `outbound_messages_per_hour` messages: the next MAIL FROM gets 451 4.7.1;
- at most `outbound_recipients_per_hour` recipients: the next RCPT gets 451 4.7.1.
Only accepted messages count (a refused one costs nothing). The first refusal in each hour leaves an
event ("spam" topic) for the administrator and a decision in the log. 0 switches a limit off. The
counts are rows of `outbound_usage` (migration 0015), summed over the last hour of wall-clock time:
restarting the box does not start them over, so a stolen password plus restarts cannot lift a limit.

Suspension: when the other side's servers refuse (5xx) `outbound_reject_burst` recipients of one user's
mail within an hour (the queue reports each permanent failure here), the user's sending is suspended:
every MAIL FROM gets 451 4.7.1 until an administrator lifts it (console, or `letterbox spam
suspended lift USER`), an event is recorded and the postmaster gets a mail. The suspension is a row in
`outbound_suspended`, so it holds across restarts and a lift by the CLI is seen at the next MAIL.
Logging in, reading mail and receiving are not affected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.db import Database
from appliance.events import EventLog
from appliance.spam import decisions as d

if TYPE_CHECKING:
    from appliance.settings import Settings

log = logging.getLogger("letterbox.spam")

HOUR = 3600.0
EVENT_TOPIC = "spam"


def messages_reply(limit: int) -> str:
    return (f"451 4.7.1 Sending limit reached: {limit} messages in the last hour is the most this box allows;"
            " try again later")


def recipients_reply(limit: int) -> str:
    return (f"451 4.7.1 Sending limit reached: {limit} recipients in the last hour is the most this box allows;"
            " try again later")


SUSPENDED_REPLY = ("451 4.7.1 Sending from this account is suspended after many refused recipients;"
                   " the administrator has been told")


@dataclass(frozen=True)
class Suspension:
    mailbox: str
    since: int
    reason: str


@dataclass(frozen=True)
class Usage:
    """One user's outbound use in the last hour."""

    messages: int = 0
    recipients: int = 0
    refused: int = 0


class OutboundGuard:
    """The submission side's per-user limits and suspensions (`Services.outbound_guard`)."""

    def __init__(self, db: Database, settings: Settings, events: EventLog, decisions: d.DecisionLog, *,
                 notify_postmaster: Callable[[str, str], Awaitable[object]],
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._settings = settings
        self._events = events
        self._decisions = decisions
        self._notify = notify_postmaster
        self._clock = clock  # wall clock: the rows' times must mean the same after a restart
        self._warned: dict[tuple[str, str], float] = {}  # (user, kind) -> when its event was recorded

    # --- at MAIL and RCPT ------------------------------------------------------------------------------

    async def check_message(self, user: str, client_ip: str = "") -> str | None:
        """MAIL FROM by a logged-in user: the refusal, or None."""
        suspension = await self.suspension(user)
        if suspension is not None:
            self._record(user, client_ip, d.OUTBOUND_SUSPENDED, f"suspended since {suspension.since}: {suspension.reason}")
            return SUSPENDED_REPLY
        limit = (await self._settings.fresh()).spam.outbound_messages_per_hour
        if limit and (await self.usage(user)).messages >= limit:
            await self._over_limit(user, client_ip, "messages", limit)
            return messages_reply(limit)
        return None

    async def check_recipient(self, user: str, in_this_message: int, client_ip: str = "") -> str | None:
        """RCPT TO by a logged-in user, with `in_this_message` recipients already accepted in it."""
        limit = (await self._settings.fresh()).spam.outbound_recipients_per_hour
        if limit and (await self.usage(user)).recipients + in_this_message >= limit:
            await self._over_limit(user, client_ip, "recipients", limit)
            return recipients_reply(limit)
        return None

    async def note_sent(self, user: str, recipients: int) -> None:
        """A message of `user` with this many recipients was accepted (called after its 250 is decided:
        a failure to count is logged, never turned into an error for a message already taken)."""
        try:
            await self._add(user, messages=1, recipients=recipients)
        except Exception:
            log.exception("could not count a message sent by %s against its hourly limits", user)

    async def usage(self, user: str) -> Usage:
        """What `user` sent (and had refused) in the last hour."""
        row = await self._db.fetchone(
            "SELECT COALESCE(SUM(messages), 0) AS m, COALESCE(SUM(recipients), 0) AS r, COALESCE(SUM(refused), 0) AS f"
            " FROM outbound_usage WHERE mailbox = ? AND at > ?", (user, self._clock() - HOUR))
        return Usage(int(row["m"]), int(row["r"]), int(row["f"])) if row else Usage()

    async def _add(self, user: str, *, messages: int = 0, recipients: int = 0, refused: int = 0) -> None:
        """One row of use; this user's rows older than an hour go in the same transaction (the table
        stays at most an hour of rows per user)."""
        now = self._clock()
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM outbound_usage WHERE mailbox = ? AND at <= ?", (user, now - HOUR))
            await tx.execute("INSERT INTO outbound_usage (mailbox, at, messages, recipients, refused)"
                             " VALUES (?, ?, ?, ?, ?)", (user, now, messages, recipients, refused))

    async def _over_limit(self, user: str, client_ip: str, kind: str, limit: int) -> None:
        self._record(user, client_ip, d.OUTBOUND_LIMIT, f"over {limit} {kind} an hour")
        now = self._clock()
        warned = self._warned.get((user, kind))
        if warned is None or now - warned >= HOUR:
            self._warned[(user, kind)] = now
            await self._events.record(EVENT_TOPIC, f"{user} reached the limit of {limit} {kind} an hour:"
                                                   " more mail from it is refused (451) until the hour has passed")

    # --- refused recipients and suspension ------------------------------------------------------------

    async def note_refused(self, user: str, count: int, detail: str) -> bool:
        """The queue: `count` recipients of `user`'s mail were refused for good by their servers.
        Returns whether this suspended the user."""
        burst = (await self._settings.fresh()).spam.outbound_reject_burst
        await self._add(user, refused=count)
        refused = (await self.usage(user)).refused
        if not burst or refused < burst or await self.suspension(user) is not None:
            return False
        reason = f"{refused} recipients refused by their servers within an hour (last: {detail[:200]})"
        async with self._db.transaction() as tx:
            await tx.execute("INSERT OR IGNORE INTO outbound_suspended (mailbox, since, reason) VALUES (?, ?, ?)",
                             (user, int(self._clock()), reason))
            # The refusals that led here are spent: after a lift, a new burst is needed to suspend again.
            await tx.execute("UPDATE outbound_usage SET refused = 0 WHERE mailbox = ? AND refused > 0", (user,))
        self._record(user, "", d.OUTBOUND_SUSPENDED, reason)
        await self._events.record(EVENT_TOPIC, f"sending from {user} suspended: {reason}")
        text = (f"Sending from {user} has been suspended.\n\n{reason}.\n\nThis usually means the password of "
                "this account is known to a spammer. Change the password, then lift the suspension in the "
                f"console's Spam page or with:\n\n    letterbox spam suspended lift {user}\n\n"
                "Until then the account can log in and receive mail, but its outgoing mail is refused.\n")
        try:
            await self._notify(f"Sending suspended for {user}", text)
        except Exception:
            log.exception("could not mail the postmaster about the suspension of %s", user)
        return True

    async def suspension(self, user: str) -> Suspension | None:
        row = await self._db.fetchone("SELECT mailbox, since, reason FROM outbound_suspended WHERE mailbox = ?", (user,))
        return Suspension(str(row["mailbox"]), int(row["since"]), str(row["reason"])) if row else None

    def _record(self, user: str, client_ip: str, layer: str, reason: str) -> None:
        self._decisions.record(d.Decision(layer=layer, verdict=d.DEFER, reason=reason, client_ip=client_ip,
                                          sender=user))


async def suspensions(db: Database) -> list[Suspension]:
    rows = await db.fetchall("SELECT mailbox, since, reason FROM outbound_suspended ORDER BY since")
    return [Suspension(str(r["mailbox"]), int(r["since"]), str(r["reason"])) for r in rows]


async def lift_suspension(db: Database, mailbox: str) -> bool:
    async with db.transaction() as tx:
        cursor = await tx.execute("DELETE FROM outbound_suspended WHERE mailbox = ?", (mailbox,))
        return cursor.rowcount > 0
