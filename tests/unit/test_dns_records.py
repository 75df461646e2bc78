"""The records table: what a domain needs, for the wizard, the console and `letterbox dns records`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import dns.zone
import pytest

from appliance import dkim_keys
from appliance.db import Database
from appliance.dns_records import (
    DMARC_VALUE,
    SPF_VALUE,
    DnsRecord,
    detect_public_addresses,
    domain_records,
    format_table,
    records_for,
    relative_name,
    valid_public_address,
    zone_file,
)

DOMAIN, HOST = "example.org", "mail.example.org"


def by_key(records: list[DnsRecord]) -> dict[str, DnsRecord]:
    return {r.key: r for r in records}


def test_every_record_a_domain_needs(tmp_path: Path) -> None:
    key = dkim_keys.generate_key(tmp_path, DOMAIN, "lb1", bits=1024)
    rows = by_key(records_for(DOMAIN, HOST, ipv4="198.51.100.7", ipv6="2001:db8::7", dkim=key))
    assert list(rows) == ["mx", "a", "aaaa", "spf", "dkim", "dmarc", "autoconfig", "autodiscover",
                          "srv-submission", "srv-imaps", "srv-pop3s", "ptr", "ptr6"]
    assert (rows["mx"].rdtype, rows["mx"].name, rows["mx"].value) == ("MX", DOMAIN, f"10 {HOST}.")
    assert (rows["a"].name, rows["a"].value) == (HOST, "198.51.100.7")
    assert (rows["aaaa"].rdtype, rows["aaaa"].value) == ("AAAA", "2001:db8::7")
    assert (rows["spf"].rdtype, rows["spf"].name, rows["spf"].value) == ("TXT", DOMAIN, SPF_VALUE)
    assert rows["dkim"].name == f"lb1._domainkey.{DOMAIN}"
    assert rows["dkim"].value == key.txt_record()
    assert rows["dkim"].value.startswith("v=DKIM1; k=rsa; p=MI")
    assert (rows["dmarc"].name, rows["dmarc"].value) == (f"_dmarc.{DOMAIN}", DMARC_VALUE)
    assert (rows["autoconfig"].rdtype, rows["autoconfig"].name, rows["autoconfig"].value) == (
        "CNAME", f"autoconfig.{DOMAIN}", f"{HOST}.")
    assert rows["autodiscover"].name == f"autodiscover.{DOMAIN}"
    assert (rows["srv-submission"].name, rows["srv-submission"].value) == (
        f"_submission._tcp.{DOMAIN}", f"0 1 587 {HOST}.")
    assert rows["srv-imaps"].value == f"0 1 993 {HOST}."
    assert rows["srv-pop3s"].value == f"0 1 995 {HOST}."
    assert (rows["ptr"].rdtype, rows["ptr"].name, rows["ptr"].where) == ("PTR", "7.100.51.198.in-addr.arpa", "provider")
    assert rows["ptr6"].name.endswith(".ip6.arpa")
    assert all(r.why for r in rows.values())


def test_without_an_address_the_a_record_asks_for_one() -> None:
    rows = by_key(records_for(DOMAIN, HOST))
    assert rows["a"].value is None
    assert "your public IPv4 address" in rows["a"].shown_value
    assert "aaaa" not in rows
    assert "ptr" not in rows
    assert "dkim" not in rows


def test_ipv6_only_box_has_no_a_record() -> None:
    rows = by_key(records_for(DOMAIN, HOST, ipv6="2001:db8::7"))
    assert "a" not in rows
    assert rows["aaaa"].value == "2001:db8::7"


def test_srv_records_name_the_ports_given() -> None:
    rows = by_key(records_for(DOMAIN, HOST, ports={"submission": 10587, "imaps": 10993, "pop3s": 10995}))
    assert rows["srv-imaps"].value == f"0 1 10993 {HOST}."


def test_names_are_lower_case_without_trailing_dot() -> None:
    rows = by_key(records_for("Example.ORG.", "MAIL.Example.org."))
    assert rows["mx"].name == DOMAIN
    assert rows["mx"].value == f"10 {HOST}."


def test_format_table_for_the_terminal() -> None:
    text = format_table(records_for(DOMAIN, HOST, ipv4="198.51.100.7"))
    lines = text.splitlines()
    assert lines[0].split() == ["TYPE", "NAME", "VALUE"]
    assert lines[1].split() == ["MX", DOMAIN, "10", f"{HOST}."]
    assert "Why:" in lines
    assert "  MX example.org: Mail for example.org" in text


@pytest.mark.parametrize(("text", "version", "expected"), [
    ("192.0.32.7", 4, "192.0.32.7"),
    (" 2620:0:2D0::7 ", 6, "2620:0:2d0::7"),
])
def test_valid_public_address(text: str, version: int, expected: str) -> None:
    assert valid_public_address(text, version) == expected


@pytest.mark.parametrize(("text", "version"), [
    ("127.0.0.1", 4), ("::1", 6), ("0.0.0.0", 4), ("224.0.0.1", 4), ("240.0.0.1", 4), ("example.org", 4),
    ("198.51.100.7", 6),
])
def test_invalid_public_address(text: str, version: int) -> None:
    with pytest.raises(ValueError):
        valid_public_address(text, version)


@pytest.mark.parametrize(("text", "version", "words"), [
    ("192.168.1.5", 4, "private address"), ("10.0.0.1", 4, "private address"), ("172.16.0.1", 4, "private address"),
    ("100.64.1.1", 4, "carrier-grade NAT"), ("127.0.0.1", 4, "this machine itself"),
    ("169.254.1.1", 4, "link-local"), ("198.51.100.7", 4, "documentation"), ("203.0.113.5", 4, "documentation"),
    ("192.0.2.1", 4, "documentation"), ("224.0.0.1", 4, "multicast"), ("240.0.0.1", 4, "reserved"),
    ("fd12:3456::1", 6, "unique local"), ("fe80::1", 6, "link-local"), ("2001:db8::7", 6, "documentation"),
    ("::1", 6, "this machine itself"), ("ff02::1", 6, "multicast"), ("::ffff:192.0.32.7", 6, "enter 192.0.32.7"),
])
def test_addresses_the_internet_cannot_reach_are_refused_with_why(text: str, version: int, words: str) -> None:
    """Issue 10 item 7: a LAN address was accepted and the user told to publish an A record for it."""
    with pytest.raises(ValueError) as refused:
        valid_public_address(text, version)
    assert words in str(refused.value)
    if version == 4 and words not in ("multicast", "reserved"):
        assert "router" in str(refused.value) or "provider" in str(refused.value)


def test_detection_only_reports_public_addresses() -> None:
    ipv4, ipv6 = detect_public_addresses()
    for address, family in ((ipv4, socket.AF_INET), (ipv6, socket.AF_INET6)):
        if address is not None:
            socket.inet_pton(family, address)
            assert not address.startswith(("10.", "192.168.", "127."))


def test_domain_records_uses_settings_and_makes_the_dkim_key(tmp_path: Path) -> None:
    async def scenario() -> list[DnsRecord]:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            await db.set_setting("public_ipv4", "198.51.100.7")
            first = await domain_records(db, tmp_path / "dkim", DOMAIN, HOST)
            again = await domain_records(db, tmp_path / "dkim", DOMAIN, HOST)
            assert by_key(first)["dkim"] == by_key(again)["dkim"]  # made once, then reused
            return first
        finally:
            await db.close()

    rows = by_key(asyncio.run(scenario()))
    assert rows["a"].value == "198.51.100.7"
    selector = rows["dkim"].name.split(".")[0]
    assert (tmp_path / "dkim" / DOMAIN / f"{selector}.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(("name", "zone", "expected"), [
    ("example.org", "example.org", "@"), ("mail.example.org", "example.org", "mail"),
    ("_dmarc.example.org", "example.org", "_dmarc"), ("lb1._domainkey.example.org", "Example.ORG.", "lb1._domainkey"),
    ("mail.other.net", "example.org", None), ("badexample.org", "example.org", None),
])
def test_names_relative_to_the_zone(name: str, zone: str, expected: str | None) -> None:
    """Registrars' forms ask for '@', 'mail', '_dmarc' rather than the full name (issue 18)."""
    assert relative_name(name, zone) == expected


