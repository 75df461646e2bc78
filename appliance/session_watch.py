"""Sessions of a mailbox disabled, removed or given another password by another process end within
POLL_SECONDS (the sessions logged in with the new password go on).

The console's change wakes the mailbox's sessions itself (Admin.update_mailbox, remove_mailbox): an
IMAP client in IDLE is told BYE at once. The `letterbox` CLI is another process and cannot: the box
noticed at IDLE's next look at the disk, a minute later, and the phone of a stolen password was sent
the disabled mailbox's new mail until then. Here the box looks at the accounts change counter
(migration 0018; Database.counters reads it from memory while no commit was made anywhere) once a
second, and when it moved, wakes the sessions of every watched mailbox that is disabled, removed,
replaced or given another password now (MailStore.wake_gone_sessions); each session looks at what it
logged in to (MailStore.session_ended). A password changed because it leaked ends the thief's IDLE.
Other sessions end at their next command, as after the console's change: POP3 and SMTP have no way to
speak first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from appliance.accounts.lookup_cache import ACCOUNTS_COUNTER
from appliance.tasks import cancel_and_wait

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.sessions")

POLL_SECONDS = 1.0


class SessionWatch:
    def __init__(self, services: Services) -> None:
        self._services = services
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="session-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def _counter(self) -> int | None:
        return self._services.db.counters.read_this_tick(ACCOUNTS_COUNTER)

    async def _run(self) -> None:
        seen = self._counter()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            now = self._counter()
            if now is not None and now == seen:
                continue
            seen = now  # (None: the counter cannot be read; every watched mailbox is looked at)
            try:
                await self._services.store.wake_gone_sessions()
            except Exception:
                log.exception("sessions: the look for disabled, removed or changed mailboxes failed")


async def start_session_watch(services: Services) -> SessionWatch:
    """A background service of the box (app.BACKGROUND)."""
    watch = SessionWatch(services)
    watch.start()
    return watch
