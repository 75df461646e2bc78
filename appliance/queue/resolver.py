"""Which DNS server the box asks: the system's (resolv.conf), or the `dns_resolver` setting.

The setting ("127.0.0.1:5353", "[::1]:53", "192.0.2.1") exists for tests, which serve a zone on
loopback, and for boxes whose upstream resolver is not trustworthy (a local validating resolver).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TypeVar

import dns.asyncresolver
import dns.resolver

from appliance.queue.dns_cache import cache_for

R = TypeVar("R", bound=dns.resolver.BaseResolver)

log = logging.getLogger("letterbox.dns")

DNS_PORT = 53
QUERY_TIMEOUT = 5.0  # seconds for one server to answer one query
QUERY_LIFETIME = 15.0  # seconds for a whole lookup, retries included
FALLBACK_NAMESERVER = "127.0.0.1"  # when there is no resolv.conf at all (a bare container)


def parse_nameserver(text: str) -> tuple[str, int]:
    """'127.0.0.1:5353' -> ('127.0.0.1', 5353); '[::1]:53', '::1', '192.0.2.1' work too."""
    text = text.strip()
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"not a resolver address: {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    address = ipaddress.ip_address(host)  # raises ValueError for a name: a resolver is given by address
    # No DNS server answers from these: 0.0.0.0, 224.0.0.1 or 255.255.255.255 were taken, and every
    # lookup of the box (MX, the DNS checks, the blocklists) then failed.
    if address.is_unspecified or address.is_multicast or address == _BROADCAST:
        raise ValueError(f"not a resolver address: {text!r}")
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _port(digits: str, text: str) -> int:
    """ASCII digits only: int() also takes '5_3', '+53' and other scripts' digits."""
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"bad port in {text!r}")
    return int(digits)


def configure(resolver: dns.resolver.BaseResolver, setting: str | None) -> None:
    resolver.timeout = QUERY_TIMEOUT
    resolver.lifetime = QUERY_LIFETIME
    if setting:
        host, port = parse_nameserver(setting)
        resolver.nameservers = [host]
        resolver.port = port


def _system_or_fallback(resolver: dns.resolver.BaseResolver) -> None:
    try:
        resolver.read_resolv_conf("/etc/resolv.conf")
    except (dns.resolver.NoResolverConfiguration, OSError):
        log.warning("no usable /etc/resolv.conf; asking %s", FALLBACK_NAMESERVER)
        resolver.nameservers = [FALLBACK_NAMESERVER]


def _attach_cache(resolver: dns.resolver.BaseResolver) -> None:
    # Keyed by the servers asked, not by the setting's text: "127.0.0.1:53" and "127.0.0.1" share,
    # and the system's resolv.conf changing under us gets a fresh cache too.
    resolver.cache = cache_for((tuple(str(n) for n in resolver.nameservers), resolver.port))


def make_async_resolver(setting: str | None, *, cached: bool = True) -> dns.asyncresolver.Resolver:
    """`cached=False` for the diagnostics a person runs right after changing their DNS (dns_check,
    the certificate preflight): they must show what the servers say now, not what was seen before."""
    return _set_up(dns.asyncresolver.Resolver(configure=False), setting, cached)


def make_resolver(setting: str | None, *, cached: bool = True) -> dns.resolver.Resolver:
    return _set_up(dns.resolver.Resolver(configure=False), setting, cached)


def _set_up(resolver: R, setting: str | None, cached: bool) -> R:
    """The one way both kinds are configured: the setting's server, or the system's (or a fallback)."""
    if not setting:
        _system_or_fallback(resolver)
    configure(resolver, setting)
    if cached:
        _attach_cache(resolver)
    return resolver