def test_zone_file_loads_and_holds_every_record(tmp_path: Path) -> None:
    key = dkim_keys.generate_key(tmp_path, DOMAIN, "lb1", bits=2048)
    records = records_for(DOMAIN, HOST, ipv4="198.51.100.7", dkim=key)
    text = zone_file(DOMAIN, records)
    assert "$ORIGIN example.org." in text
    for short in ("@", "_dmarc", "mail"):
        assert f"\n{short} " in text
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False, relativize=False)
    for record in records:
        if record.where == "provider":
            continue
        rdataset = zone.find_rdataset(record.name + ".", record.rdtype)
        if record.rdtype == "TXT":
            # a 2048-bit key is longer than one 255-character string: split, and joined back equal
            assert [b"".join(r.strings).decode() for r in rdataset] == [record.value]
        else:
            assert [r.to_text() for r in rdataset] == [record.value]
    assert "; set by your provider" in text  # the PTR is shown but is not a record of this zone
    assert len(max(text.splitlines(), key=len)) > 255  # the key really needed splitting


def test_zone_file_comments_out_what_is_not_known_yet() -> None:
    text = zone_file(DOMAIN, records_for(DOMAIN, "mail.other.net"))
    assert "; mail.other.net. IN A (your public IPv4 address)" in text
    assert "10 mail.other.net." in text
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False)
    assert zone.get_rdataset("mail", "A") is None


def test_zone_file_escapes_quotes() -> None:
    record = DnsRecord("spf", "TXT", DOMAIN, 'v=spf1 "odd" \\ -all', "why")
    text = zone_file(DOMAIN, [record])
    zone = dns.zone.from_text(text, origin=DOMAIN, check_origin=False)
    assert next(iter(zone.find_rdataset("@", "TXT"))).strings == (b'v=spf1 "odd" \\ -all',)
