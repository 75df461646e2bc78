"""Alert mails from the real conditions (issue 18): each problem is made for real on a running box (a
short-lived certificate installed, a message deferred by a refusing loopback MX, a backup that fails
for real, DNS records served by a loopback zone that change, the box's address put on a loopback
DNSBL zone, the disk threshold lowered), found by the status checks of the background schedule's own
run (StatusSchedule.run_once: the domains' DNS looked up again, every check, then the alerts), and
read by the postmaster over IMAP: one mail, none an hour later, one reminder a day later, one "Fixed"
mail when it is gone. Time is moved by the checks' injected clock (Probes.clock), never waited for."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import imaplib
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from appliance import backup, status_checks
from appliance.admin import Admin
from appliance.alerts import REPEAT_AFTER
from appliance.status_checks import Probes, StatusSchedule
from tests.conftest import BoxHandle, install_test_certificate
from tests.e2e.test_web_wizard import zone_value
from tests.integration.test_status_checks import closed_port, publish_all_records
from tests.support.dns_server import ZoneServer
from tests.support.outbound import mx
from tests.support.polling import wait_until
from tests.support.receivers import Receiver, Script, free_port

pytestmark = [pytest.mark.slow(seconds=40)]  # seven boxes, each with a few IMAP reads

POSTMASTER, PASSWORD = "alice@example.test", "alice's long password 9"
DOMAIN, IPV4 = "example.test", "192.0.2.25"
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


class Watched:
    """A box with the postmaster's mailbox, its checks' clock in the test's hands, and what the
    postmaster has read so far."""

    def __init__(self, box: BoxHandle, zone: ZoneServer) -> None:
        self.box, self.zone = box, zone
        self.clock = Clock()
        self.seen = 0
        self.schedule = StatusSchedule(box.services)
        box.services.status_probes = Probes(port25_target=lambda: f"127.0.0.1:{closed_port()}",
                                            clock_synchronised=lambda: True, clock=self.clock)

    @property
    def host(self) -> str:
        return self.box.services.hostname

    def check(self) -> dict[str, status_checks.Item]:
        """One run of the background schedule."""
        return {item.key: item for item in self.box.run(self.schedule.run_once())}

    def new_mail(self) -> list[tuple[str, str]]:
        """(subject, text) of the alert mails that arrived since the last call, read over IMAP."""
        box = self.box
        with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
            imap.login(POSTMASTER, PASSWORD)
            _, count = imap.select("INBOX", readonly=True)
            total = int(count[0] or 0)
            found = []
            if total > self.seen:
                _, data = imap.fetch(f"{self.seen + 1}:*", "(BODY.PEEK[])")
                for part in data:
                    if isinstance(part, tuple):
                        msg = email.message_from_bytes(part[1], policy=email.policy.default)
                        if not str(msg["Subject"]).startswith(f"[{self.host}] "):
                            continue  # not an alert (a queue's report, say)
                        body = msg.get_body(("plain",))
                        found.append((str(msg["Subject"]), body.get_content() if body is not None else ""))
            imap.logout()
        self.seen = total
        return found

    def cycle(self, title: str, break_it: Callable[[], None], fix_it: Callable[[], None], says: str) -> None:
        """The whole life of one problem, as the postmaster's inbox shows it."""
        self.check()
        assert self.new_mail() == [], "the box was not healthy before the test broke it"
        break_it()
        self.check()
        [(subject, text)] = self.new_mail()
        assert subject == f"[{self.host}] Problem: {title}"
        assert says in text
        assert "What to do:" in text
        self.clock.now += HOUR
        self.check()
        assert self.new_mail() == []  # still broken an hour later: no second mail
        self.clock.now += REPEAT_AFTER
        self.check()
        assert [s for s, _ in self.new_mail()] == [f"[{self.host}] Problem: {title}"]  # a day later: reminded
        fix_it()
        self.check()
        assert [s for s, _ in self.new_mail()] == [f"[{self.host}] Fixed: {title}"]
        self.clock.now += REPEAT_AFTER
        self.check()
        assert self.new_mail() == []  # fixed stays quiet


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    with ZoneServer(ttl=0) as server:
        yield server


@pytest.fixture
def watched(box: BoxHandle, zone: ZoneServer) -> Watched:
    box.add_user(POSTMASTER, PASSWORD)
    box.run(box.services.settings.save(dns_resolver=zone.address, public_ipv4=IPV4))
    return Watched(box, zone)


