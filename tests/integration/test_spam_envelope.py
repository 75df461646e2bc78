"""The MX's connection- and envelope-time spam layers against a DNS zone served on loopback (issue 16):
DNS blocklists (listed, unlisted, refused-query answers, timeouts), the domain blocklist, greylisting
(smtplib and swaks retrying), early talkers and the greeting delay, and the CLI for the greylist.

The box's default `skip_networks` exempts loopback, where these tests run: each test switches that
off (skip_networks=()) to exercise the layers from 127.0.0.x, as a client from the internet."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from appliance.admin import Admin
from appliance.spam import greylist
from appliance.spam.decisions import DBL, DEFER, DNSBL, EARLY_TALKER, GREYLIST, REJECT
from tests.conftest import LETTERBOX, BoxHandle, require_program
from tests.support.dns_server import ZoneServer
from tests.support.polling import wait_until
from tests.support.smtp_wire import Wire

ALICE, PASSWORD = "alice@example.test", "alice's long password"
IP_LIST, DOMAIN_LIST = "bl.lists.test", "dbl.lists.test"
MESSAGE = b"From: Bob <bob@sender.test>\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = ZoneServer(ttl=0)  # records change within a test: nothing may be cached
    server.start()
    try:
        yield server
    finally:
        server.stop()


def configure(box: BoxHandle, **spam: Any) -> None:
    """Save spam settings over the test defaults: every layer reachable from loopback, none but those
    asked for switched on."""
    async def save() -> None:
        settings = box.services.settings
        base = replace(settings.now.spam, skip_networks=(), dnsbl=False, domain_blocklist=False, greylist=False,
                       early_talker=False, greeting_delay=0.0, dnsbl_lists=(IP_LIST,), domain_lists=(DOMAIN_LIST,))
        await settings.save(spam=replace(base, **spam))

    box.run(save())


@pytest.fixture
def mx(box: BoxHandle, zone: ZoneServer) -> BoxHandle:
    box.add_user(ALICE, PASSWORD)
    box.run(box.services.settings.save(dns_resolver=zone.address))
    box.services.blocklists.lookup_lifetime = 1.0  # a silent resolver costs a second, not four
    return box


def rcpt_from(box: BoxHandle, source: str, sender: str = "bob@sender.test", helo: str = "mta.sender.test",
              data: bool = False) -> tuple[int, str]:
    """One transaction from a loopback source address; the RCPT reply (and DATA's when it passed)."""
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30, source_address=(source, 0)) as client:
        client.ehlo(helo)
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt(ALICE)
        if code == 250 and data:
            code, text = client.data(MESSAGE)
        return code, text.decode()


def admin(box: BoxHandle) -> Admin:
    return Admin.of(box.services)


def decisions(box: BoxHandle, layer: str) -> list[tuple[str, str, str]]:
    return [(d.verdict, d.client_ip, d.reason) for d in box.run(box.services.spam_decisions.recent(layer=layer))]


# --- DNS blocklists ----------------------------------------------------------------------------------------

