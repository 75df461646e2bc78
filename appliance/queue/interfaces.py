"""The addresses of this machine's own interfaces (Postfix's inet_interfaces = all), for "loops back
to myself": an MX naming the box's LAN address reaches its wildcard listener as surely as 127.0.0.1.

Read from /proc/net (fib_trie's local /32 routes for IPv4, if_inet6 for IPv6), no new dependency;
kept for a minute, since addresses change rarely (DHCP, an added alias) and a delivery reads them.
"""

from __future__ import annotations

import ipaddress
import time

REFRESH_S = 60.0

_cache: tuple[float, frozenset[str]] | None = None


def local_ipv4(fib_trie: str) -> set[str]:
    """The addresses fib_trie marks '/32 host LOCAL': the kernel's own IPv4 addresses."""
    found: set[str] = set()
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip(" |+-")
        if "/32 host LOCAL" in line:
            if last:
                found.add(last)
        elif text and text[0].isdigit():
            last = text.split()[0]
    return found


def local_ipv6(if_inet6: str) -> set[str]:
    """The addresses of if_inet6's lines (32 hex digits first), as ipaddress writes them."""
    found: set[str] = set()
    for line in if_inet6.splitlines():
        digits = line.split()[0] if line.split() else ""
        if len(digits) == 32:
            try:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(digits))))
            except ValueError:
                continue
    return found


def interface_addresses() -> frozenset[str]:
    """This machine's own interface addresses (IPv4 and IPv6, as ipaddress writes them), cached
    REFRESH_S; empty where /proc/net cannot be read."""
    global _cache  # one cache for the process
    now = time.monotonic()
    if _cache is not None and now - _cache[0] < REFRESH_S:
        return _cache[1]
    addresses = local_ipv4(_read("/proc/net/fib_trie")) | local_ipv6(_read("/proc/net/if_inet6"))
    _cache = (now, frozenset(addresses))
    return _cache[1]


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError:
        return ""
