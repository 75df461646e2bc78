"""What is still missing after the wizard: DNS records not found at the last check, a self-signed
certificate, a relay never tested (or direct delivery, whose port 25 the box cannot check), a
content filter (rspamd) switched on that does not answer. The wizard's last page lists these, each
with the page that fixes it, instead of a plain "ready"."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from appliance.admin import Admin
from appliance.dns_check import load_results
from appliance.status_checks import check_content_filter
from web.sending_form import stored_relay

if TYPE_CHECKING:
    from appliance.services import Services


@dataclass(frozen=True)
class Todo:
    key: str  # a stable id for the page and tests
    text: str
    link: str
    link_text: str
    details: tuple[str, ...] = ()


async def dns_todos(svc: Services) -> list[Todo]:
    todos = []
    for domain in await svc.accounts.list_domains():
        link = f"/console/domains/{quote(domain, safe='@')}"
        last = await load_results(svc.db, domain)
        if last is None:
            todos.append(Todo(f"dns-{domain}", f"The DNS records of {domain} have not been checked yet: until they "
                              "are published, other mail servers cannot find this box.", link, "Check them now"))
            continue
        missing = [r for r in last[1] if r.status != "found"]
        if missing:
            count = len(missing)
            todos.append(Todo(
                f"dns-{domain}",
                f"{count} DNS record{'' if count == 1 else 's'} of {domain} {'was' if count == 1 else 'were'} not "
                "found (or not right) at the last check. Publishing a record can take hours to show.",
                link, "See the records and check again",
                tuple(f"{r.rdtype} {r.name}: {r.status}" for r in missing),
            ))
    return todos


async def still_to_do(svc: Services) -> list[Todo]:
    todos = await dns_todos(svc)
    cert = await asyncio.to_thread(svc.tls.info)
    if cert.self_signed:
        todos.append(Todo("certificate", "The certificate is self-signed: mail programs warn about it (or refuse "
                          "it) until a certificate from a certificate authority such as Let's Encrypt replaces it.",
                          "/console/certificate", "Get a trusted certificate"))
    box = Admin.of(svc)
    relay = (await stored_relay(box)).relay
    if relay is None:
        todos.append(Todo("sending", "Mail to other domains goes directly to their servers, which needs outbound "
                          "port 25; the box cannot check that your connection allows it (many home connections "
                          "block it). Send a message to an outside address to find out, or use a relay.",
                          "/console/sending", "Sending settings"))
    elif not await box.relay_tested(relay):
        todos.append(Todo("sending", f"The relay {relay.host} was saved without a working test: until it works, "
                          "mail to other domains waits in the queue.", "/console/sending", "Test the relay"))
    # The checklist's own check; a filter the admin switched off is the checklist's amber, not a to-do.
    spam = await check_content_filter(svc)
    if spam.level == "fail":
        todos.append(Todo("content-filter", f"{spam.summary} {spam.fix}", spam.link, "Spam settings"))
    return todos
