"""The delivery log (issue 18): rows for each outcome, made by real SMTP sessions and queue runs;
searched by address, text, result and date; a mailbox owner sees only their own rows."""

from __future__ import annotations

import re
import smtplib

import pytest

from appliance.delivery_log import Delivery, Search
from tests.conftest import BoxHandle
from tests.integration.test_live_settings import admin_console
from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    MX1,
    Outbound,
    mx,
    outbound_fixture,
    zone_fixture,
)
from tests.support.receivers import Script

OURS = ALICE.rpartition("@")[2]
BOB = f"bob@{OURS}"
CAROL = f"carol@{OURS}"
PASSWORD = "a long enough password"


def rows(box: BoxHandle, **search: str | None) -> list[Delivery]:
    return box.run(box.services.delivery_log.search(Search(**search)))  # type: ignore[arg-type]


def inbound(box: BoxHandle, rcpts: list[str], message_id: str = "<in-1@example.net>") -> dict[str, tuple[int, bytes]]:
    data = f"From: x@example.net\r\nTo: {BOB}\r\nMessage-ID: {message_id}\r\nSubject: hi\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        try:
            return client.sendmail("x@example.net", rcpts, data)
        except smtplib.SMTPRecipientsRefused as refused:
            return refused.recipients


def test_each_outcome_in_and_out(outbound: Outbound) -> None:
    box = outbound.box
    box.add_user(BOB, PASSWORD)
    refused = inbound(box, [BOB, f"nobody@{OURS}"])
    assert list(refused) == [f"nobody@{OURS}"]
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(rcpt={"nobody@example.net": "550 5.1.1 <nobody@example.net>: Recipient address rejected"})
    with outbound.receiver(MX1, script=script) as receiver:
        outbound.submit(["nobody@example.net", "a@example.net", BOB])
        receiver.wait(1)
        outbound.wait_inbox(1)  # the bounce
        outbound.wait_empty()

    delivered_in = rows(box, address=BOB, result="delivered")
    assert [(r.direction, r.sender, r.recipient, r.detail, r.owner) for r in delivered_in] == [
        ("out", ALICE, BOB, "INBOX", ALICE),
        ("in", "x@example.net", BOB, "INBOX", BOB),
    ]
    assert (delivered_in[0].message_id or "").endswith("@mail.example.test>")  # added at submission
    assert delivered_in[1].message_id == "<in-1@example.net>"
    assert delivered_in[1].client == "127.0.0.1"
    assert (delivered_in[1].size or 0) > 50
    (unknown,) = rows(box, address="nobody@", result="rejected")
    assert (unknown.direction, unknown.check, unknown.owner) == ("in", "recipient", "")
    assert unknown.detail.startswith("550 5.1.1")
    remote = rows(box, address="@example.net", text="")
    outcomes = {(r.recipient, r.result) for r in remote if r.direction == "out"}
    assert ("a@example.net", "delivered") in outcomes
    assert ("nobody@example.net", "bounced") in outcomes
    assert ("a@example.net", "queued") in outcomes
    sent = next(r for r in remote if r.recipient == "a@example.net" and r.result == "delivered")
    assert sent.client.startswith("mx.example.net")
    assert sent.owner == ALICE
    assert sent.detail.startswith("250")
    # The queue id finds every row of the message.
    assert {r.result for r in rows(box, text=sent.queue_id or "?")} >= {"queued", "delivered", "bounced"}


def test_deferred_is_logged(outbound: Outbound) -> None:
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    script = Script(rcpt={"later@example.net": "451 4.3.0 try again later"})

    def deferred() -> list[Delivery]:
        return [r for r in rows(outbound.box, result="deferred") if r.recipient == "later@example.net"]

    with outbound.receiver(MX1, script=script):
        outbound.submit(["later@example.net"])
        outbound.wait_until(lambda: any(r.detail == "451 4.3.0 try again later" for r in deferred()),
                            what="the remote server's 451 in the log")
    row = next(r for r in deferred() if r.detail == "451 4.3.0 try again later")
    assert (row.direction, row.owner) == ("out", ALICE)
    assert row.client.startswith("mx.example.net")


def test_owners_see_only_their_own_rows_and_admins_see_all(box: BoxHandle) -> None:
    box.add_user(BOB, PASSWORD)
    box.add_user(CAROL, PASSWORD)
    inbound(box, [BOB], "<for-bob@example.net>")
    inbound(box, [CAROL], "<for-carol@example.net>")
    with admin_console(box) as web:
        page = web.get("/console/log")
        assert "for-bob@example.net" in page.text
        assert "for-carol@example.net" in page.text
        assert "for-carol" not in web.get("/console/log", params={"address": "bob@"}).text
        assert "Nothing found." in web.get("/console/log", params={"since": "2999-01-01"}).text
        assert "for-bob" in web.get("/console/log", params={"since": "2000-01-01", "until": "2999-01-01"}).text
        # The calendar's ends, which a date field offers, are no bound (until 9999-12-31 answered 500).
        assert "for-bob" in web.get("/console/log", params={"since": "0001-01-01", "until": "9999-12-31"}).text
    import httpx

    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text)
        assert token
        web.post("/login", data={"csrf": token.group(1), "name": BOB, "password": PASSWORD})
        own = web.get("/account/log")
        assert own.status_code == 200
        assert "for-bob@example.net" in own.text
        assert "for-carol" not in own.text
        assert "for-bob" in web.get("/account/log", params={"until": "9999-12-31"}).text
        # Searching cannot widen it: the owner filter is always there.
        assert "for-carol" not in web.get("/account/log", params={"address": CAROL}).text
        assert web.get("/console/log").status_code == 403


def test_off_records_nothing(box: BoxHandle) -> None:
    box.add_user(BOB, PASSWORD)
    box.run(box.services.settings.save(delivery_log=False))
    inbound(box, [BOB])
    assert rows(box) == []


@pytest.mark.parametrize("days", [1, 30])
def test_per_day_counts(box: BoxHandle, days: int) -> None:
    box.add_user(BOB, PASSWORD)
    inbound(box, [BOB, f"nobody@{OURS}"])
    table = box.run(box.services.delivery_log.per_day(days))
    assert len(table) == days
    assert table[-1][1] == {"in": 1, "junk": 0, "out": 0, "rejected": 1}
