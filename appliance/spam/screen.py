"""The MX's connection- and envelope-time spam layers, in the order a client meets them.

`SpamScreen` (one per box, `Services.spam_screen`) opens a `ConnectionScreen` for each client on port
25 that is not in the `skip_networks` setting (loopback by default). Logged-in users never meet it:
submission has no screen, and the MX's RCPT hook asks only for clients without a login.

1. At connect, two lookups start at once: the client on the DNS blocklists (dnsbl.py) and its
   forward-confirmed reverse DNS (PTR, then the name's A/AAAA must contain the address).
2. Before the greeting (`before_greeting`, like Postfix's postscreen): a client without
   forward-confirmed reverse DNS waits `greeting_delay` seconds; then a client that already sent
   something (an early talker: RFC 5321 4.3.1 says the client waits for the 220) is refused with
   554 and disconnected. Real MTAs always wait; bulk spam tools often do not.
3. At each RCPT for a local recipient (`check_recipient`): a listed client gets 554 naming the list,
   then a sender domain on a domain list 554 naming that list (postmaster@ and abuse@ are exempt
   from both), then greylisting (greylist.py) a 451 for a new triplet. A DNS failure never refuses
   (dnsbl.py says why).

Every refusal, deferral and greylist pass is recorded in the decision log (decisions.py). Settings
are read live at each step, so switching a layer off in the console applies to the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from appliance.queue.resolver import make_async_resolver, make_resolver
from appliance.spam import decisions as d
from appliance.spam.dnsbl import Answer, Blocklists
from appliance.spam.greylist import EARLY, NEW, PASSED, Greylist, client_network

if TYPE_CHECKING:
    from appliance.settings import Settings, SpamSettings

log = logging.getLogger("letterbox.spam")

FCRDNS_LIFETIME = 4.0  # seconds for the PTR and the forward lookups together
MAX_PTR_NAMES = 5  # PTR names followed (a client may publish many)
BLOCKLIST_EXEMPT = frozenset({"postmaster", "abuse"})  # local parts the DNS lists never refuse
EARLY_TALKER_REPLY = "554 5.5.1 Protocol error: you sent before the greeting (RFC 5321 4.3.1)"


def client_reply(answer: Answer, ip: str) -> str:
    return f"554 5.7.1 Service unavailable; client [{ip}] blocked using {answer.zone}" + (
        f" ({answer.codes[0]})" if answer.codes else "")


def sender_reply(answer: Answer, domain: str) -> str:
    return f"554 5.7.1 Sender domain {domain} is listed on {answer.zone}" + (
        f" ({answer.codes[0]})" if answer.codes else "")


def greylist_reply(wait: int) -> str:
    # RFC 5321 4.2.5 / RFC 3463 4.7.1: a temporary, policy-related refusal; the text tells a person
    # reading a bounce what happens next.
    return (f"451 4.7.1 Greylisted: first mail from this sender to this recipient; please try again in "
            f"{max(wait, 1)} seconds")


async def forward_confirmed(resolver: dns.asyncresolver.Resolver, ip: str) -> bool:
    """FCrDNS: some PTR name of `ip` has an A/AAAA record that is `ip`. False on any failure."""
    address = ipaddress.ip_address(ip)
    try:
        ptr = await resolver.resolve(dns.reversename.from_address(ip), "PTR", lifetime=FCRDNS_LIFETIME)
        names = [r.target.to_text() for r in ptr][:MAX_PTR_NAMES]
        qtype = "A" if address.version == 4 else "AAAA"
        for name in names:
            try:
                forward = await resolver.resolve(name, qtype, lifetime=FCRDNS_LIFETIME)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            if any(ipaddress.ip_address(r.address) == address for r in forward):
                return True
    except dns.exception.DNSException:
        return False
    return False


class ConnectionScreen:
    """The spam layers' state for one MX connection."""

    def __init__(self, screen: SpamScreen, ip: str, spam: SpamSettings) -> None:
        self._screen = screen
        self.ip = ip
        self._listing: asyncio.Task[Answer | None] | None = None
        self._fcrdns: asyncio.Task[bool] | None = None
        self._spf: dict[tuple[str, str], bool] = {}
        if spam.dnsbl and spam.dnsbl_lists:
            self._listing = asyncio.ensure_future(screen.blocklists.client_listing(ip, spam.dnsbl_lists))
        if spam.greeting_delay > 0:
            self._fcrdns = asyncio.ensure_future(forward_confirmed(screen.async_resolver(), ip))

    def close(self) -> None:
        for task in (self._listing, self._fcrdns):
            if task is not None and not task.done():
                task.cancel()

    async def before_greeting(self, has_spoken: Callable[[], bool], helo: str = "") -> str | None:
        """Wait as the settings say; the reply to send instead of the greeting (then hang up), or None."""
        spam = await self._screen.spam()
        delay = spam.greeting_delay
        if delay > 0 and self._fcrdns is not None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            confirmed = False
            with contextlib.suppress(TimeoutError):
                confirmed = await asyncio.wait_for(asyncio.shield(self._fcrdns), delay)
            if not confirmed:
                await asyncio.sleep(max(0.0, delay - (loop.time() - started)))
        if spam.early_talker and has_spoken():
            self._screen.record(d.Decision(layer=d.EARLY_TALKER, verdict=d.REJECT, client_ip=self.ip,
                                           reason="sent before the greeting"))
            log.info("%s: early talker, refused", self.ip)
            return EARLY_TALKER_REPLY
        return None

    async def check_recipient(self, helo: str, sender: str, recipient: str) -> str | None:
        """The refusal for this RCPT of a local recipient, or None to accept it."""
        spam = await self._screen.spam()
        envelope = d.Decision(layer="", verdict=d.ACCEPT, client_ip=self.ip, helo=helo, sender=sender,
                              recipients=(recipient,))
        # RFC 5321 4.5.1 (postmaster must be reachable) and RFC 2142 (abuse): a listed sender can still
        # write to say it was wrongly listed. Greylisting applies to them as to anyone.
        listable = recipient.rpartition("@")[0].lower() not in BLOCKLIST_EXEMPT
        if spam.dnsbl and self._listing is not None and listable:
            listing = await self._client_listing()
            if listing is not None:
                self._screen.record(replace(envelope, layer=d.DNSBL, verdict=d.REJECT, reason=listing.reply_text))
                return client_reply(listing, self.ip)
        domain = sender.rpartition("@")[2] if "@" in sender else ""
        if spam.domain_blocklist and spam.domain_lists and domain and listable:
            listing = await self._screen.blocklists.domain_listing(domain, spam.domain_lists)
            if listing is not None:
                self._screen.record(replace(envelope, layer=d.DBL, verdict=d.REJECT, reason=listing.reply_text))
                return sender_reply(listing, domain)
        if spam.greylist:
            return await self._greylist(spam, envelope, domain)
        return None

    async def _client_listing(self) -> Answer | None:
        assert self._listing is not None
        try:
            return await asyncio.shield(self._listing)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: DNS list check failed; not refusing", self.ip)
            return None

    async def _greylist(self, spam: SpamSettings, envelope: d.Decision, domain: str) -> str | None:
        greylist, helo, sender = self._screen.greylist, envelope.helo, envelope.sender
        if domain and await greylist.spf_domain_known(domain) and await self._spf_pass(helo, sender):
            return None  # a domain that got through before, and this client is one of its senders
        check = await greylist.check(client_network(self.ip), sender, envelope.recipients[0],
                                     delay=spam.greylist_delay, remember_days=spam.greylist_remember_days)
        if check.verdict in (NEW, EARLY):
            reason = "first attempt" if check.verdict == NEW else f"retried too early ({check.wait} s to go)"
            self._screen.record(replace(envelope, layer=d.GREYLIST, verdict=d.DEFER, reason=reason))
            return greylist_reply(check.wait)
        if check.verdict == PASSED:
            self._screen.record(replace(envelope, layer=d.GREYLIST, verdict=d.ACCEPT, reason="retried after the delay"))
            if domain and await self._spf_pass(helo, sender):
                await greylist.remember_spf_domain(domain, remember_days=spam.greylist_remember_days)
        return None

    async def _spf_pass(self, helo: str, sender: str) -> bool:
        key = (helo, sender)
        if key not in self._spf:
            self._spf[key] = await self._screen.spf_pass(self.ip, helo, sender)
        return self._spf[key]