def test_a_listed_client_is_refused_with_554_naming_the_list(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set(f"7.0.0.127.{IP_LIST}", "A", ["127.0.0.2"])
    configure(mx, dnsbl=True)
    code, text = rcpt_from(mx, "127.0.0.7")
    assert code == 554
    assert f"blocked using {IP_LIST}" in text
    assert "[127.0.0.7]" in text
    assert rcpt_from(mx, "127.0.0.8", data=True)[0] == 250  # not listed: NXDOMAIN
    with smtplib.SMTP("127.0.0.1", mx.port("smtp"), timeout=30, source_address=("127.0.0.7", 0)) as client:
        client.ehlo("mta.sender.test")
        client.mail("bob@sender.test")
        assert client.rcpt("postmaster@example.test")[0] == 250  # RFC 5321 4.5.1: still reachable
    assert decisions(mx, DNSBL) == [(REJECT, "127.0.0.7", f"listed on {IP_LIST} (127.0.0.2)")]
    [report] = [r for r in mx.run(admin(mx).dnsbl_status()) if r.zone == IP_LIST]
    assert report.state == "ok"


def test_the_sender_domain_on_a_domain_list_is_refused(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set(f"spam.example.{DOMAIN_LIST}", "A", ["127.0.1.2"])
    configure(mx, domain_blocklist=True)
    code, text = rcpt_from(mx, "127.0.0.7", sender="x@spam.example")
    assert code == 554
    assert f"spam.example is listed on {DOMAIN_LIST}" in text
    assert rcpt_from(mx, "127.0.0.7", sender="bob@sender.test")[0] == 250
    assert rcpt_from(mx, "127.0.0.7", sender="")[0] == 250  # the null sender has no domain to ask about
    assert [v for v, _, _ in decisions(mx, DBL)] == [REJECT]


def test_refused_query_answers_are_not_listings_and_the_status_says_why(mx: BoxHandle, zone: ZoneServer) -> None:
    # Spamhaus's answer to a query through a public resolver, and DBL's error code.
    zone.set(f"9.0.0.127.{IP_LIST}", "A", ["127.255.255.254"])
    zone.set(f"sender.test.{DOMAIN_LIST}", "A", ["127.0.1.255"])
    configure(mx, dnsbl=True, domain_blocklist=True)
    assert rcpt_from(mx, "127.0.0.9", data=True)[0] == 250
    states = {r.zone: (r.state, r.detail) for r in mx.run(admin(mx).dnsbl_status())}
    assert states[IP_LIST][0] == "refused"
    assert "public resolver" in states[IP_LIST][1]
    assert states[DOMAIN_LIST][0] == "refused"
    assert decisions(mx, DNSBL) == []
    # A resolver that rewrites NXDOMAIN into an address of its own is no listing either.
    zone.set(f"10.0.0.127.{IP_LIST}", "A", ["198.51.100.7"])
    assert rcpt_from(mx, "127.0.0.10")[0] == 250


def test_lists_check_asks_the_test_entries_and_says_when_a_list_refuses_this_resolver(
        mx: BoxHandle, zone: ZoneServer) -> None:
    configure(mx, dnsbl=True, domain_blocklist=True)
    zone.set(f"2.0.0.127.{IP_LIST}", "A", ["127.0.0.2"])  # RFC 5782 5: the test entries
    zone.set(f"test.{DOMAIN_LIST}", "A", ["127.0.1.2"])

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run([LETTERBOX, "--data", str(mx.data.root), "spam", "lists", "--check"],
                              capture_output=True, text=True, timeout=60, check=True)

    lines = cli().stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [[IP_LIST, "ip", "ok"], [DOMAIN_LIST, "domain", "ok"]]
    zone.set(f"2.0.0.127.{IP_LIST}", "A", ["127.255.255.254"])  # what Spamhaus says to a public resolver
    first = cli().stdout.splitlines()[0]
    assert first.startswith(f"{IP_LIST}\tip\trefused: the list refuses queries through a public resolver")
    states = {r.zone: r.state for r in mx.run(admin(mx).dnsbl_status())}
    assert states == {IP_LIST: "refused", DOMAIN_LIST: "ok"}


def test_a_dns_timeout_never_refuses_mail(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set(f"11.0.0.127.{IP_LIST}", "A", ["127.0.0.2"])
    zone.silent = True  # the resolver answers nothing: every lookup times out
    configure(mx, dnsbl=True, domain_blocklist=True)
    assert rcpt_from(mx, "127.0.0.11", data=True)[0] == 250
    states = {r.zone: r.state for r in mx.run(admin(mx).dnsbl_status())}
    assert states == {IP_LIST: "failing", DOMAIN_LIST: "failing"}
    zone.silent = False  # the list answers again: the listing counts, the state is ok again
    assert rcpt_from(mx, "127.0.0.11")[0] == 554
    assert {r.zone: r.state for r in mx.run(admin(mx).dnsbl_status())}[IP_LIST] == "ok"


def test_skip_networks_and_logged_in_users_are_never_checked(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set(f"1.0.0.127.{IP_LIST}", "A", ["127.0.0.2"])
    configure(mx, dnsbl=True, skip_networks=("127.0.0.1/32",))
    assert rcpt_from(mx, "127.0.0.1")[0] == 250
    with smtplib.SMTP("127.0.0.1", mx.port("submission"), timeout=30) as client:
        client.starttls(context=mx.client_context)
        client.login(ALICE, PASSWORD)
        assert client.sendmail(ALICE, [ALICE], MESSAGE.replace(b"Bob <bob@sender.test>", ALICE.encode())) == {}


# --- greylisting -------------------------------------------------------------------------------------------

def test_greylisting_defers_a_new_triplet_passes_its_retry_and_remembers_it(mx: BoxHandle) -> None:
    configure(mx, greylist=True, greylist_delay=3600)
    code, text = rcpt_from(mx, "127.0.0.20")
    assert code == 451
    assert "4.7.1 Greylisted" in text
    assert rcpt_from(mx, "127.0.0.20")[0] == 451  # too early
    [entry] = mx.run(admin(mx).greylist_entries())
    assert (entry.network, entry.sender, entry.recipient, entry.passed_at, entry.attempts) == (
        "127.0.0.0/24", "bob@sender.test", ALICE, None, 2)
    configure(mx, greylist=True, greylist_delay=0)  # the delay has passed
    assert rcpt_from(mx, "127.0.0.20", data=True)[0] == 250
    # Remembered: the same triplet from the same /24 passes at once, with any delay.
    configure(mx, greylist=True, greylist_delay=3600)
    assert rcpt_from(mx, "127.0.0.21", data=True)[0] == 250
    [entry] = mx.run(admin(mx).greylist_entries(passed=True))
    assert entry.passed_at is not None
    assert entry.expires - entry.passed_at >= 35 * 86400 - 5
    # Another sender is a new triplet.
    assert rcpt_from(mx, "127.0.0.20", sender="carol@other.test")[0] == 451
    verdicts = [v for v, _, _ in decisions(mx, GREYLIST)]
    assert verdicts == [DEFER, "accept", DEFER, DEFER]


def test_a_domain_that_passed_with_spf_is_not_greylisted_again(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:127.0.0.0/24 -all"'])
    configure(mx, greylist=True, greylist_delay=0)
    assert rcpt_from(mx, "127.0.0.30")[0] == 451
    assert rcpt_from(mx, "127.0.0.30")[0] == 250  # passed, with an SPF pass: sender.test is remembered
    # Another sender of the domain, from a client its SPF allows: no greylisting.
    configure(mx, greylist=True, greylist_delay=3600)
    assert rcpt_from(mx, "127.0.0.31", sender="dave@sender.test")[0] == 250
    # A client outside the domain's SPF is greylisted as usual.
    zone.set("sender.test", "TXT", ['"v=spf1 ip4:192.0.2.0/24 -all"'])
    assert rcpt_from(mx, "127.0.0.32", sender="erin@sender.test")[0] == 451


def new_triplets(box: BoxHandle, source: str, count: int) -> None:
    """`count` new triplets from one client, pipelined as a spammer would: a fresh sender for each
    RCPT (the session may end, past its error budget, before all are answered: each is a new
    connection's work then)."""
    sent = 0
    while sent < count:
        batch = min(count - sent, 40)  # within one session's junk and error budgets
        with Wire(box.port("smtp"), source=source) as wire:
            wire.reply()
            wire.cmd("EHLO spam.test")
            wire.send("".join(f"MAIL FROM:<s{sent + n}@flood.test>\r\nRCPT TO:<{ALICE}>\r\nRSET\r\n"
                              for n in range(batch)))
            replies = [wire.reply()[0] for _ in range(3 * batch)]
        assert replies.count(451) == batch, replies
        sent += batch


def greylist_rows(box: BoxHandle, network: str | None = None) -> int:
    async def count() -> int:
        row = await box.services.db.fetchone(
            "SELECT COUNT(*) AS n FROM greylist WHERE ? IS NULL OR network = ?", (network, network))
        return int(row["n"]) if row else 0

    return box.run(count())


def test_a_flood_of_new_triplets_cannot_grow_the_greylist_without_bound(mx: BoxHandle,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each RCPT with a fresh sender is a new triplet: one client wrote 264 rows a second, each kept for
    2 days (attack41). A network's waiting triplets and the whole table are bounded; a flood evicts
    its own oldest rows, not the triplet a real server is about to retry from another network."""
    monkeypatch.setattr(greylist, "MAX_WAITING_PER_NETWORK", 30)
    monkeypatch.setattr(greylist, "MAX_TRIPLETS", 100)
    monkeypatch.setattr(greylist, "TRIM_EVERY", 10)
    monkeypatch.setattr(mx.services.greylist.trim_triplets, "n", 10)
    configure(mx, greylist=True, greylist_delay=3600)
    assert rcpt_from(mx, "127.0.9.1")[0] == 451  # a real server's first try
    new_triplets(mx, "127.0.0.60", 80)
    assert greylist_rows(mx, "127.0.0.0/24") == 30
    assert greylist_rows(mx, "127.0.9.0/24") == 1
    for network in range(1, 6):
        new_triplets(mx, f"127.0.{network}.60", 30)
    assert greylist_rows(mx) <= 100
    assert greylist_rows(mx, "127.0.5.0/24") == 30  # the newest are kept


def test_the_domains_remembered_for_their_spf_pass_are_bounded(mx: BoxHandle, zone: ZoneServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain that passed greylisting with an SPF pass is remembered for 35 days; one wildcard SPF
    record names as many domains as its owner likes (attack41). The table keeps the newest."""
    monkeypatch.setattr(greylist, "MAX_SPF_DOMAINS", 3)
    monkeypatch.setattr(greylist, "TRIM_EVERY", 1)
    monkeypatch.setattr(mx.services.greylist.trim_spf_domains, "n", 1)
    configure(mx, greylist=True, greylist_delay=0)
    for n in range(5):
        zone.set(f"d{n}.test", "TXT", ['"v=spf1 ip4:127.0.0.0/24 -all"'])
        assert rcpt_from(mx, "127.0.0.35", sender=f"bob@d{n}.test")[0] == 451
        assert rcpt_from(mx, "127.0.0.35", sender=f"bob@d{n}.test")[0] == 250  # passed, SPF pass: remembered

    async def domains() -> list[str]:
        rows = await mx.services.db.fetchall("SELECT domain FROM greylist_spf_domains ORDER BY domain")
        return [str(r["domain"]) for r in rows]

    kept = mx.run(domains())
    assert len(kept) <= 3, kept
    assert "d4.test" in kept


def test_a_flood_of_deferrals_cannot_grow_the_decision_log_without_bound(mx: BoxHandle,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each greylisted RCPT is a spam decision, kept 30 days: 264 a second from one client (attack41).
    The log keeps its newest rows within a bound (batched_log.py, the delivery log's too)."""
    monkeypatch.setattr(mx.services.spam_decisions._rows._cap_every, "n", 10)
    monkeypatch.setattr(mx.services.spam_decisions._rows, "_max_rows", 50)
    configure(mx, greylist=True, greylist_delay=3600)
    new_triplets(mx, "127.0.0.70", 120)
    mx.run(mx.services.spam_decisions.flush())

    async def senders() -> list[str]:
        rows = await mx.services.db.fetchall("SELECT sender FROM spam_decisions ORDER BY id")
        return [str(r["sender"]) for r in rows]

    kept = mx.run(senders())
    assert 50 <= len(kept) < 60, len(kept)
    assert kept[-1] == "s119@flood.test"  # the newest are kept


def swaks(box: BoxHandle, source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("swaks"), "--server", "127.0.0.1", "--port", str(box.port("smtp")),
         "--local-interface", source, "--helo", "mta.sender.test", "--from", "bob@sender.test", "--to", ALICE,
         "--header", "Subject: greylist", "--body", "retry me", "--timeout", "20"],
        capture_output=True, text=True, timeout=60, check=False)


def test_swaks_retrying_after_the_delay_gets_through_and_the_triplet_is_remembered(mx: BoxHandle) -> None:
    configure(mx, greylist=True, greylist_delay=2)
    first = swaks(mx, "127.0.0.40")
    assert first.returncode != 0
    assert "451 4.7.1 Greylisted" in first.stdout
    # The sender's retry: swaks again, until the delay has passed (each try before it is deferred).
    def retry() -> subprocess.CompletedProcess[str] | None:
        result = swaks(mx, "127.0.0.40")
        return result if result.returncode == 0 else None

    second = wait_until(retry, seconds=60, what="swaks accepted after the greylisting delay")
    assert second is not None
    assert "250 2.0.0" in second.stdout
    entries = mx.run(admin(mx).greylist_entries(passed=True))
    assert [(e.network, e.sender, e.recipient) for e in entries] == [("127.0.0.0/24", "bob@sender.test", ALICE)]
    assert entries[0].passed_at is not None
    assert entries[0].passed_at - entries[0].first_seen >= 2
    third = swaks(mx, "127.0.0.41")  # remembered: no delay for the same triplet from its network
    assert third.returncode == 0, third.stdout


def test_the_greylist_cli_lists_and_clears(mx: BoxHandle) -> None:
    configure(mx, greylist=True, greylist_delay=3600)
    assert rcpt_from(mx, "127.0.0.50")[0] == 451
    assert rcpt_from(mx, "127.0.0.50", sender="carol@other.test")[0] == 451

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LETTERBOX, "--data", str(mx.data.root), "spam", "greylist", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "bob@sender.test" in listed.stdout
    assert "carol@other.test" in listed.stdout
    assert "waiting" in listed.stdout
    assert cli("list", "--passed").stdout == ""
    refused = cli("clear")
    assert refused.returncode == 1
    assert "--all" in refused.stderr
    cleared = cli("clear", "--sender", "carol@other.test")
    assert cleared.stdout.strip() == "cleared 1 greylist entry"
    assert [e.sender for e in mx.run(admin(mx).greylist_entries())] == ["bob@sender.test"]
    assert cli("clear", "--all").stdout.strip() == "cleared 1 greylist entry"
    assert mx.run(admin(mx).greylist_entries()) == []
    events = [text for _, kind, text in mx.run(mx.services.events.recent()) if kind == "spam"]
    assert any("greylist entries for sender carol@other.test cleared" in t for t in events)


# --- before the greeting -----------------------------------------------------------------------------------

def connect(box: BoxHandle, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", box.port("smtp")), timeout=30, source_address=(source, 0))


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_an_early_talker_is_refused_and_a_patient_client_greeted_after_the_delay(mx: BoxHandle) -> None:
    configure(mx, early_talker=True, greeting_delay=1.0)
    with connect(mx, "127.0.0.60") as early:
        early.sendall(b"EHLO spammer.test\r\nMAIL FROM:<x@spam.example>\r\n")
        reply = read_reply(early)
        assert reply.startswith(b"554 5.5.1"), reply
        assert early.recv(4096) == b""  # and disconnected
    started = time.monotonic()
    with connect(mx, "127.0.0.61") as patient:
        assert read_reply(patient).startswith(b"220 ")
        assert time.monotonic() - started >= 0.9  # no forward-confirmed reverse DNS: it waited
    assert [(v, ip) for v, ip, _ in decisions(mx, EARLY_TALKER)] == [(REJECT, "127.0.0.60")]


def test_a_client_with_forward_confirmed_reverse_dns_is_not_delayed(mx: BoxHandle, zone: ZoneServer) -> None:
    zone.set("62.0.0.127.in-addr.arpa", "PTR", ["mta.sender.test."])
    zone.set("mta.sender.test", "A", ["127.0.0.62"])
    configure(mx, early_talker=True, greeting_delay=25.0)
    started = time.monotonic()
    with connect(mx, "127.0.0.62") as client:
        assert read_reply(client).startswith(b"220 ")
    assert time.monotonic() - started < 20  # far below the 25 s the others wait


def test_submission_has_no_greeting_checks(mx: BoxHandle) -> None:
    configure(mx, early_talker=True, greeting_delay=5.0)
    with socket.create_connection(("127.0.0.1", mx.port("submission")), timeout=30) as client:
        client.sendall(b"EHLO client.test\r\n")
        assert read_reply(client).startswith(b"220 ")
