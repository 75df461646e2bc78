"""The content filter's use-cases the console and the CLI share (issue 16), one function each:

- `content_status`: is rspamd answering, what it has learned, what the box did lately;
- `learn_message`: teach rspamd one message as spam or ham (`letterbox spam learn`);
- `SpamContent.junk` / `release`: a mailbox owner's Junk folder, and taking a message out of it into
  the inbox (learned as ham by the store's filed hook, like a move in any mail program).

`SpamContent` is the running box's part: the MX's filter, the learner and these functions, built
by `start_spam_content` (a background service of app.py) into `Services.spam_content`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.headerregistry
import email.parser
import email.policy
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.events import EventLog
from appliance.spam.content_filter import (
    ContentSettings,
    FilterState,
    RspamdContentFilter,
    client_for,
)
from appliance.spam.decisions import DecisionLog
from appliance.spam.learning import LearnCounts, Learner
from appliance.spam.rspamd import Endpoint, RspamdUnavailable
from appliance.store.mailstore import MailStore
from appliance.store.model import INBOX, JUNK

if TYPE_CHECKING:
    from appliance.services import Services
    from appliance.settings import Settings, SettingValues

log = logging.getLogger("letterbox.spam")

JUNK_SHOWN = 100  # messages listed on a mailbox owner's Junk page, newest first
HEAD_READ = 16 * 1024  # bytes read of each listed message for its From: and Subject:
# Every field read as text (RFC 2047 words decoded), From: too: the structured address parser raised
# on a spammer's From: of groups or comments nested thousands deep (the Junk page was a 500 while the
# message stayed), and took seconds on one of thousands of addresses.
_AS_TEXT = email.policy.default.clone(header_factory=email.headerregistry.HeaderRegistry(use_default_map=False))

SettingsReader = Callable[[], Awaitable[ContentSettings]]


@dataclass(frozen=True)
class ContentStatus:
    enabled: bool
    available: bool  # rspamd answered just now
    problem: str  # why not, in plain words
    scanner: str
    scanned: int | None = None  # rspamd's own counters (None: not known)
    learned: int | None = None
    bayes: str = ""  # the Bayes statistics in one line (spam/ham learned)

    @property
    def filtering(self) -> bool:
        return self.enabled and self.available

    @property
    def headline(self) -> str:
        if not self.enabled:
            return "content filtering is off (switched off in the spam settings)"
        if not self.available:
            return f"content filtering is off: {self.problem}"
        return "content filtering is on (rspamd)"


async def content_status(settings: ContentSettings, state: FilterState | None = None) -> ContentStatus:
    """Ask rspamd now (a ping and its statistics); `state` (the running filter's) is updated too."""
    if not settings.enabled:
        return ContentStatus(False, False, "", settings.scanner)
    try:
        client = client_for(settings)
    except ValueError as exc:
        return ContentStatus(True, False, str(exc), settings.scanner)
    if not await client.ping():
        problem = f"rspamd at {client.scanner} does not answer"
        if state is not None:
            state.note(False, problem)
        return ContentStatus(True, False, problem, settings.scanner)
    if state is not None:
        state.note(True)
    try:
        stat = await client.stat()
    except RspamdUnavailable as exc:
        return ContentStatus(True, True, "", settings.scanner, bayes=f"statistics unavailable: {exc}")
    return ContentStatus(True, True, "", settings.scanner, scanned=_int(stat.get("scanned")),
                         learned=_int(stat.get("learned")), bayes=_bayes_line(stat))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _bayes_line(stat: dict[str, object]) -> str:
    parts = []
    files = stat.get("statfiles")
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, dict):
            parts.append(f"{entry.get('symbol', '?')}: {entry.get('revision', 0)} learned")
    return ", ".join(parts)


async def learn_message(settings: ContentSettings, data: bytes, *, spam: bool, mailbox: str = "") -> str:
    """Teach rspamd one message; returns rspamd's word ('learned', 'skipped: ...'). RspamdUnavailable
    or ValueError (a bad address in the settings) when it cannot be taught now."""
    return await client_for(settings).learn(data, spam=spam, deliver_to=mailbox)


@dataclass(frozen=True)
class JunkMessage:
    uid: int
    sender: str
    subject: str
    date: int  # internal date, unix seconds
    score: str  # the X-Spam-Score we wrote ('' when none)


