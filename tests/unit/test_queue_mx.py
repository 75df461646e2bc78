"""MX ordering, null MX and address literals (RFC 5321 5.1, RFC 7505), pure (issue 7)."""

from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from appliance.queue.interfaces import interface_addresses, local_ipv4, local_ipv6
from appliance.queue.mx import (
    MxHost,
    RouteError,
    address_literal,
    dns_domain,
    is_null_mx,
    order_mx,
    own_addresses,
    usable_mx,
)


def test_lower_preference_first_and_equal_preferences_shuffled() -> None:
    records = [MxHost(20, "c"), MxHost(10, "a"), MxHost(10, "b"), MxHost(30, "d")]
    seen = set()
    for seed in range(40):
        ordered = order_mx(records, random.Random(seed))
        assert {ordered[0].name, ordered[1].name} == {"a", "b"}
        assert [r.name for r in ordered[2:]] == ["c", "d"]
        seen.add(tuple(r.name for r in ordered[:2]))
    assert seen == {("a", "b"), ("b", "a")}  # both orders happen


def test_null_mx() -> None:
    assert is_null_mx([MxHost(0, "")])
    assert not is_null_mx([MxHost(10, "")])  # RFC 7505 3: preference 0 only
    assert not is_null_mx([MxHost(0, ""), MxHost(10, "mx")])
    assert usable_mx([MxHost(0, ""), MxHost(10, "mx")], []) == [MxHost(10, "mx")]


def test_our_own_name_and_worse_hosts_are_dropped() -> None:
    records = [MxHost(10, "primary.test"), MxHost(20, "mail.example.test"), MxHost(30, "tertiary.test")]
    assert usable_mx(records, ["Mail.Example.Test."]) == [MxHost(10, "primary.test")]
    assert usable_mx([MxHost(10, "mail.example.test")], ["mail.example.test"]) == []


def test_own_addresses_are_those_that_reach_our_own_mx() -> None:
    everywhere = own_addresses([("0.0.0.0", 25)], 25, ["203.0.113.5", "2001:db8::5", ""])  # a wildcard listener
    assert [everywhere(a) for a in ("127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "203.0.113.5", "2001:db8:0::5")] == [True] * 6
    others = [a for a in ("192.0.2.1", "203.0.113.6", "not an address") if a not in interface_addresses()]
    assert [everywhere(a) for a in others] == [False] * len(others)  # (a test machine may have 192.0.2.1)
    one = own_addresses([("192.0.2.7", 25), ("0.0.0.0", 587)], 25, [])
    assert one("192.0.2.7")
    assert not one("127.0.0.1")  # another program may listen there on port 25
    assert not own_addresses([("127.0.0.1", 10025)], 25, [])("127.0.0.1")  # `make run`: its MX is not on 25
    assert not own_addresses([], 25, ["203.0.113.5"])("203.0.113.5")  # no listener


def test_a_wildcard_listener_owns_the_machine_s_interface_addresses() -> None:
    """An MX naming the box's LAN address loops back to myself as 127.0.0.1 does (Postfix's
    inet_interfaces = all); it was missed. The address is the one the kernel picks to go out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # a route lookup only: UDP sends nothing on connect
        except OSError:
            pytest.skip("no route off this machine")
        lan = probe.getsockname()[0]
    if ipaddress.ip_address(lan).is_loopback:
        pytest.skip("no interface but loopback")
    assert own_addresses([("0.0.0.0", 25)], 25, [])(lan)
    assert not own_addresses([("127.0.0.1", 25)], 25, [])(lan)  # that listener is not reached there


def test_interface_addresses_are_read_from_proc_net() -> None:
    fib_trie = """Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
"""
    assert local_ipv4(fib_trie) == {"127.0.0.1", "192.0.2.2"}
    if_inet6 = ("fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
                "fd000000000000000000000000000002 04 40 00 82     eth0\n"
                "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert local_ipv6(if_inet6) == {"fe80::fc:ff:fe00:1", "fd00::2", "::1"}


@pytest.mark.parametrize(("domain", "expected"), [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[ipv6:::1]", "::1"),
    ("[300.1.1.1]", None),
    ("example.net", None),
])
def test_address_literals(domain: str, expected: str | None) -> None:
    assert address_literal(domain) == expected


def test_dns_names_in_a_labels() -> None:
    assert dns_domain("Example.NET.") == "example.net"
    assert dns_domain("bücher.example") == "xn--bcher-kva.example"
    with pytest.raises(RouteError) as info:
        dns_domain("a\u200db.example")
    assert info.value.permanent