def test_certificate_close_to_its_end(watched: Watched, ca: trustme.CA) -> None:
    box = watched.box

    def short_lived() -> None:
        cert = ca.issue_cert(box.services.hostname, "127.0.0.1", not_after=dt.datetime.fromtimestamp(
            watched.clock.now, dt.UTC) + dt.timedelta(days=10))
        tls = box.data.tls
        (tls / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        (tls / "key.pem").write_bytes(cert.private_key_pem.bytes())
        box.services.tls.reload()

    def renewed() -> None:
        install_test_certificate(ca, box.data)
        box.services.tls.reload()

    watched.cycle("Certificate", short_lived, renewed, "days left, and renewal has not replaced it")


def test_disk_nearly_full(watched: Watched, monkeypatch: pytest.MonkeyPatch) -> None:
    watched.cycle("Disk", lambda: monkeypatch.setattr(status_checks, "DISK_FAIL_PERCENT", 0),
                  lambda: monkeypatch.undo(), "% used")


def test_a_message_deferred_for_over_a_day(watched: Watched) -> None:
    box, zone = watched.box, watched.zone
    far = "bob@far.test"
    port = free_port(("127.0.0.2",))
    mx(zone, "far.test", (10, "mx.far.test", "127.0.0.2"))
    with Receiver("127.0.0.2", port, script=Script(rcpt={far: "451 4.7.1 Try again later"})):
        for key, value in (("outbound_port", str(port)), ("queue_retry_intervals", "3600"), ("queue_hold", "0")):
            box.run(box.services.db.set_setting(key, value))
        queue = box.services.queue
        assert queue is not None
        box.loop.call_soon_threadsafe(queue.wake)  # it reads its settings again
        queued: list[str] = []

        def deferred() -> None:
            queued.append(submit(box, far))
            wait_until(lambda: any(r.attempts > 0 for m in box.run(box.services.spool.messages()) for r in m.recipients),
                       seconds=30, what="a refused attempt")
            watched.clock.now = time.time() + 25 * HOUR  # the box's own retries keep to the real clock

        def given_up() -> None:
            assert box.run(Admin.of(box.services).delete_queued(queued)) == queued

        watched.cycle("Outbound queue", deferred, given_up, "1 deferred, the oldest for 25 hours.")


def submit(box: BoxHandle, rcpt: str) -> str:
    """One message from the postmaster's mailbox to `rcpt` through submission; its queue id."""
    with smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30) as client:
        client.starttls(context=box.client_context)
        client.login(POSTMASTER, PASSWORD)
        client.sendmail(POSTMASTER, [rcpt], f"From: {POSTMASTER}\r\nTo: {rcpt}\r\nSubject: hello\r\n\r\nHi.\r\n")
    [message] = box.run(box.services.spool.messages())
    return message.id


def test_backup_failed_then_too_old(watched: Watched, tmp_path: Path) -> None:
    box = watched.box
    svc = box.services
    box.run(backup.make_key(svc.db, svc.events, svc.hostname))
    scheduler = backup.Scheduler(svc.db, svc.events, svc.config.data, svc.backups)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the backup folder should be")

    def run_backup(target: Path) -> dict[str, object]:
        async def run() -> dict[str, object]:
            await backup.set_schedule(svc.db, svc.events, enabled=True, hour=3, target=str(target))
            await scheduler.run_once(await backup.read_schedule(svc.db))
            return (await backup.read_schedule(svc.db)).last
        return box.run(run())

    def fails() -> None:
        assert run_backup(blocked)["ok"] is False

    def works() -> None:
        assert run_backup(tmp_path / "backups")["ok"] is True

    # A first good backup, so that the box starts healthy; then the daily run fails for real.
    box.run(backup.set_schedule(svc.db, svc.events, enabled=True, hour=3, target=str(tmp_path / "backups")))
    works()
    watched.cycle("Backups", fails, works, "The last backup failed")
    # The good backup is made at the real time; four days later by the checks' clock it is too old.
    watched.clock.now = dt.datetime.now(dt.UTC).timestamp() + 4 * 86400
    watched.check()
    assert [s for s, _ in watched.new_mail()] == [f"[{watched.host}] Problem: Backups"]


def test_a_dns_record_that_was_right_goes_wrong(watched: Watched) -> None:
    box, zone = watched.box, watched.zone
    publish_all_records(box, zone, DOMAIN)
    records = box.run(Admin.of(box.services).dns_records(DOMAIN, box.services.config.published_ports()))
    [mx_record] = [r for r in records if r.key == "mx"]
    assert mx_record.value is not None
    right = zone_value("MX", mx_record.value)
    assert watched.check()["dns"].level == "ok"

    watched.cycle("DNS records", lambda: zone.set(DOMAIN, "MX", ["10 mail.elsewhere.example."]),
                  lambda: zone.set(DOMAIN, "MX", [right]), f"MX {DOMAIN}")


def test_the_box_address_on_a_blocklist(watched: Watched) -> None:
    name = "25.2.0.192.zen.spamhaus.org"
    watched.cycle("Blocklists", lambda: watched.zone.set(name, "A", ["127.0.0.2"]),
                  lambda: watched.zone.remove(name, "A"), f"Listed: {IPV4} on zen.spamhaus.org")


def test_the_background_schedule_mails_without_anyone_asking(watched: Watched, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schedule's own loop (its first run at once here) finds the problem and mails it."""
    box = watched.box
    monkeypatch.setattr(status_checks, "DISK_FAIL_PERCENT", 0)
    box.run(box.services.settings.save(status_checks=True))
    schedule = StatusSchedule(box.services, first_delay=0, every=3600)
    mails: list[tuple[str, str]] = []

    async def start() -> None:
        schedule.start()

    box.run(start())
    try:
        def arrived() -> bool:
            mails.extend(watched.new_mail())
            return bool(mails)

        wait_until(arrived, seconds=60, what="the disk alert")
    finally:
        box.run(schedule.stop())
    assert [s for s, _ in mails] == [f"[{watched.host}] Problem: Disk"]
