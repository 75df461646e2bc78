"""Teaching rspamd's Bayes classifier from what people do with their mail (issue 16).

A message put into Junk (IMAP COPY, MOVE or APPEND by any mail program, or the console) is learned as
spam; one taken out of Junk into any folder but Trash, as ham (throwing spam away is not saying it
was good mail). The store tells the learner after it committed the change (MailStore.on_filed); the
learner only queues, and one background task reads each file and posts it to rspamd's controller,
so the user's command never waits for rspamd and a failure never reaches it.

Each lesson teaches two Bayes classifiers at once (image/overlay/etc/rspamd/local.d): the box-wide
one, which learns from every mailbox and so reaches rspamd's `min_learns` far sooner on a family box,
and the mailbox's own (rspamd's per-user statistics), chosen by the `Deliver-To` sent with the lesson:
the mailbox that moved the message. At DATA, mail to one mailbox is judged by both (its owner's
verdict outweighs the family's), mail to several by the box-wide one (content_filter.statistics_owner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.spam.content_filter import ContentSettings, client_for
from appliance.spam.rspamd import RspamdUnavailable
from appliance.store.mailstore import MailStore
from appliance.store.model import JUNK, Filed
from appliance.tasks import cancel_and_wait

log = logging.getLogger("letterbox.spam.learn")

MAX_PENDING = 10_000  # queued messages; beyond this a burst is dropped (with a count), never blocks
MAX_LEARN_SIZE = 10 * 1024 * 1024  # rspamd learns from text; a huge attachment teaches nothing
TRASH = "Trash"


def lesson(event: Filed) -> bool | None:
    """True: learn as spam; False: as ham; None: nothing to learn from this."""
    into_junk, out_of_junk = event.target == JUNK, event.source == JUNK
    if into_junk and not out_of_junk:
        return True
    if out_of_junk and not into_junk and event.target != TRASH:
        return False
    return None


@dataclass(frozen=True)
class Lesson:
    mailbox: str
    folder: str
    uid: int
    spam: bool


@dataclass
class LearnCounts:
    spam: int = 0
    ham: int = 0
    skipped: int = 0  # rspamd had nothing to learn (too short, already learned), or the message went
    failed: int = 0  # rspamd could not be asked
    dropped: int = 0  # more than MAX_PENDING waiting
    last_problem: str = ""


class Learner:
    """Queues lessons from the store's filed events and teaches rspamd one at a time."""

    def __init__(self, store: MailStore, settings: Callable[[], Awaitable[ContentSettings]]) -> None:
        self._store = store
        self._settings = settings
        self._queue: asyncio.Queue[Lesson] = asyncio.Queue(MAX_PENDING)
        self.counts = LearnCounts()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self._store.on_filed(self.filed)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="spam-learner")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        await cancel_and_wait(self._task)

    def filed(self, event: Filed) -> None:
        spam = lesson(event)
        if spam is None:
            return
        for uid in event.uids:
            try:
                self._queue.put_nowait(Lesson(event.mailbox, event.target, uid, spam))
            except asyncio.QueueFull:
                self.counts.dropped += 1

    async def idle(self) -> None:
        """Wait until every queued lesson was taught (tests, the CLI)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self.teach(item)
            except Exception:
                log.exception("learning from %s/%s uid %d failed", item.mailbox, item.folder, item.uid)
                self.counts.failed += 1
            finally:
                self._queue.task_done()

    async def teach(self, item: Lesson) -> str:
        """Post one message to rspamd; returns what happened, in words."""
        data = await self._read(item)
        if data is None:
            self.counts.skipped += 1
            return "skipped: the message is no longer there"
        settings = await self._settings()
        if not settings.enabled:
            self.counts.skipped += 1
            return "skipped: content filtering is switched off"
        try:
            outcome = await client_for(settings).learn(data, spam=item.spam, deliver_to=item.mailbox)
        except (RspamdUnavailable, ValueError) as exc:
            self.counts.failed += 1
            self.counts.last_problem = str(exc)
            log.warning("could not teach rspamd (%s of %s): %s", "spam" if item.spam else "ham", item.mailbox, exc)
            return f"failed: {exc}"
        if outcome == "learned":
            if item.spam:
                self.counts.spam += 1
            else:
                self.counts.ham += 1
        else:
            self.counts.skipped += 1
        log.info("learned %s from %s (%s uid %d): %s", "spam" if item.spam else "ham", item.mailbox,
                 item.folder, item.uid, outcome)
        return outcome

    async def _read(self, item: Lesson) -> bytes | None:
        for _attempt in range(3):  # a flag change renames the file between lookup and read
            try:
                path = await self._store.message_path(item.mailbox, item.folder, item.uid)
            except Exception:  # noqa: BLE001  the mailbox or folder is gone: nothing to learn
                return None
            if path is None:
                return None
            try:
                return await asyncio.to_thread(_read_head, path)
            except FileNotFoundError:
                continue
        return None


def _read_head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(MAX_LEARN_SIZE)
