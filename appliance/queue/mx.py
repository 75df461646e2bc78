"""Where mail for a domain goes: MX lookup and ordering (RFC 5321 5.1), null MX (RFC 7505).

`delivery_hops(resolver, domain)` gives the addresses to try, in order: MX hosts by preference with
equal preferences shuffled (RFC 5321 5.1 spreads load that way), each host's IPv6 addresses before
its IPv4 ones; a domain without MX records is its own MX (the "implicit MX"). Failures come back as
a `RouteError` that says whether retrying can help.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.resolver
import idna

from appliance.queue.interfaces import interface_addresses

if TYPE_CHECKING:
    from appliance.services import Services

MAX_MX_HOSTS = 10  # more than this is misconfiguration or abuse; Postfix caps at 5 sessions too
MAX_HOPS = 20  # addresses kept from a lookup; one attempt tries client.MX_ADDRESS_LIMIT of them


@dataclass(frozen=True)
class MxHost:
    preference: int
    name: str  # lower-case, no trailing dot; '' is the null MX "."


@dataclass(frozen=True)
class Hop:
    """One address to connect to, and the name it was found under (for logs, DSNs and Received)."""

    name: str
    address: str

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]"


class RouteError(Exception):
    """No address to try. `status` is the RFC 3463 code the recipient gets if this is final."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


def order_mx(records: Iterable[MxHost], rng: random.Random | None = None) -> list[MxHost]:
    """Lowest preference first; hosts of equal preference in random order (RFC 5321 5.1)."""
    rng = rng or random.Random()  # noqa: S311  MX load spreading (RFC 5321 5.1), not a secret
    by_pref: dict[int, list[MxHost]] = {}
    for record in records:
        by_pref.setdefault(record.preference, []).append(record)
    ordered: list[MxHost] = []
    for pref in sorted(by_pref):
        group = sorted(by_pref[pref], key=lambda r: r.name)  # deterministic before the shuffle
        rng.shuffle(group)
        ordered.extend(group)
    return ordered


def is_null_mx(records: Sequence[MxHost]) -> bool:
    """RFC 7505 3: one MX record, preference 0, exchange "." means "this domain accepts no mail"."""
    return len(records) == 1 and records[0].name == "" and records[0].preference == 0


def usable_mx(records: Sequence[MxHost], own_hostnames: Iterable[str]) -> list[MxHost]:
    """Drop "." entries mixed with real ones (RFC 7505 3 forbids the mix) and, when we are ourselves an
    MX of the domain, every host at our preference or worse (RFC 5321 5.1: avoid the loop)."""
    own = {n.lower().rstrip(".") for n in own_hostnames}
    real = [r for r in records if r.name]
    ours = [r.preference for r in real if r.name in own]
    if ours:
        real = [r for r in real if r.preference < min(ours)]
    return real


_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104  listen addresses meaning every local address


def own_addresses(listeners: Iterable[tuple[str, int]], port: int, public: Iterable[str]) -> Callable[[str], bool]:
    """Which addresses, connected to on `port`, reach one of this box's own `listeners` ((host, port)
    each): the address one listens on, or for a wildcard listener a loopback or unspecified address,
    an address of one of the machine's interfaces (its LAN address) or one of the box's public
    addresses. As Postfix's own interface addresses, for "loops back to myself" (RFC 5321 5.1); a
    listener on another port is some other program's business."""
    hosts = {host for host, bound in listeners if bound == port}
    own = {_normal(a) for a in (*hosts, *public) if a}
    wildcard = any(host in _WILDCARDS for host in hosts)
    if wildcard:
        own |= interface_addresses()

    def is_own(address: str) -> bool:
        if not hosts:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1: an IPv6 socket connects to the IPv4 address itself
        if ip.is_unspecified:  # a connection to 0.0.0.0 (::) reaches this host's 127.0.0.1 (::1)
            ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        return str(ip) in own or (wildcard and ip.is_loopback)

    return is_own


def reaches_this_box(services: Services, port: int) -> Callable[[str], bool]:
    """own_addresses for the running box: its listeners as bound, its public addresses as set."""
    values = services.settings.now
    return own_addresses([(host, bound) for host, bound, _ in services.listeners().values()], port,
                         (values.public_ipv4 or "", values.public_ipv6 or ""))


def relay_loop(host: str) -> str:
    return f"the relay {host} is this box itself: mail for it loops back to myself"