def _summary(path: Path) -> tuple[str, str, str]:
    try:
        with path.open("rb") as file:
            head = file.read(HEAD_READ)
    except OSError:
        return "", "", ""
    end = head.find(b"\r\n\r\n")
    parsed = email.parser.BytesHeaderParser(policy=_AS_TEXT).parsebytes(
        head if end < 0 else head[: end + 4])

    def field(name: str) -> str:
        try:
            return str(parsed.get(name, "") or "")[:200]
        except (ValueError, TypeError, IndexError):  # a malformed field is shown empty, never an error
            return ""

    return field("From"), field("Subject"), field("X-Spam-Score")


class SpamContent:
    """The running box's content filter, learner and mailbox-owner functions."""

    def __init__(self, store: MailStore, events: EventLog, settings: SettingsReader, *,
                 decisions: DecisionLog | None = None) -> None:
        self.store = store
        self.events = events
        self.settings = settings
        self.filter = RspamdContentFilter(settings, decisions=decisions)
        self.learner = Learner(store, settings)

    @property
    def learned(self) -> LearnCounts:
        return self.learner.counts

    async def status(self) -> ContentStatus:
        return await content_status(await self.settings(), self.filter.state)

    async def junk_count(self, mailbox: str) -> int:
        return len((await self.store.snapshot(mailbox, JUNK)).messages)

    async def junk(self, mailbox: str, limit: int = JUNK_SHOWN) -> list[JunkMessage]:
        """The newest messages of the mailbox's Junk folder, with sender and subject."""
        messages = (await self.store.snapshot(mailbox, JUNK)).messages[-limit:][::-1]
        heads = await asyncio.to_thread(lambda: [_summary(m.path) for m in messages])
        return [JunkMessage(m.uid, sender, subject, m.internaldate, score)
                for m, (sender, subject, score) in zip(messages, heads, strict=True)]

    async def release(self, mailbox: str, uid: int, *, by: str) -> bool:
        """Move one message from Junk into the inbox; the store's filed hook teaches rspamd it was
        ham. False when there is no such message (released already, or deleted)."""
        pairs = await self.store.move(mailbox, JUNK, [uid], INBOX)
        if not pairs:
            return False
        await self.events.record("spam", f"message {uid} of {mailbox} released from Junk by {by} (learned as ham)")
        return True

    def start(self) -> None:
        self.learner.start()

    async def stop(self) -> None:
        await self.learner.stop()


def content_settings(values: SettingValues) -> ContentSettings:
    spam = values.spam
    return ContentSettings(enabled=spam.content_filter, scanner=spam.rspamd_url, controller=spam.rspamd_controller_url,
                           junk_score=spam.junk_score, reject_score=spam.reject_score)


def content_settings_of(services: Services) -> SettingsReader:
    """The filter's settings, read live from the box's settings at each use."""
    async def read() -> ContentSettings:
        return content_settings(await services.settings.fresh())
    return read


async def start_spam_content(services: Services) -> SpamContent:
    """The composition root's hook: the MX's content filter and the learner."""
    spam = SpamContent(services.store, services.events, content_settings_of(services),
                       decisions=services.spam_decisions)
    spam.start()
    services.spam_content = spam
    services.content_filter = spam.filter
    return spam


# --- the settings (console form, CLI) ----------------------------------------------------------------

class ContentSettingsError(ValueError):
    """A content-filter setting that cannot be used; `field` names the form field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_content_settings(*, scanner: str, controller: str, junk: float, reject: float) -> None:
    """ContentSettingsError for a value the filter could not work with."""
    for name, url in (("scanner", scanner), ("controller", controller)):
        try:
            Endpoint.parse(url, 11333)
        except ValueError as exc:
            raise ContentSettingsError(name, str(exc)) from None
    for name, score in (("junk", junk), ("reject", reject)):
        if not math.isfinite(score) or not 0 < score <= 1000:
            raise ContentSettingsError(name, "a score is a number above 0 and at most 1000")
    if junk >= reject:
        raise ContentSettingsError("junk", "the junk score must be below the reject score")


async def save_content_settings(settings: Settings, events: EventLog, *, enabled: bool, scanner: str,
                                controller: str, junk: float, reject: float, by: str) -> None:
    """Change the content filter's settings: in force for the next message (read live)."""
    validate_content_settings(scanner=scanner, controller=controller, junk=junk, reject=reject)
    now = await settings.fresh()
    await settings.save(spam=dataclasses.replace(
        now.spam, content_filter=enabled, rspamd_url=scanner.strip(), rspamd_controller_url=controller.strip(),
        junk_score=junk, reject_score=reject))
    state = "on" if enabled else "off"
    await events.record("spam", f"content filter {state} (rspamd {scanner.strip()}), junk at {junk:g}, "
                                f"reject at {reject:g}, by {by}")
