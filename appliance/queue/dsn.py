"""Delivery status notifications for outbound mail: failed (bounce) and delayed (warning).

An RFC 3464 report in an RFC 6522 multipart/report: a text part for people, a message/delivery-status
part for programs (with the remote server's reply as Diagnostic-Code), and the original headers as
text/rfc822-headers. Built with the stdlib email package; CRLF line ends, ready for the store or spool.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Literal

MAX_RETURNED_HEADERS = 64 * 1024  # only the original's header section goes back, bounded
MAX_DIAGNOSTIC = 1000  # characters of a remote reply quoted in the report

Action = Literal["failed", "delayed"]

_REPLY = re.compile(r"^[245]\d\d[ -]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class DsnRecipient:
    address: str
    status: str  # RFC 3463, e.g. '5.1.1'
    diagnostic: str  # the remote reply ('550 5.1.1 No such user') or what went wrong here
    remote_mta: str = ""  # the host that gave the reply, if any

    @property
    def smtp_reply(self) -> bool:
        return bool(_REPLY.match(self.diagnostic))


def one_line(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """Header-safe: multi-line replies joined, control characters gone, bounded."""
    flat = _CONTROL.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def header_section(data: bytes) -> bytes:
    """The original's header section (up to the blank line), at most MAX_RETURNED_HEADERS."""
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 2
    return data[: min(end, MAX_RETURNED_HEADERS)]


def _fields(*pairs: tuple[str, str]) -> Message:
    block = Message()
    for name, value in pairs:
        if value:
            block[name] = value
    return block


def _charset(text: str) -> str:
    """us-ascii (sent as is, readable) when possible; utf-8 (base64) for 8-bit text or lines too long
    for SMTP (RFC 5321 4.5.3.1.6), which a header section cut at the size bound can end with."""
    fits = text.isascii() and all(len(line) <= 998 for line in text.splitlines())
    return "us-ascii" if fits else "utf-8"


def _human_text(hostname: str, action: Action, recipients: Sequence[DsnRecipient],
                will_retry_until: datetime | None) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == "failed":
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", ""]
    else:
        until = email.utils.format_datetime(will_retry_until) if will_retry_until else "a few days"
        lines += ["Your message could not be delivered yet to one or more recipients.",
                  f"Delivery will be retried until {until}.",
                  "You do not need to send it again; this is only a warning.", ""]
    for r in recipients:
        where = f" (from {r.remote_mta})" if r.remote_mta else ""
        lines.append(f"<{r.address}>{where}: {one_line(r.diagnostic)}")
    return "\n".join(lines) + "\n"


def build_report(
    *,
    hostname: str,
    sender: str,
    queue_id: str,
    action: Action,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival: datetime,
    last_attempt: datetime | None = None,
    will_retry_until: datetime | None = None,
    now: datetime | None = None,
    message_id: str | None = None,
) -> bytes:
    """The whole DSN message for `sender` (never call this for the null sender: RFC 5321 6.1)."""
    if not sender:
        raise ValueError("no DSN is ever sent to the null sender (RFC 5321 6.1)")
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    now = now or datetime.now().astimezone()
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = sender
    report["Subject"] = (
        "Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"
    )
    report["Date"] = email.utils.format_datetime(now)
    # A caller that must recognise its report again after a crash chooses the Message-ID itself.
    report["Message-ID"] = message_id or email.utils.make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5: nobody auto-replies to this
    headers = header_section(original)
    original_id = message_from_bytes(headers, policy=email.policy.compat32).get("Message-ID")
    if original_id and "\n" not in original_id and len(original_id) < 1000:
        report["In-Reply-To"] = original_id.strip()

    text = _human_text(hostname, action, recipients, will_retry_until)
    report.attach(MIMEText(text, "plain", _charset(text)))

    # RFC 3464 2.2 per-message fields, then one 2.3 block per recipient.
    blocks: list[Message | str] = [_fields(
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Letterbox-Queue-ID", queue_id),
        ("Arrival-Date", email.utils.format_datetime(arrival)),
    )]
    for r in recipients:
        blocks.append(_fields(
            ("Final-Recipient", f"rfc822; {r.address}"),
            ("Action", action),
            ("Status", r.status),
            ("Remote-MTA", f"dns; {r.remote_mta}" if r.remote_mta else ""),
            ("Diagnostic-Code", f"smtp; {one_line(r.diagnostic)}" if r.smtp_reply else ""),
            ("Last-Attempt-Date", email.utils.format_datetime(last_attempt) if last_attempt else ""),
            ("Will-Retry-Until",
             email.utils.format_datetime(will_retry_until) if will_retry_until and action == "delayed" else ""),
        ))
    status = MIMEBase("message", "delivery-status")
    status.set_payload(blocks)
    report.attach(status)

    returned_text = headers.decode("utf-8", "replace")
    report.attach(MIMEText(returned_text, "rfc822-headers", _charset(returned_text)))
    return report.as_bytes(policy=email.policy.SMTP)
