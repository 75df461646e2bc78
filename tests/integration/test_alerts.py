"""Alert mails (issue 18): each condition mails the postmaster once, again at most once a day while it
lasts, and once more when it is fixed; delivered locally into the postmaster's mailbox. The clock is
injected; the mail is real (the box's store)."""

from __future__ import annotations

import imaplib

from appliance.alerts import REPEAT_AFTER, Alerts
from appliance.postmaster import mail_postmaster
from appliance.status_checks import Item
from tests.conftest import BoxHandle

POSTMASTER = "alice@example.test"
PASSWORD = "alice's long password 9"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def subjects(box: BoxHandle) -> list[str]:
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
        imap.login(POSTMASTER, PASSWORD)
        _, count = imap.select("INBOX")
        found: list[str] = []
        if int(count[0] or 0):
            _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            found = [part[1].decode().split(":", 1)[1].strip() for part in data if isinstance(part, tuple)]
        imap.logout()
    return found


def alerts(box: BoxHandle, clock: Clock) -> Alerts:
    async def mail(subject: str, text: str) -> bool:
        return await mail_postmaster(box.services, subject, text)

    return Alerts(box.services.db, mail, lambda: "mail.example.test", clock)


def item(key: str, level: str, summary: str = "") -> Item:
    return Item(key, key.title(), level, summary or f"{key} is {level}", "do this", "/console")  # type: ignore[arg-type]


def test_each_condition_once_a_day_and_when_fixed(box: BoxHandle) -> None:
    box.add_user(POSTMASTER, PASSWORD)
    clock = Clock()
    watch = alerts(box, clock)
    problems = [item("certificate", "fail", "5 days left"), item("disk", "fail", "93% used"),
                item("queue", "warn", "1 deferred, the oldest for 30 hours."), item("backups", "fail"),
                item("blocklists", "fail", "Listed: 192.0.2.25 on zen.spamhaus.org")]
    sent = box.run(watch.after_checks(problems))
    assert sent == [f"[mail.example.test] Problem: {p.title}" for p in problems]
    clock.now += 3600
    assert box.run(watch.after_checks(problems)) == []  # still broken an hour later: no second mail
    clock.now += REPEAT_AFTER
    assert len(box.run(watch.after_checks(problems))) == 5  # a day later: reminded once
    fixed = [item("certificate", "ok"), item("disk", "ok"), item("queue", "ok"), item("backups", "ok"),
             item("blocklists", "ok")]
    assert box.run(watch.after_checks(fixed)) == [f"[mail.example.test] Fixed: {p.title}" for p in fixed]
    assert box.run(watch.after_checks(fixed)) == []
    got = subjects(box)
    assert len(got) == 15
    assert got.count("[mail.example.test] Problem: Disk") == 2
    assert got.count("[mail.example.test] Fixed: Disk") == 1


def test_dns_mails_only_when_records_that_were_right_went_wrong(box: BoxHandle) -> None:
    box.add_user(POSTMASTER, PASSWORD)
    watch = alerts(box, Clock())
    assert box.run(watch.after_checks([item("dns", "fail")], {"dns": "warn"})) == []  # never published yet
    assert box.run(watch.after_checks([item("dns", "fail")], {"dns": "ok"})) == ["[mail.example.test] Problem: Dns"]
    assert box.run(watch.after_checks([item("dns", "ok")], {"dns": "fail"})) == ["[mail.example.test] Fixed: Dns"]


def test_setup_time_attention_items_are_not_mailed(box: BoxHandle) -> None:
    box.add_user(POSTMASTER, PASSWORD)
    watch = alerts(box, Clock())
    assert box.run(watch.after_checks([item("certificate", "warn", "Self-signed"), item("backups", "warn"),
                                       item("ptr", "fail"), item("clock", "fail")])) == []
