"""The outbound queue against real receiving SMTP servers on loopback addresses, found through a real
DNS server on loopback serving a test zone (issue 7). Mail is submitted on 587 like a client would."""

from __future__ import annotations

import contextlib
import logging
import os
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import dkim
import pytest

from appliance.admin import Admin
from appliance.queue import service
from appliance.queue.service import start_queue
from appliance.store.inotify import inotify_events, inotify_open, inotify_watch
from tests.conftest import LETTERBOX, BoxHandle
from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    BODY,
    MX1,
    MX2,
    OURS,
    PASSWORD,
    Outbound,
    decoded,
    delivery_status,
    mx,
    outbound_fixture,
    parse,
    subparts,
    zone_fixture,
)
from tests.support.polling import wait_until
from tests.support.receivers import Receiver, Script


def test_one_transaction_per_domain_over_starttls_with_our_hostname(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    mx(outbound.zone, "other.test", (10, "mx.other.test", MX2))
    tls = outbound.server_tls("mx.example.net")
    with outbound.receiver(MX1, tls_context=tls, require_starttls=True) as first, \
            outbound.receiver(MX2) as second:
        outbound.submit(["a@example.net", "b@example.net", "c@other.test"])
        [transaction] = first.wait(1)
        [other] = second.wait(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == ("a@example.net", "b@example.net")  # one transaction carries both
    assert first.connections == 1
    assert transaction.tls  # STARTTLS offered, so used (the receiver refuses MAIL without it)
    assert transaction.helo == "mail.example.test"
    assert transaction.mail_from == ALICE
    assert transaction.data.endswith(b"\r\n\r\nHi there.\r\n")
    assert any(opt.startswith("SIZE=") for opt in transaction.mail_options)
    assert other.rcpt_tos == ("c@other.test",)
    assert not other.tls


def test_first_mx_down_the_next_one_takes_it(outbound: Outbound) -> None:
    # Preference 10 points at an address where nothing listens; 20 at the receiver.
    mx(outbound.zone, "example.net", (20, "backup.example.net", MX1), (10, "primary.example.net", MX2))
    with outbound.receiver(MX1) as backup:
        outbound.submit(["a@example.net"])
        [transaction] = backup.wait(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == ("a@example.net",)


def test_an_attempt_stops_after_two_mx_hosts_that_refuse_to_talk(outbound: Outbound) -> None:
    """Postfix's smtp_mx_session_limit through DNS: 7 MX hosts (preferences 10 to 70) that refuse with a
    554 greeting got a connection each per attempt; now the best two get one, the rest none, attempt
    after attempt (each attempt begins again at the best)."""
    addresses = [f"127.0.0.{n}" for n in range(2, 9)]
    mx(outbound.zone, "example.net", *((10 * n, f"mx{n}.example.net", a) for n, a in enumerate(addresses, 1)))
    with contextlib.ExitStack() as stack:
        receivers = [stack.enter_context(outbound.receiver(a, script=Script(greeting_code=554))) for a in addresses]
        outbound.submit(["a@example.net"])
        outbound.wait_until(lambda: any(r.attempts >= 2 for m in outbound.messages() for r in m.recipients),
                            what="two attempts recorded")
        [queued] = outbound.messages()
        counts = [r.connections for r in receivers]
    assert counts[1] >= 2, counts
    assert counts[0] - counts[1] in (0, 1), counts  # a third attempt may have begun
    assert counts[2:] == [0] * 5, counts
    assert "mx2.example.net" in queued.recipients[0].last_error


def test_implicit_mx_and_ipv6(outbound: Outbound) -> None:
    outbound.zone.set("v6only.test", "AAAA", ["::1"])  # no MX: the domain itself is the host
    with outbound.receiver("::1") as receiver:
        outbound.submit(["a@v6only.test"])
        [transaction] = receiver.wait(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == ("a@v6only.test",)


def test_temporary_failure_then_success_on_retry(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(data=["451 4.3.0 Greylisted, try again later"])
    with outbound.receiver(MX1, script=script) as receiver:
        outbound.submit(["a@example.net"])
        outbound.wait_until(lambda: any(r.attempts == 1 for m in outbound.messages() for r in m.recipients),
                            what="the first attempt to be recorded")
        [queued] = outbound.messages()
        assert queued.recipients[0].state == "queued"
        assert queued.recipients[0].last_error == "451 4.3.0 Greylisted, try again later"
        [transaction] = receiver.wait(1)  # the retry, a second later
        outbound.wait_empty()
    assert receiver.connections == 2
    assert transaction.rcpt_tos == ("a@example.net",)
    assert outbound.inbox() == []  # no report for a delivery that worked in the end


def test_permanent_failure_sends_a_dsn_to_the_senders_inbox(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(rcpt={"nobody@example.net": "550 5.1.1 <nobody@example.net>: Recipient address rejected"})
    with outbound.receiver(MX1, script=script) as receiver:
        outbound.submit(["nobody@example.net", "a@example.net"])
        [transaction] = receiver.wait(1)
        [report] = outbound.wait_inbox(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == ("a@example.net",)  # the good recipient still got it
    msg = parse(report)
    assert msg["Return-Path"] == "<>"
    assert msg["To"] == ALICE
    assert "Undelivered" in msg["Subject"]
    per_message, per_recipient = delivery_status(report)
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    diagnostic = " ".join(per_recipient["Diagnostic-Code"].split())  # unfolded
    assert diagnostic == "smtp; 550 5.1.1 <nobody@example.net>: Recipient address rejected"
    returned = next(p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "Subject: hello" in decoded(returned).decode()


def test_a_long_line_goes_as_it_is_and_a_refusal_is_reported(outbound: Outbound) -> None:
    # The box accepts lines over 998 octets and sends them unfolded (folding would break DKIM). This
    # receiver (aiosmtpd's 1001-octet default) refuses them, as a strict server does: the sender is told.
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    body = f"From: {ALICE}\r\nSubject: long\r\n\r\n".encode() + b"x" * 5000 + b"\r\n"
    with outbound.receiver(MX1) as strict:
        outbound.submit(["a@example.net"], body)
        [report] = outbound.wait_inbox(1)
        outbound.wait_empty()
        assert strict.transactions == []
    _, per_recipient = delivery_status(report)
    assert per_recipient["Final-Recipient"] == "rfc822; a@example.net"
    assert per_recipient["Action"] == "failed"
    assert "Line too long" in " ".join(per_recipient["Diagnostic-Code"].split())


def test_expiry_sends_a_dsn_with_the_last_error(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(data=["451 4.7.1 Try again later"] * 20)
    with outbound.receiver(MX1, script=script) as receiver:
        outbound.submit(["a@example.net"])
        # The max age is shortened once it has been retried: set before, a loaded machine whose first
        # attempt ended 1-2 s after the submission (ages count whole seconds) gave up after that one.
        outbound.wait_until(lambda: receiver.connections >= 2, what="a retry")
        outbound.setting("queue_max_age", "2")
        [report] = outbound.wait_inbox(1, timeout=30)
        outbound.wait_empty()
        assert receiver.transactions == []
    assert receiver.connections >= 2  # retried before giving up
    _, per_recipient = delivery_status(report)
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "4.7.1"
    assert " ".join(per_recipient["Diagnostic-Code"].split()).startswith("smtp; 451 4.7.1 Try again later")


def test_a_refused_connection_is_a_sentence_in_queue_list_and_exact_in_the_report(outbound: Outbound) -> None:
    # Nothing listens at MX2; bare.test exists in DNS with neither an MX nor an address record.
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX2))
    outbound.zone.set("bare.test", "TXT", ['"v=spf1 -all"'])
    outbound.setting("queue_retry_intervals", "600")
    outbound.submit(["a@example.net", "b@bare.test"])
    outbound.wait_until(lambda: all(r.attempts for m in outbound.messages() for r in m.recipients),
                        what="an attempt for each recipient")
    shown = subprocess.run([LETTERBOX, "--data", str(outbound.box.data.root), "queue", "list"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"a@example.net  queued, 1 attempt  connection refused by mx.example.net ({MX2}) port {outbound.port}" \
        in shown.stdout
    assert "b@bare.test  queued, 1 attempt  no MX or A/AAAA record for bare.test" in shown.stdout
    assert "Errno" not in shown.stdout
    outbound.box.run(outbound.box.services.db.execute("UPDATE queue_recipients SET next_attempt = 0"))
    outbound.setting("queue_max_age", "1")  # the next attempt is the last
    reports = outbound.wait_inbox(2, timeout=30)  # one per destination
    outbound.wait_empty()
    human = "\n".join(decoded(subparts(parse(report))[0]).decode() for report in reports)
    # The sender's reports keep the exact diagnostic: host, address, port and the system's words.
    assert (f"<a@example.net> (from mx.example.net): mx.example.net[{MX2}]:{outbound.port}: connection failed: "
            f"[Errno 111] Connection refused") in " ".join(human.split())
    assert "<b@bare.test>: no MX or A/AAAA record for bare.test" in human


def test_a_long_delay_warns_the_sender_once_and_keeps_trying(outbound: Outbound) -> None:
    outbound.setting("queue_delay_notice", "1")
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(data=["451 4.3.0 Try again later"] * 3)
    with outbound.receiver(MX1, script=script) as receiver:
        outbound.submit(["a@example.net"])
        [transaction] = receiver.wait(1, timeout=30)  # delivered after the warning
        outbound.wait_empty()
    [warning] = outbound.inbox()
    assert "Delayed Mail" in parse(warning)["Subject"]
    _, per_recipient = delivery_status(warning)
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Will-Retry-Until"]
    assert transaction.rcpt_tos == ("a@example.net",)


def test_a_domain_that_is_down_defers_every_waiting_message(outbound: Outbound) -> None:
    # The MX answers each connection after a while with 421 (a server that is down, slowly). With several
    # messages waiting, several workers were opening sessions to the domain at once, and each that failed
    # while another was still opening handed its job back: they did so to each other for ever, and no
    # attempt was ever recorded, retried later or expired (seen in a 20-minute soak, DNS timing out).
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    outbound.setting("queue_retry_intervals", "600")
    outbound.setting("queue_hold", "1")
    for _ in range(8):
        outbound.submit(["a@example.net"])
    with socket.create_server((MX1, outbound.port)) as listener:
        stop = threading.Event()

        def answer_slowly() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    client, _ = listener.accept()
                    threading.Timer(0.5, lambda c=client: (c.sendall(b"421 4.3.2 down\r\n"), c.close())).start()

        thread = threading.Thread(target=answer_slowly, daemon=True)
        thread.start()
        try:
            outbound.setting("queue_hold", "0")
            outbound.wait_until(lambda: [r.attempts for m in outbound.messages() for r in m.recipients] == [1] * 8,
                                timeout=15, what="one recorded attempt for each of the 8 messages")
        finally:
            stop.set()
            thread.join()
    assert all(r.state == "queued" and "421" in r.last_error for m in outbound.messages() for r in m.recipients)


def test_null_mx_fails_at_once(outbound: Outbound) -> None:
    outbound.zone.set("nomail.test", "MX", ["0 ."])
    outbound.submit(["a@nomail.test"])
    [report] = outbound.wait_inbox(1)
    outbound.wait_empty()
    _, per_recipient = delivery_status(report)
    assert per_recipient["Status"] == "5.1.10"
    assert "null MX" in decoded(subparts(parse(report))[0]).decode()


def test_an_mx_whose_address_is_ours_loops_back_to_myself(outbound: Outbound, caplog: pytest.LogCaptureFixture) -> None:
    """A domain whose MX host has the box's own address (a typo, a parked domain pointing at
    127.0.0.1): the report says "loops back to myself" (5.4.6) as Postfix does, and the box never
    connects to itself. Before, the queue handed the message to its own MX, whose "Relay access
    denied" (and a count against the box's address in the MX's harvest guard) made the report."""
    outbound.setting("outbound_port", str(outbound.box.port("smtp")))  # the box's MX: 127.0.0.1, this port
    mx(outbound.zone, "loop.test", (10, "mx.loop.test", "127.0.0.1"))
    outbound.zone.set("implicit.test", "A", ["127.0.0.1"])  # no MX: the domain is its own host
    caplog.set_level(logging.INFO, logger="letterbox")
    outbound.submit(["a@loop.test", "b@implicit.test"])
    outbound.wait_empty()

    def statuses() -> dict[str, str]:  # one report, or one per domain when their failures settle apart
        return {str(block["Final-Recipient"]): str(block["Status"])
                for report in outbound.inbox() for block in delivery_status(report)[1:]}

    wait_until(lambda: len(statuses()) == 2, seconds=20, what="both recipients reported")
    assert statuses() == {"rfc822; a@loop.test": "5.4.6", "rfc822; b@implicit.test": "5.4.6"}
    text = "".join(decoded(subparts(parse(report))[0]).decode() for report in outbound.inbox())
    assert "mail for loop.test loops back to myself" in text
    assert "mail for implicit.test loops back to myself" in text
    assert not [r for r in caplog.records if "Relay access denied" in r.getMessage()]


def test_a_better_mx_than_our_own_address_still_gets_the_mail(outbound: Outbound) -> None:
    port = outbound.box.port("smtp")
    outbound.setting("outbound_port", str(port))
    mx(outbound.zone, "backup.test", (10, "mx.backup.test", MX1), (20, "us.backup.test", "127.0.0.1"))
    with Receiver(MX1, port) as primary:
        outbound.submit(["a@backup.test"])
        [transaction] = primary.wait(1)
        outbound.wait_empty()
    assert transaction.rcpt_tos == ("a@backup.test",)


def test_each_failure_is_reported_exactly_once(outbound: Outbound) -> None:
    for domain in ("gone1.test", "gone2.test", "gone3.test"):
        outbound.zone.set(domain, "MX", ["0 ."])
    outbound.submit(["a@gone1.test", "b@gone2.test", "c@gone3.test", "d@gone3.test"])
    outbound.wait_empty()
    # A message leaves the queue only once its failures are settled, and a report is written before
    # its settlement (appliance/queue/reports.py): with the queue empty nothing can report again.

    def reported_now() -> list[str]:
        return [str(block["Final-Recipient"]) for raw in outbound.inbox() for block in delivery_status(raw)[1:]]

    def all_four() -> list[str]:
        now = reported_now()
        return now if len(now) >= 4 else []

    reported = wait_until(all_four, seconds=20, what="4 reported recipients")
    assert sorted(reported) == [f"rfc822; {r}" for r in ("a@gone1.test", "b@gone2.test", "c@gone3.test",
                                                           "d@gone3.test")]


def fill_alice(box: BoxHandle) -> None:
    """Alice's mailbox full: a 20 kB message in it, a quota of 10 kB."""
    box.run(box.services.store.deliver([ALICE], b"Subject: filler\r\n\r\n" + b"x" * 20_000))
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=10_000))


def fail_for_full_alice(outbound: Outbound) -> None:
    """Alice's mailbox is full and she sends to a domain that takes no mail (a null MX): her message
    fails, and the failure report must go into her full mailbox."""
    fill_alice(outbound.box)
    outbound.zone.set("nomail.test", "MX", ["0 ."])
    outbound.submit(["a@nomail.test"])


def test_a_report_to_a_full_local_mailbox_waits_quietly_then_is_dropped(
    outbound: Outbound, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice's mailbox is full and her mail to a remote address fails: the report waits for room,
    tried at each sweep and said once, until it has waited the queue's max age; then it is dropped
    and the message leaves the queue. Before, each sweep (every minute) logged a traceback, for ever,
    and the message stayed in the queue for ever."""
    monkeypatch.setattr(service, "SWEEP_INTERVAL", 0.1)
    box = outbound.box
    outbound.setting("queue_max_age", "3")
    caplog.set_level(logging.INFO, logger="letterbox")
    fail_for_full_alice(outbound)
    outbound.wait_until(lambda: any(r.state == "failed" for m in outbound.messages() for r in m.recipients),
                        timeout=60, what="the recipient to fail")
    outbound.wait_empty(timeout=60)  # the sweeps come with the scheduler's passes, 5 s apart when idle
    assert len(outbound.inbox()) == 1  # the filler alone

    def dropped_events() -> list[str]:  # the message leaves the queue just before its event is recorded
        return [text for _, kind, text in box.run(box.services.events.recent())
                if kind == "bounce" and "failure report to <alice@ourdomain.test> was dropped" in text]

    outbound.wait_until(lambda: bool(dropped_events()), timeout=10, what="the dropped event")
    said = [(r.levelname, r.getMessage().partition("report to <alice@ourdomain.test> ")[2][:12], r.exc_info)
            for r in caplog.records if "report to <alice@ourdomain.test>" in r.getMessage()]
    assert said == [("WARNING", "waits: the s", None), ("INFO", "was dropped ", None)]  # (INFO: the event)
    assert len(dropped_events()) == 1


def test_a_report_to_a_full_local_mailbox_arrives_once_there_is_room(
    outbound: Outbound, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "SWEEP_INTERVAL", 0.1)
    box = outbound.box
    fail_for_full_alice(outbound)
    outbound.wait_until(lambda: any(r.state == "failed" for m in outbound.messages() for r in m.recipients),
                        what="the recipient to fail")
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=0))
    [_, report] = outbound.wait_inbox(2)
    outbound.wait_empty()
    assert delivery_status(report)[1]["Final-Recipient"] == "rfc822; a@nomail.test"


@pytest.mark.parametrize("by", ["console", "cli"])
def test_retry_now_tries_a_report_waiting_for_a_full_mailbox_too(
    outbound: Outbound, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, by: str,
) -> None:
    """Alice's mailbox is full when her mail to a remote address fails: the report waits an hour (the
    queue's retry schedule). She makes room and the administrator presses "Retry now" (or runs
    `letterbox queue flush`): the report is tried now, as Postfix's `postqueue -f` sends every deferred
    message, bounces included. Before, a flush made only queued recipients due: the report waited for
    its hour, and the CLI's flush could not reach the running box's memory of it at all."""
    if by == "cli":
        monkeypatch.setattr(service, "SWEEP_INTERVAL", 1.0)  # the CLI's flush is seen at the next sweep
    box = outbound.box
    outbound.setting("queue_retry_intervals", "3600")
    caplog.set_level(logging.INFO, logger="letterbox")
    fail_for_full_alice(outbound)
    outbound.wait_until(lambda: any("failure report to <alice@ourdomain.test> waits" in r.getMessage()
                                    for r in caplog.records), timeout=60, what="the report to be refused")
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=0))
    time.sleep(2)  # (the CLI's case: sweeps pass the report by, waiting for its hour)
    assert len(outbound.inbox()) == 1
    if by == "console":
        assert box.run(Admin.of(box.services).flush_queue()) == 1
    else:
        result = subprocess.run([LETTERBOX, "--data", str(box.data.root), "queue", "flush"], capture_output=True,
                                text=True, timeout=60, check=True)
        assert result.stdout.startswith("1 recipient due now"), result.stdout
    [_, report] = outbound.wait_inbox(2, timeout=10)
    outbound.wait_empty(timeout=10)
    assert delivery_status(report)[1]["Final-Recipient"] == "rfc822; a@nomail.test"


class Opens:
    """Files opened in directories, as inotify tells (IN_OPEN): what the box reads, seen from outside."""

    IN_OPEN = 0x20

    def __init__(self, *directories: Path) -> None:
        fd = inotify_open()
        assert fd is not None
        self.fd = fd
        self.names = {inotify_watch(fd, directory, self.IN_OPEN): directory for directory in directories}
        self.seen: list[Path] = []

    def files(self) -> list[Path]:
        self.seen += [self.names[wd] / name.decode() for wd, _, name in inotify_events(self.fd) if name]
        return self.seen

    def close(self) -> None:
        os.close(self.fd)


def test_a_report_a_local_mailbox_refuses_is_tried_again_without_reading_its_mail(
    outbound: Outbound, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice's mailbox has room for small mail but not for the report on her failed message (it
    returns the message's big header). Each try of the report reads the failed message's head from
    the spool; it must not read Alice's mail. Before, every try (each sweep: every minute, for the
    queue's 5 days) read every message that had arrived in her INBOX since the report was begun, to
    see whether the report was among them; now the box knows which copies it wrote, and a report is
    tried on the queue's retry schedule."""
    monkeypatch.setattr(service, "SWEEP_INTERVAL", 0.1)
    box = outbound.box
    box.run(box.services.store.deliver([ALICE], b"Subject: filler\r\n\r\nfiller\r\n"))
    used, _ = box.run(box.services.store.usage(ALICE))
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=used + 10_000))
    outbound.zone.set("nomail.test", "MX", ["0 ."])
    caplog.set_level(logging.INFO, logger="letterbox")
    padded = b"X-Pad: " + b" ".join([b"p" * 70] * 400).replace(b" ", b"\r\n ") + b"\r\n" + BODY  # a 29 KB header
    outbound.submit(["a@nomail.test"], padded)
    outbound.wait_until(lambda: any("failure report to <alice@ourdomain.test> waits" in r.getMessage()
                                    for r in caplog.records), timeout=60, what="the report to be refused")
    for n in range(5):  # small mail still fits; it arrives after the report was begun
        [uid] = box.run(box.services.store.deliver([ALICE], f"Subject: small {n}\r\n\r\nhi\r\n".encode())).values()
        assert isinstance(uid, int)
    assert box.services.text_index is not None
    box.run(box.services.text_index.catch_up())  # the full-text index reads new mail once: done first
    inbox = box.data.mail / OURS / "alice"
    opens = Opens(inbox / "new", inbox / "cur", box.data.spool)
    try:
        outbound.wait_until(lambda: len([p for p in opens.files() if p.suffix == ".eml"]) >= 3, timeout=30,
                            what="three tries of the report (each reads the failed message's head)")
        assert [p for p in opens.files() if p.parent != box.data.spool] == []
    finally:
        opens.close()
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=0))
    outbound.wait_empty(timeout=30)
    reports = [m for m in outbound.inbox() if b"Content-Type: multipart/report" in m]
    assert len(reports) == 1
    assert delivery_status(reports[0])[1]["Final-Recipient"] == "rfc822; a@nomail.test"


def test_the_mx_s_bounce_to_a_full_local_sender_waits_for_room(
    outbound: Outbound, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alice's mailbox is full; her mail to bob and to full@ comes in over the MX, and full@'s copy
    fails after the 250. The bounce her mailbox refuses waits in the queue, said in one line, and
    arrives once there is room, once. Before, it was lost, with a traceback."""
    monkeypatch.setattr(service, "SWEEP_INTERVAL", 0.1)
    box = outbound.box
    bob, full = f"bob@{OURS}", f"full@{OURS}"
    box.add_user(bob, PASSWORD)
    box.add_user(full, PASSWORD, quota_bytes=10_000)
    fill_alice(box)
    caplog.set_level(logging.INFO, logger="letterbox")
    big = BODY + b"y" * 20_000 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        client.ehlo("client.test")
        client.mail(ALICE)  # no SIZE=: full@ takes it at RCPT, the copy fails after DATA
        assert client.rcpt(bob)[0] == client.rcpt(full)[0] == 250
        assert client.data(big)[0] == 250
    assert len(outbound.inbox(bob)) == 1
    outbound.wait_until(lambda: any(r.recipient == full and r.state == "failed" for m in outbound.messages()
                                    for r in m.recipients), what="the bounce to wait in the queue")
    assert not [r for r in caplog.records if r.exc_info]
    assert len(outbound.inbox()) == 1  # the filler alone
    box.run(box.services.accounts.update_user(ALICE, quota_bytes=0))
    [_, report] = outbound.wait_inbox(2, timeout=60)  # a sweep comes with a scheduler pass
    outbound.wait_empty(timeout=60)
    [status] = delivery_status(report)[1:]
    assert (str(status["Final-Recipient"]), str(status["Status"])) == (f"rfc822; {full}", "5.2.2")
    assert len(outbound.inbox()) == 2
    assert not [r for r in caplog.records if r.exc_info]


def test_no_report_is_ever_sent_to_the_null_sender(outbound: Outbound) -> None:
    outbound.zone.set("nomail.test", "MX", ["0 ."])
    spool = outbound.queue.spool
    outbound.box.run(spool.enqueue("", ["a@nomail.test"], b"Subject: a bounce\r\n\r\nx\r\n"))
    outbound.wait_empty()
    assert outbound.messages() == []
    assert outbound.inbox() == []


def test_dkim_signature_verifies_against_the_published_key(outbound: Outbound) -> None:
    key = outbound.publish_dkim_key()
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    with outbound.receiver(MX1) as receiver:
        outbound.submit(["a@example.net"])
        [transaction] = receiver.wait(1)
    assert transaction.data.startswith(b"DKIM-Signature: ")

    assert dkim.verify(transaction.data, dnsfunc=outbound.dkim_dns)
    sig = dkim.DKIM(transaction.data)
    assert sig.verify(dnsfunc=outbound.dkim_dns)
    assert sig.domain == OURS.encode()
    assert sig.selector == key.selector.encode()


def test_a_queued_from_the_address_parser_cannot_read_goes_out_unsigned(outbound: Outbound) -> None:
    """Choosing the DKIM key read the From: with the unguarded parser: groups nested past Python's
    recursion raised out of the worker, and the message never went (audit30)."""
    box = outbound.box
    outbound.publish_dkim_key()
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    nested = "\r\n ".join(["g:" * 200] * 100) + f"\r\n {ALICE}\r\n " + "\r\n ".join([";" * 400] * 50)
    data = f"From: {nested}\r\nSubject: nested\r\n\r\nHi.\r\n".encode()  # folded: lines under 998
    with outbound.receiver(MX1) as receiver:
        box.run(outbound.queue.spool.enqueue(ALICE, ["a@example.net"], data, auth_user=ALICE))
        outbound.wake()
        [transaction] = receiver.wait(1)
        outbound.wait_empty()
    assert transaction.data == data


def test_queued_mail_survives_a_restart_of_the_queue(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    outbound.setting("queue_hold", "1")
    outbound.submit(["a@example.net"])
    [queued] = outbound.messages()
    box = outbound.box
    box.run(outbound.queue.stop())
    with outbound.receiver(MX1) as receiver:
        outbound.setting("queue_hold", "0")
        box.run(start_queue(box.services))
        [transaction] = receiver.wait(1)
        outbound.wait_empty()
        box.run(outbound.queue.stop())
    assert transaction.rcpt_tos == ("a@example.net",)
    assert not (box.data.spool / f"{queued.id}.eml").exists()



@pytest.mark.parametrize(("kind", "address"), [("AAAA", "::ffff:127.0.0.1"), ("A", "0.0.0.0")])
def test_an_mx_at_our_address_written_otherwise_loops_back_to_myself(
        outbound: Outbound, caplog: pytest.LogCaptureFixture, kind: str, address: str) -> None:
    """Addresses that reach the box's own MX on 127.0.0.1 as surely as 127.0.0.1 does: ::ffff:127.0.0.1
    (IPv4-mapped, RFC 4291 2.5.5.2: the queue's IPv6 socket connects to the IPv4 address) and 0.0.0.0
    (Linux takes a connection to it for the loopback; only a wildcard listener counted it as ours). A
    sender's domain publishing either made the queue hand the message to its own MX ('Relay access
    denied', counted against the box's own address in the harvest guard)."""
    outbound.setting("outbound_port", str(outbound.box.port("smtp")))
    outbound.zone.set("mapped.test", "MX", ["10 mx.mapped.test."])
    outbound.zone.set("mx.mapped.test", kind, [address])
    caplog.set_level(logging.INFO, logger="letterbox")
    outbound.submit(["a@mapped.test"])
    [report] = outbound.wait_inbox(1)
    outbound.wait_empty()
    statuses = {str(block["Final-Recipient"]): str(block["Status"]) for block in delivery_status(report)[1:]}
    assert statuses == {"rfc822; a@mapped.test": "5.4.6"}
    assert "mail for mapped.test loops back to myself" in decoded(subparts(parse(report))[0]).decode()
    assert not [r for r in caplog.records if "Relay access denied" in r.getMessage()]


def test_a_spooled_submission_goes_out_whole_and_signed(outbound: Outbound) -> None:
    # Past message_spool.SPOOL_AFTER_OCTETS a message is spooled to <data>/tmp while it comes and read
    # back after its dot: the copy in the queue and the local one end with the octets sent (submission
    # adds its header fields), and the DKIM signature made of them verifies.
    outbound.publish_dkim_key()
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    body = b"".join((b"." if n % 5 == 0 else b"") + b"line %07d " % n + b"z" * 60 + b"\r\n" for n in range(30_000))
    data = BODY + body
    with outbound.receiver(MX1) as receiver:
        outbound.submit(["a@example.net", ALICE], data)
        [transaction] = receiver.wait(1)
    assert len(data) > 2_000_000
    assert transaction.data.startswith(b"DKIM-Signature: ")
    assert transaction.data.endswith(b"\r\n\r\nHi there.\r\n" + body)
    assert dkim.verify(transaction.data, dnsfunc=outbound.dkim_dns)
    [copy] = outbound.wait_inbox(1)
    assert copy.endswith(b"\r\n\r\nHi there.\r\n" + body)
    assert outbound.box.services.message_memory.others() == 0
