"""The status checklist (issue 18): each check against right, wrong and unreachable answers, on a real
box, with a DNS zone, a "remote MX" and a closed port on loopback; the console shows it and checks
again on demand."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import socket
from collections.abc import Iterator

import pytest

from appliance import status_checks
from appliance.dns_check import CheckResult, save_results
from appliance.queue.smarthost import Smarthost
from appliance.status_checks import Item, Probes
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.support.dns_server import ZoneServer

HOST = "mail.example.test"
IPV4 = "192.0.2.25"
DOMAIN = "example.test"


@contextlib.contextmanager
def listening() -> Iterator[int]:
    """A TCP port that accepts (the remote MX of the port-25 check)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(box: BoxHandle, probes: Probes | None = None) -> dict[str, Item]:
    return {item.key: item for item in box.run(status_checks.run_all(box.services, probes or Probes(
        port25_target=lambda: f"127.0.0.1:{closed_port()}", clock_synchronised=lambda: True)))}


def publish_all_records(box: BoxHandle, zone: ZoneServer, domain: str) -> None:
    """Every record of the domain's DNS table served by the loopback zone, as the console shows it
    (the PTR as the address's provider would set it)."""
    from appliance.admin import Admin
    from tests.e2e.test_web_wizard import zone_value

    for record in box.run(Admin.of(box.services).dns_records(domain, box.services.config.published_ports())):
        assert record.value is not None
        zone.set(record.name, record.rdtype, [zone_value(record.rdtype, record.value)])


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer(ttl=0) as server:
        yield server


@pytest.fixture
def checked(box: BoxHandle, zone: ZoneServer) -> BoxHandle:
    box.run(box.services.accounts.add_domain(DOMAIN))
    box.run(box.services.settings.save(dns_resolver=zone.address, public_ipv4=IPV4))
    return box


def test_reverse_dns_right_wrong_and_unreachable(checked: BoxHandle, zone: ZoneServer) -> None:
    ptr = "25.2.0.192.in-addr.arpa"
    zone.set(ptr, "PTR", [f"{HOST}."])
    zone.set(HOST, "A", [IPV4])
    assert run(checked)["ptr"].level == "ok"
    zone.set(HOST, "A", ["192.0.2.99"])
    item = run(checked)["ptr"]
    assert (item.level, item.summary) == ("fail", f"{HOST} does not resolve back to {IPV4}")
    zone.set(ptr, "PTR", ["dsl-192-0-2-25.provider.example."])
    item = run(checked)["ptr"]
    assert item.level == "fail"
    assert "named dsl-192-0-2-25.provider.example, not mail.example.test" in item.summary
    assert "reverse DNS name (PTR)" in item.fix
    zone.remove(ptr, "PTR")
    assert run(checked)["ptr"].summary == f"{IPV4} has no reverse DNS name (PTR)"
    # DNS that does not answer: unknown, never a false "fail".
    checked.run(checked.services.settings.save(dns_resolver=f"127.0.0.1:{closed_port()}"))
    assert run(checked)["ptr"].level == "unknown"


def test_outbound_port_25_open_blocked_and_relay(checked: BoxHandle) -> None:
    with listening() as port:
        item = run(checked, Probes(port25_target=lambda: f"127.0.0.1:{port}", clock_synchronised=lambda: True))["port25"]
    assert (item.level, item.summary) == ("ok", f"Connected to 127.0.0.1:{port}: mail can leave directly.")
    item = run(checked)["port25"]
    assert item.level == "fail"
    assert "relay (smarthost)" in item.fix
    assert item.link == "/console/sending"
    with listening() as port:  # the target is a setting when no probe overrides it
        checked.run(checked.services.settings.save(port25_probe=f"127.0.0.1:{port}"))
        assert run(checked, Probes(clock_synchronised=lambda: True))["port25"].level == "ok"
    checked.run(checked.services.settings.save(relay=Smarthost(host="relay.example.test", port=587, tls="starttls")))
    assert run(checked)["port25"].level == "ok"


