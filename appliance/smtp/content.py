"""The seam where a content filter (rspamd: appliance/spam/content_filter.py) plugs into the MX.

Whoever implements it puts a `ContentFilter` into `services.content_filter`. The MX calls it once per
message after DATA and after the SPF/DKIM/DMARC checks, before any copy is written (issue 16: the box
decides before its 250, so it never has to bounce spam). The SMTP code knows nothing of how the filter
works: it refuses with `reject`, adds `headers`, and files the copies in Junk when `junk` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ContentFacts:
    peer_ip: str
    helo: str
    sender: str  # '' for the null sender
    recipients: tuple[str, ...]  # as given in RCPT TO
    mailboxes: tuple[str, ...]  # the local mailboxes the copies go to
    queue_id: str
    user: str = ""  # the login, on submission
    # The MX's own verdicts (appliance/inbound_auth.py), '' when not checked: pass, fail, softfail...
    spf: str = ""
    dkim: str = ""
    dmarc: str = ""
    dmarc_policy: str = ""  # the policy a DMARC failure asked for: none, quarantine, reject


@dataclass(frozen=True)
class ContentVerdict:
    headers: bytes = b""  # complete CRLF-terminated header lines to add (X-Spam-*)
    reject: str | None = None  # a full reply line; never a 5xx when the filter could not run
    junk: bool = False  # file the local copies in the recipients' Junk folder
    message: bytes | None = None  # what to deliver instead (forged X-Spam-* fields removed)


class ContentFilter(Protocol):
    async def __call__(self, facts: ContentFacts, data: bytes) -> ContentVerdict: ...
