"""Outbound hourly limits survive a restart of `letterbox serve` (issue 16): the counts are rows in
SQLite, so a stolen password plus a restart (or a crash) does not lift them."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest
import trustme

from tests.conftest import ServedBox, preset_settings

pytestmark = [pytest.mark.e2e]

ALICE = "alice@restart.test"
PASSWORD = "a family password for the restart test"
BODY = b"From: <alice@restart.test>\r\nTo: <alice@restart.test>\r\nSubject: hello\r\n\r\nhi\r\n"


def login(served: ServedBox) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", served.port("submission"), timeout=30)
    client.starttls(context=served.client_context)
    client.login(ALICE, PASSWORD)
    return client


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["restart", "crash"])
def test_hourly_limits_hold_across_a_restart(tmp_path: Path, ca: trustme.CA, stop: signal.Signals) -> None:
    served = ServedBox(tmp_path, ca)
    preset_settings(served.data, {"spam_outbound_messages_per_hour": "2",
                                  "spam_outbound_recipients_per_hour": "3"})
    served.add_user(ALICE, PASSWORD)
    served.start()
    try:
        with login(served) as client:
            assert client.sendmail(ALICE, [ALICE], BODY) == {}
            assert client.sendmail(ALICE, [ALICE, "bob@elsewhere.test"], BODY) == {}  # 2 messages, 3 recipients
        served.stop(stop)
        served.start()
        with login(served) as client:
            code, text = client.mail(ALICE)
            assert (code, b"2 messages in the last hour" in text) == (451, True)
        # With the message limit lifted (the box reads its settings live), the recipients counted
        # before the restart still hold.
        preset_settings(served.data, {"spam_outbound_messages_per_hour": "0"})
        with login(served) as client:
            assert client.mail(ALICE)[0] == 250
            code, text = client.rcpt(ALICE)
            assert (code, b"3 recipients in the last hour" in text) == (451, True)
    finally:
        served.stop()
