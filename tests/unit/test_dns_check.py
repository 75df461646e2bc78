"""Live DNS checks against a real authoritative server on loopback (tests/support/dns_server.py):
each kind of record found, missing and wrong; lookups that fail; the saved results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import dkim_keys, dns_check
from appliance.db import Database
from appliance.dns_check import CheckResult, check_domain, check_records, load_results, save_results, summary
from appliance.dns_records import DnsRecord, records_for
from appliance.queue.resolver import make_async_resolver
from tests.support.dns_server import ZoneServer
from tests.support.ports import free_port

DOMAIN, HOST = "example.test", "mail.example.test"
IPV4, IPV6 = "198.51.100.7", "2001:db8::7"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dkim_keys.DkimKey:
    return dkim_keys.generate_key(tmp_path_factory.mktemp("dkim"), DOMAIN, "lb1", bits=1024)


def right_zone(key: dkim_keys.DkimKey) -> dict[tuple[str, str], list[str]]:
    """Every record published as the table asks (the DKIM key split in 255-byte strings, as zone files do)."""
    txt = key.txt_record()
    dkim_strings = " ".join(f'"{txt[i:i + 255]}"' for i in range(0, len(txt), 255))
    return {
        (DOMAIN, "MX"): [f"10 {HOST}."],
        (HOST, "A"): [IPV4],
        (HOST, "AAAA"): [IPV6],
        (DOMAIN, "TXT"): ['"v=spf1 mx -all"', '"google-site-verification=abc"'],
        (key.record_name, "TXT"): [dkim_strings],
        (f"_dmarc.{DOMAIN}", "TXT"): ['"v=DMARC1; p=quarantine"'],
        (f"autoconfig.{DOMAIN}", "CNAME"): [f"{HOST}."],
        (f"autodiscover.{DOMAIN}", "CNAME"): [f"{HOST}."],
        (f"_submission._tcp.{DOMAIN}", "SRV"): [f"0 1 587 {HOST}."],
        (f"_imaps._tcp.{DOMAIN}", "SRV"): [f"0 1 993 {HOST}."],
        (f"_pop3s._tcp.{DOMAIN}", "SRV"): [f"0 1 995 {HOST}."],
        ("7.100.51.198.in-addr.arpa", "PTR"): [f"{HOST}."],
        ("7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"): [f"{HOST}."],
    }


@pytest.fixture
def zone(key: dkim_keys.DkimKey) -> Iterator[ZoneServer]:
    with ZoneServer(right_zone(key)) as server:
        yield server


def records(key: dkim_keys.DkimKey) -> list[DnsRecord]:
    return records_for(DOMAIN, HOST, ipv4=IPV4, ipv6=IPV6, dkim=key)


def check(zone: ZoneServer, key: dkim_keys.DkimKey) -> dict[str, CheckResult]:
    results = asyncio.run(check_records(records(key), make_async_resolver(zone.address, cached=False), hostname=HOST))
    return {r.key: r for r in results}


def test_everything_right_is_found(zone: ZoneServer, key: dkim_keys.DkimKey) -> None:
    results = check(zone, key)
    assert {k: r.status for k, r in results.items() if r.status != "found"} == {}
    assert results["mx"].found == (f"10 {HOST}.",)
    assert results["spf"].found == ("v=spf1 mx -all",)  # the other TXT record is not SPF
    assert results["dkim"].found == (key.txt_record(),)  # strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)


def test_everything_missing(key: dkim_keys.DkimKey) -> None:
    with ZoneServer({}) as empty:
        results = check(empty, key)
    assert {r.status for r in results.values()} == {"missing"}
    assert all(r.found == () for r in results.values())


@pytest.mark.parametrize(("name", "rdtype", "values", "key_", "note"), [
    (DOMAIN, "MX", ["10 mx.elsewhere.example."], "mx", "no MX names"),
    (HOST, "A", ["198.51.100.8"], "a", "does not point to 198.51.100.7"),
    (HOST, "AAAA", ["2001:db8::8"], "aaaa", "does not point"),
    (DOMAIN, "TXT", ['"v=spf1 include:_spf.elsewhere.example -all"'], "spf", "does not allow this box"),
    (DOMAIN, "TXT", ['"v=spf1 mx -all"', '"v=spf1 a -all"'], "spf", "more than one SPF record"),
    (f"_dmarc.{DOMAIN}", "TXT", ['"v=DMARC1; p=none"', '"v=DMARC1; p=reject"'], "dmarc", "more than one"),
    (f"_dmarc.{DOMAIN}", "TXT", ['"some verification token"'], "dmarc", "without v=DMARC1"),
    (f"autoconfig.{DOMAIN}", "CNAME", ["mail.elsewhere.example."], "autoconfig", "another host"),
    (f"_imaps._tcp.{DOMAIN}", "SRV", [f"0 1 143 {HOST}."], "srv-imaps", "port 993"),
    (f"_submission._tcp.{DOMAIN}", "SRV", ["0 1 587 smtp.elsewhere.example."], "srv-submission", "no entry"),
    ("7.100.51.198.in-addr.arpa", "PTR", ["customer-7.isp.example."], "ptr", "named otherwise"),
])
def test_wrong_records_show_what_was_found(
    zone: ZoneServer, key: dkim_keys.DkimKey, name: str, rdtype: str, values: list[str], key_: str, note: str
) -> None:
    zone.set(name, rdtype, values)
    result = check(zone, key)[key_]
    assert result.status == "wrong", result
    assert note in result.note
    assert result.found, "the values found are shown so the person can compare"


def test_wrong_dkim_key(zone: ZoneServer, key: dkim_keys.DkimKey, tmp_path: Path) -> None:
    other = dkim_keys.generate_key(tmp_path, DOMAIN, "lb1", bits=1024)
    zone.set(key.record_name, "TXT", [f'"{other.txt_record()[:250]}" "{other.txt_record()[250:]}"'])
    result = check(zone, key)["dkim"]
    assert (result.status, result.note) == ("wrong", "another key is published under this selector")


@pytest.mark.parametrize(("name", "rdtype", "key_"), [
    (DOMAIN, "MX", "mx"), (HOST, "A", "a"), (f"_dmarc.{DOMAIN}", "TXT", "dmarc"),
    (f"autodiscover.{DOMAIN}", "CNAME", "autodiscover"), (f"_pop3s._tcp.{DOMAIN}", "SRV", "srv-pop3s"),
    ("7.100.51.198.in-addr.arpa", "PTR", "ptr"),
])
def test_one_record_missing(zone: ZoneServer, key: dkim_keys.DkimKey, name: str, rdtype: str, key_: str) -> None:
    zone.remove(name, rdtype)
    results = check(zone, key)
    assert results[key_].status == "missing"
    assert sum(r.status != "found" for r in results.values()) == 1


def test_spf_without_spf_record_is_missing_and_shows_other_txt(zone: ZoneServer, key: dkim_keys.DkimKey) -> None:
    zone.set(DOMAIN, "TXT", ['"google-site-verification=abc"'])
    result = check(zone, key)["spf"]
    assert result.status == "missing"
    assert result.found == ("google-site-verification=abc",)


@pytest.mark.parametrize("spf", ["v=spf1 a:mail.example.test ~all", "v=spf1 ip4:198.51.100.7 -all",
                                 "v=spf1 +mx include:_spf.elsewhere.example ~all",
                                 # Receivers evaluate these to pass for the box's addresses; the words alone
                                 # said "wrong" (and the daily alert mailed it).
                                 "v=spf1 ip4:198.51.100.7/32 ip6:2001:db8::/32 -all",
                                 "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8::7 -all",
                                 "v=spf1 include:_spf.example.test -all",
                                 "v=spf1 redirect=_spf.example.test"])
def test_spf_variants_that_allow_the_box(zone: ZoneServer, key: dkim_keys.DkimKey, spf: str) -> None:
    zone.set(f"_spf.{DOMAIN}", "TXT", ['"v=spf1 a:mail.example.test -all"'])
    zone.set(DOMAIN, "TXT", [f'"{spf}"'])
    assert check(zone, key)["spf"].status == "found"


@pytest.mark.parametrize("spf", ["v=spf1 ip4:198.51.100.0/24 -all",  # the IPv6 address is not in it
                                 "v=spf1 include:_spf.example.test -all",  # nor in the include
                                 "v=spf1 include:_loop.example.test -all"])  # an include loop: permerror
def test_spf_that_receivers_fail_for_one_address_of_the_box_is_wrong(
    zone: ZoneServer, key: dkim_keys.DkimKey, spf: str,
) -> None:
    zone.set(f"_spf.{DOMAIN}", "TXT", ['"v=spf1 ip4:198.51.100.7 -all"'])
    zone.set(f"_loop.{DOMAIN}", "TXT", [f'"v=spf1 include:_loop.{DOMAIN} -all"'])
    zone.set(DOMAIN, "TXT", [f'"{spf}"'])
    result = check(zone, key)["spf"]
    assert (result.status, result.note) == ("wrong", "the SPF record does not allow this box to send (add 'mx')")


def test_autoconfig_as_address_records_of_the_box(zone: ZoneServer, key: dkim_keys.DkimKey) -> None:
    zone.remove(f"autoconfig.{DOMAIN}", "CNAME")
    zone.set(f"autoconfig.{DOMAIN}", "A", [IPV4])
    assert check(zone, key)["autoconfig"].status == "found"
    zone.set(f"autoconfig.{DOMAIN}", "A", ["203.0.113.99"])
    result = check(zone, key)["autoconfig"]
    assert (result.status, result.found) == ("wrong", ("203.0.113.99",))


def test_a_record_without_a_known_address_is_found_when_any_exists(zone: ZoneServer) -> None:
    rows = records_for(DOMAIN, HOST)
    results = asyncio.run(check_records(rows, make_async_resolver(zone.address, cached=False), hostname=HOST))
    assert {r.key: r.status for r in results}["a"] == "found"


def test_a_dns_server_that_does_not_answer_is_an_error_not_missing(
    monkeypatch: pytest.MonkeyPatch, key: dkim_keys.DkimKey
) -> None:
    monkeypatch.setattr(dns_check, "CHECK_LIFETIME", 0.3)
    silent = make_async_resolver(f"127.0.0.1:{free_port()}")
    results = asyncio.run(check_records(records(key)[:2], silent, hostname=HOST))
    assert [r.status for r in results] == ["error", "error"]
    assert "lookup failed" in results[0].note


def test_check_domain_through_the_resolver_setting_and_saved_results(tmp_path: Path) -> None:
    async def scenario(zone: ZoneServer) -> None:
        db = await Database.open(tmp_path / "db.sqlite")
        try:
            await db.set_setting("dns_resolver", zone.address)
            await db.set_setting("public_ipv4", IPV4)
            key = await dkim_keys.ensure_key(db, tmp_path / "dkim", DOMAIN)
            zone.set(key.record_name, "TXT", [f'"{key.txt_record()[:200]}" "{key.txt_record()[200:]}"'])
            results = await check_domain(db, tmp_path / "dkim", DOMAIN, HOST)
            statuses = {r.key: r.status for r in results}
            assert statuses["dkim"] == "found"
            assert statuses["mx"] == "found"
            assert statuses["dmarc"] == "missing"
            assert await load_results(db, DOMAIN) is None
            await save_results(db, DOMAIN, results, now=1_800_000_000)
            loaded = await load_results(db, DOMAIN)
            assert loaded == (1_800_000_000, results)
            assert summary(results)["found"] == 2
            assert sum(summary(results).values()) == len(results)
            await db.set_setting("dns_check:" + DOMAIN, "not json")
            assert await load_results(db, DOMAIN) is None
        finally:
            await db.close()

    with ZoneServer({(DOMAIN, "MX"): [f"10 {HOST}."]}) as zone:
        asyncio.run(scenario(zone))


def test_format_results_lists_what_is_wrong() -> None:
    text = dns_check.format_results([
        CheckResult("mx", "MX", DOMAIN, "found", (f"10 {HOST}.",)),
        CheckResult("a", "A", HOST, "wrong", ("198.51.100.8",), "does not point to 198.51.100.7"),
    ])
    assert text.splitlines() == [
        f"FOUND    MX    {DOMAIN}",
        f"WRONG    A     {HOST}",
        "         does not point to 198.51.100.7",
        "         found: 198.51.100.8",
    ]
