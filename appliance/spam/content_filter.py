"""rspamd as the MX's content filter at DATA (the `ContentFilter` seam of appliance/smtp/content.py).

Per message: ask rspamd for a score with the envelope and the box's own SPF/DKIM/DMARC verdicts
(inserted as rspamd's usual symbols, so its scores and composites apply as if it had checked them
itself, without a second round of DNS lookups); then

- score at or above the reject score (or rspamd's pre-result says reject, as for GTUBE): 554, the
  sender keeps the message and the box never bounces spam;
- at or above the junk score: the copies go to each recipient's Junk folder;
- below: the inbox.

rspamd runs two Bayes classifiers (image/overlay/etc/rspamd/local.d/statistic.conf): the box-wide one
and one per mailbox, chosen by the Deliver-To this check sends (`statistics_owner`).

Every copy gets `X-Spam-*` fields (score, status, the symbols that weighed most), and fields of those
names that arrived with the message are removed first, so no sender can mark its own mail clean.

A filter that cannot run never costs a message: rspamd refused, timed out, or its Redis died
mid-check → the message is accepted into the inbox marked `X-Spam-Status: unchecked`, and `state`
says content filtering is off (the status page shows it) until the next check that works.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.smtp.content import ContentFacts, ContentVerdict
from appliance.spam.decisions import ACCEPT, JUNK, REJECT, RSPAMD, Decision, DecisionLog, Verdict
from appliance.spam.rspamd import (
    Endpoint,
    Envelope,
    RspamdClient,
    RspamdUnavailable,
    RspamdUnreachable,
    ScanResult,
)

log = logging.getLogger("letterbox.spam.content")

DEFAULT_SCANNER = "http://127.0.0.1:11333"  # rspamd's normal worker (Debian's default)
DEFAULT_CONTROLLER = "http://127.0.0.1:11334"  # its controller: learning, statistics
DEFAULT_JUNK_SCORE = 6.0  # rspamd's own "add header" threshold
DEFAULT_REJECT_SCORE = 15.0  # rspamd's own "reject" threshold
SPAM_REPLY = "554 5.7.1 Message refused: it looks like spam (score {score:.1f})"  # RFC 3463 5.7.1
MAX_SYMBOLS_SHOWN = 8
# After a connection to rspamd failed, messages go unchecked without asking for this long: with
# rspamd down (as under `make run`) a try per message cost a thread handoff and a refused
# connection each (issue 19); a returning rspamd is asked again this soon.
RETRY_SECONDS = 2.0

# The box's verdicts as rspamd's own symbol names (rspamd's scores.d/policies_group.conf).
SPF_SYMBOLS = {
    "pass": "R_SPF_ALLOW", "fail": "R_SPF_FAIL", "softfail": "R_SPF_SOFTFAIL", "neutral": "R_SPF_NEUTRAL",
    "none": "R_SPF_NA", "temperror": "R_SPF_DNSFAIL", "permerror": "R_SPF_PERMFAIL",
}
DKIM_SYMBOLS = {
    "pass": "R_DKIM_ALLOW", "fail": "R_DKIM_REJECT", "temperror": "R_DKIM_TEMPFAIL",
    "permerror": "R_DKIM_PERMFAIL", "none": "R_DKIM_NA", "neutral": "R_DKIM_NA",
}
DMARC_FAIL_SYMBOLS = {"reject": "DMARC_POLICY_REJECT", "quarantine": "DMARC_POLICY_QUARANTINE"}
DMARC_SYMBOLS = {"pass": "DMARC_POLICY_ALLOW", "none": "DMARC_NA", "temperror": "DMARC_DNSFAIL",
                 "permerror": "DMARC_BAD_POLICY"}

_SPAM_FIELD = re.compile(rb"^x-spam(?:-[a-z0-9-]*)?[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class ContentSettings:
    """What the filter reads at each message (the console changes it while the box runs)."""

    enabled: bool = True
    scanner: str = DEFAULT_SCANNER
    controller: str = DEFAULT_CONTROLLER
    junk_score: float = DEFAULT_JUNK_SCORE
    reject_score: float = DEFAULT_REJECT_SCORE


@dataclass
class FilterState:
    """Whether content filtering works now, for the status page."""

    available: bool | None = None  # None: not asked yet
    problem: str = ""
    since: float = 0.0
    # After a connection to rspamd failed: (its address, when). Messages go unchecked without
    # asking for a moment afterwards (RspamdContentFilter.retry_seconds).
    unreachable: tuple[str, float] | None = None

    def waiting(self, scanner: str, seconds: float) -> bool:
        """Whether a message for `scanner` goes unchecked without asking: its connection failed less
        than `seconds` ago (a changed address is asked at once)."""
        if self.unreachable is None:
            return False
        address, when = self.unreachable
        if address == scanner and time.monotonic() - when < seconds:
            return True
        self.unreachable = None
        return False

    def note(self, available: bool, problem: str = "") -> None:
        if available != self.available:
            self.since = time.time()
            if available:
                log.info("content filter: rspamd answers again")
            else:
                log.warning("content filter is off: %s", problem)
        self.available, self.problem = available, problem
        if available:
            self.unreachable = None


def auth_symbols(facts: ContentFacts) -> dict[str, float]:
    """rspamd symbols for what the MX found (empty where it did not check)."""
    symbols: dict[str, float] = {}
    if facts.spf in SPF_SYMBOLS:
        symbols[SPF_SYMBOLS[facts.spf]] = 1.0
    if facts.dkim in DKIM_SYMBOLS:
        symbols[DKIM_SYMBOLS[facts.dkim]] = 1.0
    if facts.dmarc == "fail":
        symbols[DMARC_FAIL_SYMBOLS.get(facts.dmarc_policy, "DMARC_POLICY_SOFTFAIL")] = 1.0
    elif facts.dmarc in DMARC_SYMBOLS:
        symbols[DMARC_SYMBOLS[facts.dmarc]] = 1.0
    return symbols


def statistics_owner(facts: ContentFacts) -> str:
    """The mailbox whose own Bayes statistics judge this message (rspamd's Deliver-To): the one local
    mailbox it goes to, or '' for mail to several, which the box-wide classifier alone judges (one
    check per message; one person's lessons must not decide where another's copy goes). Learning
    names the mailbox that moved the message (learning.py), so the two meet."""
    return facts.mailboxes[0] if len(facts.mailboxes) == 1 else ""


def remove_spam_fields(data: bytes) -> bytes:
    """Drop X-Spam-* fields from the header section (a sender's own 'X-Spam-Flag: NO'); every other
    byte is kept as it came."""
    end = data.find(b"\r\n\r\n")
    head_end = len(data) if end < 0 else end + 2
    if b"x-spam" not in data[:head_end].lower():
        return data
    fields: list[bytes] = []
    for line in data[:head_end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return b"".join(f for f in fields if not _SPAM_FIELD.match(f)) + data[head_end:]


def symbols_summary(result: ScanResult, limit: int = MAX_SYMBOLS_SHOWN) -> str:
    return ", ".join(f"{s.name}({s.score:.2f})" for s in result.top_symbols(limit))


def spam_headers(result: ScanResult, settings: ContentSettings, *, junk: bool) -> bytes:
    """The X-Spam-* fields (as SpamAssassin and rspamd's milter_headers write them, so mail
    programs' rules for either work)."""
    status = (f"{'Yes' if junk else 'No'}, score={result.score:.2f} junk={settings.junk_score:.2f} "
              f"reject={settings.reject_score:.2f}")
    lines = [
        f"X-Spam-Flag: {'YES' if junk else 'NO'}",
        f"X-Spam-Score: {result.score:.2f}",
        f"X-Spam-Status: {status}",
    ]
    summary = symbols_summary(result)
    if summary:
        lines.append("X-Spam-Symbols: " + summary.replace(", ", ",\r\n\t"))
    return "".join(line + "\r\n" for line in lines).encode("ascii", "replace")


UNCHECKED_HEADER = b"X-Spam-Status: unchecked (the content filter could not be asked)\r\n"

def client_for(settings: ContentSettings) -> RspamdClient:
    """ValueError when an address in the settings is not http://host:port."""
    return RspamdClient(Endpoint.parse(settings.scanner, 11333), Endpoint.parse(settings.controller, 11334))


class RspamdContentFilter:
    def __init__(self, settings: Callable[[], Awaitable[ContentSettings]], *,
                 decisions: DecisionLog | None = None) -> None:
        self._settings = settings
        self._decisions = decisions  # the console's recent decisions (appliance/spam/decisions.py)
        self.state = FilterState()
        self.retry_seconds = RETRY_SECONDS

    async def __call__(self, facts: ContentFacts, data: bytes) -> ContentVerdict:
        cleaned = remove_spam_fields(data)
        settings = await self._settings()
        if not settings.enabled:
            return ContentVerdict(message=cleaned)
        verdict, score, reason, outcome = await self._scan(facts, cleaned, settings)
        log.info("%s: spam check %s score=%s from=<%s> ip=%s %s", facts.queue_id, verdict,
                 "-" if score is None else f"{score:.2f}", facts.sender, facts.peer_ip, reason)
        if self._decisions is not None:
            self._decisions.record(Decision(
                layer=RSPAMD, verdict=verdict, reason=reason, client_ip=facts.peer_ip, helo=facts.helo,
                sender=facts.sender, recipients=facts.recipients, score=score, queue_id=facts.queue_id,
            ))
        return outcome

    async def _scan(self, facts: ContentFacts, data: bytes,
                    settings: ContentSettings) -> tuple[Verdict, float | None, str, ContentVerdict]:
        """(verdict, score, reason, what the MX does)."""
        if self.state.waiting(settings.scanner, self.retry_seconds):
            return ACCEPT, None, f"unchecked: {self.state.problem}", ContentVerdict(
                headers=UNCHECKED_HEADER, message=data)
        envelope = Envelope(
            ip=facts.peer_ip, helo=facts.helo, sender=facts.sender, recipients=facts.recipients,
            user=facts.user, queue_id=facts.queue_id, symbols=auth_symbols(facts),
            deliver_to=statistics_owner(facts),
        )
        try:
            result = await client_for(settings).check(data, envelope)
        except (RspamdUnavailable, ValueError) as exc:
            # Never a 5xx for a check that did not run, and never a lost message: into the inbox.
            self.state.note(False, str(exc))
            if isinstance(exc, RspamdUnreachable):
                self.state.unreachable = (settings.scanner, time.monotonic())
            return ACCEPT, None, f"unchecked: {exc}", ContentVerdict(headers=UNCHECKED_HEADER, message=data)
        self.state.note(True)
        summary = symbols_summary(result)
        if result.score >= settings.reject_score or (result.skipped and result.action == "reject"):
            return REJECT, result.score, summary or result.message, ContentVerdict(
                reject=SPAM_REPLY.format(score=result.score))
        junk = result.score >= settings.junk_score
        return (JUNK if junk else ACCEPT), result.score, summary, ContentVerdict(
            headers=spam_headers(result, settings, junk=junk), junk=junk, message=data)
