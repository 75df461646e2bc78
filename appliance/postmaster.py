"""Mail from the box to its postmaster: a certificate about to expire, an account suspended for sending
spam. It goes into the postmaster's mailboxes (the administrators', as the MX routes postmaster@ when no
alias exists: smtp/policy.postmaster_mailboxes), written straight into the store like a report."""

from __future__ import annotations

import datetime as dt
import email.policy
import logging
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.services import Services

log = logging.getLogger("letterbox.postmaster")


def postmaster_message(hostname: str, recipient: str, subject: str, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Letterbox <postmaster@{hostname}>"
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 5
    msg.set_content(text)
    return msg.as_bytes(policy=email.policy.SMTP)  # CRLF line ends, as delivered mail is stored


async def mail_postmaster(svc: Services, subject: str, text: str) -> bool:
    """Deliver a notice to the postmaster's mailboxes; False (and a log line) when there is none."""
    from appliance.smtp.policy import MailboxFacts, postmaster_domain, postmaster_mailboxes

    accounts = svc.accounts
    mailboxes = [MailboxFacts(m.address, m.enabled, m.created_at) for m in await accounts.list_users()]
    primary = postmaster_domain(svc.hostname, await accounts.list_domains())
    targets = postmaster_mailboxes(await accounts.list_admins(), mailboxes, primary)
    if not targets:
        log.warning("not mailed (no mailbox for the postmaster): %s", subject)
        return False
    recipient = f"postmaster@{primary or svc.hostname}"
    await svc.store.deliver(list(targets), postmaster_message(svc.hostname, recipient, subject, text))
    return True
