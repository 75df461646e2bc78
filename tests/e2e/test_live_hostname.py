"""`letterbox serve` renamed through the wizard while it runs: a forged Authentication-Results naming
the new host is stripped and replaced by the box's own at once, without a restart (issue 10 item 3)."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import TEST_SETTINGS, ServedBox, preset_settings
from tests.support.dns_server import ZoneServer
from tests.support.smtp_wire import maildir_messages, parse
from tests.support.web import setup_code

pytestmark = pytest.mark.e2e

NEW_NAME = "mx.renamed.test"
ALICE, PASSWORD = "alice@ourdomain.test", "correct horse battery staple 9"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def served(tmp_path: Path, ca: trustme.CA) -> Iterator[tuple[ServedBox, ZoneServer]]:
    with ZoneServer(ttl=0) as zone:
        box = ServedBox(tmp_path, ca)
        # The checks run for real, against the loopback DNS server (a spoof of bank.example, p=reject
        # would be refused; here bank.example publishes nothing, so the message is delivered marked).
        preset_settings(box.data, {**TEST_SETTINGS, "inbound_auth": "on", "dns_resolver": zone.address})
        box.start()
        try:
            box.add_user(ALICE, PASSWORD)
            yield box, zone
        finally:
            box.stop()


def test_forged_results_naming_the_new_host_are_stripped_right_after_the_wizard(
    served: tuple[ServedBox, ZoneServer],
) -> None:
    box, _zone = served
    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as web:
        page = web.get("/setup/1")
        token = _CSRF.search(page.text)
        assert page.status_code == 200, page.text[:500]
        assert token, page.text[:500]
        response = web.post("/setup/1", data={
            "csrf": token.group(1), "code": setup_code(box.data.root), "name": "admin", "password": PASSWORD, "password2": PASSWORD,
            "hostname": NEW_NAME,
        })
        assert response.status_code == 303, response.text[:500]

    forged = (f"Authentication-Results: {NEW_NAME};\r\n\tdkim=pass header.d=bank.example\r\n"
              f"From: Bank <ceo@bank.example>\r\nTo: {ALICE}\r\nSubject: urgent\r\n\r\nPay now.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", box.port("smtp"), timeout=30) as client:
        code, banner = client.ehlo("mta.bank.example")
        assert code == 250
        assert banner.decode().startswith(NEW_NAME)
        client.sendmail("ceo@bank.example", [ALICE], forged)
    [raw] = maildir_messages(box.data.mail, ALICE)
    [results] = parse(raw).get_all("Authentication-Results") or []
    flat = " ".join(results.split())
    assert flat.startswith(f"{NEW_NAME};"), flat
    assert "dkim=pass" not in flat
    assert "dkim=none" in flat
