"""Outbound abuse limits: a stolen family password must not turn the box into a spam cannon.

On submission (587/465), per logged-in user, over a sliding hour:
- at most `outbound_messages_per_hour` messages: the next MAIL FROM gets 451 4.7.1;
- at most `outbound_recipients_per_hour` recipients: the next RCPT gets 451 4.7.1.
Only accepted messages count (a refused one costs nothing). The first refusal in each hour leaves an
event ("spam" topic) for the administrator and a decision in the log. 0 switches a limit off. The
counts live in memory: a restart starts them over (the limits are about bursts, and the box
restarts rarely).

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
from collections import deque
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


class _Window:
    """Counts in a sliding hour."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, int]] = deque()

    def total(self, now: float) -> int:
        while self.items and self.items[0][0] <= now - HOUR:
            self.items.popleft()
        return sum(n for _, n in self.items)

    def add(self, now: float, n: int) -> None:
        self.items.append((now, n))


class OutboundGuard:
    """The submission side's per-user limits and suspensions (`Services.outbound_guard`)."""

    def __init__(self, db: Database, settings: Settings, events: EventLog, decisions: d.DecisionLog, *,
                 notify_postmaster: Callable[[str, str], Awaitable[object]],
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._settings = settings
        self._events = events
        self._decisions = decisions
        self._notify = notify_postmaster
        self._clock = clock
        self._wall_clock = wall_clock
        self._messages: dict[str, _Window] = {}
        self._recipients: dict[str, _Window] = {}
        self._refused: dict[str, _Window] = {}
        self._warned: dict[tuple[str, str], float] = {}  # (user, kind) -> when its event was recorded

    # --- at MAIL and RCPT ------------------------------------------------------------------------------

    async def check_message(self, user: str, client_ip: str = "") -> str | None:
        """MAIL FROM by a logged-in user: the refusal, or None."""
        suspension = await self.suspension(user)
        if suspension is not None:
            self._record(user, client_ip, d.OUTBOUND_SUSPENDED, f"suspended since {suspension.since}: {suspension.reason}")
            return SUSPENDED_REPLY
        limit = (await self._settings.fresh()).spam.outbound_messages_per_hour
        now = self._clock()
        if limit and self._window(self._messages, user).total(now) >= limit:
            await self._over_limit(user, client_ip, "messages", limit)
            return messages_reply(limit)
        return None

    async def check_recipient(self, user: str, in_this_message: int, client_ip: str = "") -> str | None:
        """RCPT TO by a logged-in user, with `in_this_message` recipients already accepted in it."""
        limit = (await self._settings.fresh()).spam.outbound_recipients_per_hour
        now = self._clock()
        if limit and self._window(self._recipients, user).total(now) + in_this_message >= limit:
            await self._over_limit(user, client_ip, "recipients", limit)
            return recipients_reply(limit)
        return None

    def note_sent(self, user: str, recipients: int) -> None:
        """A message of `user` with this many recipients was accepted."""
        now = self._clock()
        self._window(self._messages, user).add(now, 1)
        self._window(self._recipients, user).add(now, recipients)

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
        window = self._window(self._refused, user)
        now = self._clock()
        window.add(now, count)
        refused = window.total(now)
        if not burst or refused < burst or await self.suspension(user) is not None:
            return False
        reason = f"{refused} recipients refused by their servers within an hour (last: {detail[:200]})"
        await self._db.execute("INSERT OR IGNORE INTO outbound_suspended (mailbox, since, reason) VALUES (?, ?, ?)",
                               (user, int(self._wall_clock()), reason))
        window.items.clear()
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

    def _window(self, table: dict[str, _Window], user: str) -> _Window:
        window = table.get(user)
        if window is None:
            window = table[user] = _Window()
        return window

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