def _normal(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return address


def address_literal(domain: str) -> str | None:
    """'[192.0.2.1]' or '[IPv6:2001:db8::1]' (RFC 5321 4.1.3) -> the address, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def dns_domain(domain: str) -> str:
    """The A-label form for DNS (recipients may be written in U-labels, RFC 6531)."""
    domain = domain.rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise RouteError("5.1.2", f"invalid domain name {domain!r}: {exc}") from exc


async def _lookup_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> list[MxHost] | None:
    """The domain's MX records; None when it has none (implicit MX). Raises RouteError."""
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN as exc:
        raise RouteError("5.1.2", f"domain {domain} does not exist (DNS NXDOMAIN)") from exc
    except dns.resolver.NoAnswer:
        return None
    except dns.resolver.YXDOMAIN as exc:
        raise RouteError("5.1.2", f"domain {domain} is not a valid DNS name") from exc
    except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.NoResolverConfiguration) as exc:
        raise RouteError("4.4.3", f"DNS lookup of the MX records of {domain} failed: {exc}") from exc
    return [
        MxHost(int(r.preference), r.exchange.to_text(omit_final_dot=True).lower().rstrip("."))
        for r in answer
    ]


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> tuple[list[str], bool]:
    """(IPv6 then IPv4 addresses of `host`, whether a lookup failed temporarily)."""

    async def one(rdtype: str) -> tuple[list[str], bool]:
        try:
            answer = await resolver.resolve(host, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return [], False
        except (dns.resolver.NoNameservers, dns.exception.Timeout):
            return [], True
        return [r.address for r in answer], False

    (v6, fail6), (v4, fail4) = await asyncio.gather(one("AAAA"), one("A"))
    return v6 + v4, fail6 or fail4


async def delivery_hops(
    resolver: dns.asyncresolver.Resolver,
    domain: str,
    *,
    own_hostnames: Iterable[str] = (),
    is_own: Callable[[str], bool] = lambda address: False,
    rng: random.Random | None = None,
) -> list[Hop]:
    """The addresses to try for `domain`, best first. Raises RouteError when there are none. Hosts at
    the preference of one whose address is ours (`is_own`), or worse, are dropped, as hosts named as
    ours are (RFC 5321 5.1); when nothing is left, the mail loops back to myself (Postfix's words)."""
    literal = address_literal(domain)
    if literal is not None:  # (never from the box's own users and aliases: they are refused)
        return [Hop(domain, literal)]
    name = dns_domain(domain)
    records = await _lookup_mx(resolver, name)
    if records is None:
        hosts = [MxHost(0, name)]  # RFC 5321 5.1: no MX, the domain itself is the host
    elif is_null_mx(records):
        raise RouteError("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)")
    else:
        own = list(own_hostnames)
        hosts = order_mx(usable_mx(records, own), rng)
        if not hosts:
            if any(r.name for r in records):
                raise RouteError("5.4.6", f"mail for {domain} loops back to myself")
            raise RouteError("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)")
    hosts = hosts[:MAX_MX_HOSTS]
    found = await asyncio.gather(*(_addresses(resolver, h.name) for h in hosts))
    ours = [h.preference for h, (addresses, _) in zip(hosts, found, strict=True) if any(map(is_own, addresses))]
    if ours:
        kept = [(h, f) for h, f in zip(hosts, found, strict=True) if h.preference < min(ours)]
        if not kept:
            raise RouteError("5.4.6", f"mail for {domain} loops back to myself")
        hosts, found = [h for h, _ in kept], [f for _, f in kept]
    hops: list[Hop] = []
    temporary = False
    for host, (addresses, failed) in zip(hosts, found, strict=True):
        temporary = temporary or failed
        hops.extend(Hop(host.name, a) for a in addresses if Hop(host.name, a) not in hops)
    if not hops:
        if temporary:
            raise RouteError("4.4.3", f"DNS lookup of the mail hosts of {domain} failed")
        if records is None:
            raise RouteError("4.4.4", f"no MX or A/AAAA record for {domain}")
        names = ", ".join(h.name for h in hosts)
        raise RouteError("4.4.4", f"no address (A or AAAA record) found for the mail host(s) of {domain}: {names}")
    return hops[:MAX_HOPS]


async def _system_addresses(host: str) -> tuple[list[str], bool]:
    """(addresses of `host` from the system's resolver, whether the failure may be temporary). The
    system's getaddrinfo reads /etc/hosts too, so `localhost` or a name only the LAN knows work."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [], exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
    except (OSError, UnicodeError):
        return [], False
    found: list[str] = []
    for family, *_rest, sockaddr in infos:
        address = str(sockaddr[0]).split("%")[0]
        if family in (socket.AF_INET, socket.AF_INET6) and address not in found:
            found.append(address)
    return found, False


async def host_hops(resolver: dns.asyncresolver.Resolver, host: str, *, system: bool = False) -> list[Hop]:
    """The addresses of one named host (the smarthost), or the literal itself. `system`: ask the
    system's resolver (which reads /etc/hosts) as any program would, rather than DNS only; used
    when no dns_resolver setting forces one server."""
    try:
        return [Hop(host, str(ipaddress.ip_address(host.strip("[]"))))]
    except ValueError:
        pass
    if system:
        addresses, failed = await _system_addresses(dns_domain(host))
    else:
        addresses, failed = await _addresses(resolver, dns_domain(host))
    if not addresses:
        status = "4.4.3" if failed else "4.4.4"
        raise RouteError(status, f"no address found for the relay host {host}")
    return [Hop(host, a) for a in addresses][:MAX_HOPS]
