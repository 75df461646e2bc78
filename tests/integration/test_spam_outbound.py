"""Outbound abuse limits on submission (issue 16): hourly messages and recipients per user refused with
4xx and an event for the administrator; a burst of recipients refused by other servers suspends the
user's sending, with an event and a mail to the postmaster, until an administrator lifts it."""

from __future__ import annotations

import smtplib
from dataclasses import replace
from typing import Any

import pytest

from appliance.admin import Admin
from appliance.spam.decisions import OUTBOUND_LIMIT, OUTBOUND_SUSPENDED
from tests.conftest import BoxHandle
from tests.support.outbound import (  # noqa: F401  (fixtures)
    ALICE,
    BODY,
    MX1,
    PASSWORD,
    Outbound,
    mx,
    outbound_fixture,
    parse,
    zone_fixture,
)
from tests.support.polling import wait_until
from tests.support.receivers import Script


def limits(box: BoxHandle, **spam: Any) -> None:
    settings = box.services.settings
    box.run(settings.save(spam=replace(settings.now.spam, **spam)))


def spam_events(box: BoxHandle) -> list[str]:
    return [text for _, kind, text in box.run(box.services.events.recent()) if kind == "spam"]


def login(box: BoxHandle) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30)
    client.starttls(context=box.client_context)
    client.login(ALICE, PASSWORD)
    return client


def test_over_the_hourly_message_limit_gets_451_and_the_admin_an_event(outbound: Outbound) -> None:
    box = outbound.box
    limits(box, outbound_messages_per_hour=2, outbound_recipients_per_hour=0)
    with login(box) as client:
        for _ in range(2):
            assert client.sendmail(ALICE, [ALICE], BODY) == {}
        code, text = client.mail(ALICE)
        assert code == 451
        assert b"4.7.1 Sending limit reached: 2 messages" in text
        client.rset()
        assert client.mail(ALICE)[0] == 451  # still over: one event, two decisions
    [event] = spam_events(box)
    assert ALICE in event
    assert "limit of 2 messages an hour" in event
    assert len(box.run(box.services.spam_decisions.recent(layer=OUTBOUND_LIMIT))) == 2
    assert len(outbound.inbox()) == 2  # the two within the limit were delivered


def test_over_the_hourly_recipient_limit_the_next_rcpt_gets_451(outbound: Outbound) -> None:
    box = outbound.box
    limits(box, outbound_messages_per_hour=0, outbound_recipients_per_hour=3)
    with login(box) as client:
        refused = client.sendmail(ALICE, [ALICE, "a@example.net", "b@example.net", "c@example.net"], BODY)
        assert list(refused) == ["c@example.net"]
        assert refused["c@example.net"][0] == 451
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(ALICE, ["d@example.net"], BODY)  # 3 recipients this hour already
    assert any("limit of 3 recipients an hour" in e for e in spam_events(box))


def test_a_burst_of_refused_recipients_suspends_sending_until_lifted(outbound: Outbound) -> None:
    box = outbound.box
    limits(box, outbound_reject_burst=3)
    mx(outbound.zone, "example.net", (10, "mx.example.net", MX1))
    refusal = "550 5.1.1 Recipient address rejected: no such user"
    script = Script(rcpt={f"nobody{i}@example.net": refusal for i in range(3)})
    with outbound.receiver(MX1, script=script):
        with login(box) as client:
            assert client.sendmail(ALICE, [f"nobody{i}@example.net" for i in range(3)], BODY) == {}
        wait_until(lambda: any("suspended" in e for e in spam_events(box)), seconds=30,
                   what="the suspension event")
    [event] = [e for e in spam_events(box) if "suspended" in e]
    assert f"sending from {ALICE} suspended: 3 recipients refused" in event
    # The postmaster (here the oldest mailbox: no administrator has one) got a mail saying what to do.
    notices = wait_until(lambda: [m for m in outbound.inbox() if b"Sending suspended" in m], seconds=30,
                         what="the postmaster's mail")
    assert f"letterbox spam suspended lift {ALICE}" in parse(notices[0]).get_payload(decode=True).decode()  # type: ignore[union-attr]
    with login(box) as client:
        code, text = client.mail(ALICE)
        assert code == 451
        assert b"suspended" in text
    assert box.run(box.services.spam_decisions.recent(layer=OUTBOUND_SUSPENDED))
    admin = Admin.of(box.services)
    assert [s.mailbox for s in box.run(admin.outbound_suspensions())] == [ALICE]
    assert box.run(admin.lift_suspension(ALICE)) == ALICE
    with login(box) as client:
        assert client.mail(ALICE)[0] == 250
    assert any(f"sending from {ALICE} allowed again" in e for e in spam_events(box))