def test_outbound_port_25_unknown_when_the_name_does_not_resolve(checked: BoxHandle) -> None:
    """A box without working DNS was told "outbound port 25 looks blocked" and to ask its provider to open it."""
    item = run(checked, Probes(port25_target=lambda: "mx.no-such-name.invalid:25", clock_synchronised=lambda: True))["port25"]
    assert item.level == "unknown"
    assert item.summary.startswith("Could not look up mx.no-such-name.invalid (")
    assert "blocked" not in item.summary
    assert "DNS" in item.fix


def test_dns_records_certificate_backups_disk_queue_clock(checked: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    items = run(checked)
    assert items["dns"].level == "warn"  # never checked
    checked.run(save_results(checked.services.db, DOMAIN, [
        CheckResult("mx", "MX", DOMAIN, "found"), CheckResult("spf", "TXT", DOMAIN, "missing"),
        CheckResult("dmarc", "TXT", f"_dmarc.{DOMAIN}", "wrong")]))
    items = run(checked)
    assert items["dns"].level == "fail"
    assert "Publish these 2 records" in items["dns"].fix
    checked.run(save_results(checked.services.db, DOMAIN, [CheckResult("mx", "MX", DOMAIN, "found")]))
    assert run(checked)["dns"].level == "ok"

    assert items["certificate"].level == "ok"  # the test CA's certificate: not self-signed, a year left
    # A renewal that was due and failed shows at once, not only when 14 days are left.
    for key, value in (("cert_source", "acme"), ("cert_next_attempt", "1"),
                       ("cert_last_error", "the CA could not reach http://mail.example.test/.well-known/")):
        checked.run(checked.services.db.set_setting(key, value))
    renewal = run(checked)["certificate"]
    assert renewal.level == "fail"
    assert "renewing it failed: the CA could not reach" in renewal.summary
    checked.run(checked.services.db.set_setting("cert_next_attempt", ""))  # renewed: certificates.py clears it
    assert run(checked)["certificate"].level == "ok"
    assert items["backups"].level == "warn"
    assert "turn on daily backups" in items["backups"].fix
    checked.run(checked.services.db.set_setting("backup_last", '{"at": 1, "ok": false, "text": "disk full"}'))
    backups = run(checked)["backups"]
    assert (backups.level, backups.summary) == ("fail", "The last backup failed: disk full")
    assert items["disk"].level == "ok"
    monkeypatch.setattr(status_checks, "DISK_FAIL_PERCENT", 0)
    assert run(checked)["disk"].level == "fail"
    assert items["queue"].level == "ok"
    assert items["clock"].level == "ok"
    assert run(checked, Probes(clock_synchronised=lambda: False))["clock"].level == "fail"
    assert run(checked, Probes(clock_synchronised=lambda: None))["clock"].level == "unknown"


def test_a_hanging_check_is_unknown_not_a_stuck_page(checked: BoxHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    async def hangs(probes: Probes) -> Item:
        await asyncio.sleep(60)
        raise AssertionError

    monkeypatch.setattr(status_checks, "CHECK_TIMEOUT", 0.5)
    monkeypatch.setattr(status_checks, "check_clock", hangs)
    assert run(checked)["clock"].level == "unknown"


def test_the_console_shows_the_checklist_and_checks_now(checked: BoxHandle) -> None:
    checked.services.status_probes = Probes(port25_target=lambda: f"127.0.0.1:{closed_port()}",
                                            clock_synchronised=lambda: True)
    with admin_console(checked) as web:
        page = web.get("/console")
        assert "Not checked yet." in page.text
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        assert web.post("/console/status/check", data={}).status_code == 403  # the form's token is needed
        # Check now looks the DNS records up again: the first time makes the domain's DKIM key too.
        response = web.post("/console/status/check", data={"csrf": token.group(1)}, timeout=60)
        assert response.status_code == 303
        page = web.get("/console")
    assert 'id="check-port25"' in page.text
    section = page.text.split('id="checklist"')[1].split("</section>")[0]
    # problems first, each with what to do and where
    assert section.index("check-port25") < section.index("check-clock")
    assert 'href="/console/sending">Fix it</a>' in section


def test_the_dns_item_links_each_domain_whose_records_are_missing(checked: BoxHandle) -> None:
    """With two domains or more, the item said 'check again on the domain's page' and linked the list of
    domains: now one domain with missing records is that domain's "Fix it", several are each linked by
    name after 'each domain's page', on the status page too; never-checked ones alike."""
    book = "xn--bcher-kva.example"
    for domain in (book, "fine.example"):
        checked.run(checked.services.accounts.add_domain(domain))
    checked.run(save_results(checked.services.db, "fine.example", [CheckResult("mx", "MX", "fine.example", "found")]))
    unchecked = run(checked)["dns"]
    assert (unchecked.fix, unchecked.link) == ("Open each domain and press Check now:", "/console/domains")
    assert unchecked.links == ((DOMAIN, f"/console/domains/{DOMAIN}"),
                               (f"bücher.example ({book})", f"/console/domains/{book}"))
    assert unchecked.summary == f"Not checked yet: {DOMAIN}, bücher.example ({book})"
    checked.run(save_results(checked.services.db, DOMAIN, [CheckResult("spf", "TXT", DOMAIN, "missing")]))
    checked.run(save_results(checked.services.db, book, [CheckResult("mx", "MX", book, "found")]))
    one = run(checked)["dns"]
    assert one.fix == "Publish this record where you manage your DNS, then check again on the domain's page."
    assert (one.link, one.links) == (f"/console/domains/{DOMAIN}", ())
    checked.run(save_results(checked.services.db, book, [CheckResult("mx", "MX", book, "wrong")]))
    both = run(checked)["dns"]
    assert both.fix == "Publish these 2 records where you manage your DNS, then check again on each domain's page:"
    assert [path for _, path in both.links] == [f"/console/domains/{DOMAIN}", f"/console/domains/{book}"]
    with admin_console(checked) as web:
        page = web.get("/console")
    item = html.unescape(page.text.split('id="check-dns"')[1].split("</li>")[0])
    assert (f"then check again on each domain's page: <a href=\"/console/domains/{DOMAIN}\">{DOMAIN}</a>,"
            f" <a href=\"/console/domains/{book}\">bücher.example ({book})</a></p>") in item
    assert "Fix it" not in item


def test_own_address_on_a_blocklist(checked: BoxHandle, zone: ZoneServer) -> None:
    assert run(checked)["blocklists"].level == "ok"  # no answer for the name: NXDOMAIN, not listed
    zone.set("25.2.0.192.zen.spamhaus.org", "A", ["127.0.0.2"])
    item = run(checked)["blocklists"]
    assert (item.level, item.summary) == ("fail", f"Listed: {IPV4} on zen.spamhaus.org (127.0.0.2)")
    zone.set("25.2.0.192.zen.spamhaus.org", "A", ["127.255.255.254"])  # Spamhaus: query via a public resolver
    item = run(checked)["blocklists"]
    assert item.level == "unknown"
    assert "resolver" in item.fix


def test_a_backup_made_by_hand_counts(checked: BoxHandle) -> None:
    """A backup made with "Back up now" or `letterbox backup create` (Admin.create_backup, the function both
    call) is the last backup: the checklist said "No backup has been made and none is scheduled" after it."""
    from appliance.admin import Admin

    admin = Admin.of(checked.services)
    assert run(checked)["backups"].summary == "No backup has been made and none is scheduled."
    checked.run(admin.make_backup_key())
    made = checked.run(admin.create_backup())
    assert made.path.is_file()
    item = run(checked)["backups"]
    assert item.level == "ok", item
    assert item.summary.startswith("Last backup ")
