"""The seam where inbound checks (SPF, DKIM, DMARC: the outbound/authentication issue) plug into the MX.

Whoever implements them puts an `InboundCheck` into `services.inbound_check`. The MX calls it
once per message after DATA, before any copy is written; its headers (Authentication-Results:) go on
top of the message under our Received:, a `message` replaces what arrived (so forged fields can go),
and a `reject` reply refuses the whole message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class InboundFacts:
    peer_ip: str
    helo: str
    sender: str  # '' for the null sender
    recipients: tuple[str, ...]
    tls: bool


@dataclass(frozen=True)
class InboundVerdict:
    headers: bytes = b""  # complete CRLF-terminated header lines to add
    reject: str | None = None  # a full reply line, e.g. '550 5.7.1 Rejected by DMARC policy'
    message: bytes | None = None  # what to deliver instead, e.g. with forged results removed
    # The envelope sender is authenticated (SPF pass, or DMARC pass aligned with it): only then may
    # a failure of this message be reported to it (no backscatter to forged senders). None: the
    # checks are switched off, nothing was judged (reports go out as they would without checks).
    sender_authenticated: bool | None = False
    # The results in one word each, for the content filter (appliance/smtp/content.py); '' when
    # not checked. dkim: 'pass' when any signature passed, else the first result.
    spf: str = ""
    dkim: str = ""
    dmarc: str = ""
    dmarc_policy: str = ""  # what a DMARC failure asked for (none, quarantine, reject)


class InboundCheck(Protocol):
    async def __call__(self, facts: InboundFacts, data: bytes) -> InboundVerdict: ...