class SpamScreen:
    """The connection-time layers of one box."""

    def __init__(self, settings: Settings, blocklists: Blocklists, greylist: Greylist,
                 decisions: d.DecisionLog) -> None:
        self._settings = settings
        self.blocklists = blocklists
        self.greylist = greylist
        self._decisions = decisions

    async def spam(self) -> SpamSettings:
        return (await self._settings.fresh()).spam

    def record(self, decision: d.Decision) -> None:
        self._decisions.record(decision)

    def async_resolver(self) -> dns.asyncresolver.Resolver:
        return make_async_resolver(self._settings.now.dns_resolver)

    def connection(self, ip: str) -> ConnectionScreen | None:
        """The screen for a new MX client, or None when no layer applies to it (skip networks).
        Reads the settings as last loaded (no await at accept time: the next command reads fresh)."""
        spam = self._settings.now.spam
        if spam.skips(ip):
            return None
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return None
        return ConnectionScreen(self, ip, spam)

    async def spf_pass(self, ip: str, helo: str, sender: str) -> bool:
        """Does the client pass SPF for the envelope sender? (inbound_auth's check, on a thread.)"""
        from appliance.inbound_auth import check_spf

        resolver = make_resolver(self._settings.now.dns_resolver)
        try:
            mailfrom, _helo = await asyncio.to_thread(check_spf, resolver, ip, sender, helo)
        except Exception:
            log.exception("%s: SPF check for greylisting failed", ip)
            return False
        return mailfrom.result == "pass"
