"""A mailbox owner's pages: client settings, own password, the Apple profile."""

from __future__ import annotations

import plistlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.web import ALICE, ALICE_PASSWORD, HOSTNAME, WebClient, web_client

NEW_PASSWORD = "alice's brand new passphrase"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with web_client(tmp_path / "data") as client:
        client.set_up()
        client.add_user()
        client.login(ALICE, ALICE_PASSWORD)
        yield client


def test_account_page_shows_client_settings(web: WebClient) -> None:
    web.services.extra["listeners"] = {"imaps": ("0.0.0.0", 10993, True)}
    page = web.get("/account")
    assert page.status_code == 200
    text = page.text
    assert f"<code>{HOSTNAME}</code>" in text and "<code>10993</code>" in text  # the port actually bound
    assert "<code>465</code>" in text and "<code>587</code>" in text and "STARTTLS" in text
    assert f"User name: <code>{ALICE}</code>" in text
    assert 'href="/account/mobileconfig"' in text


def test_change_own_password(web: WebClient) -> None:
    response = web.post("/account/password", {"current": "not my password", "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/account")
    assert response.status_code == 400 and "not your current password" in response.text
    response = web.post("/account/password", {"current": ALICE_PASSWORD, "password": "short",
                                              "password2": "short"}, token_from="/account")
    assert response.status_code == 400 and "too short" in response.text
    response = web.post("/account/password", {"current": ALICE_PASSWORD, "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/account")
    assert response.headers["location"] == "/account"
    assert "Your password was changed" in web.get("/account").text
    assert web.run(web.services.auth.verify, ALICE, NEW_PASSWORD, "imap", "127.0.0.1") is not None
    assert web.run(web.services.auth.verify, ALICE, ALICE_PASSWORD, "imap", "127.0.0.1") is None


def test_apple_profile(web: WebClient) -> None:
    web.run(web.services.accounts.update_user, ALICE, display_name="Alice Example")
    response = web.get("/account/mobileconfig")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-apple-aspen-config"
    assert 'filename="alice_at_example.test.mobileconfig"' in response.headers["content-disposition"]
    profile = plistlib.loads(response.content)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    account = profile["PayloadContent"][0]
    assert account["PayloadType"] == "com.apple.mail.managed"
    assert (account["EmailAddress"], account["EmailAccountName"]) == (ALICE, "Alice Example")
    assert (account["IncomingMailServerHostName"], account["IncomingMailServerPortNumber"]) == (HOSTNAME, 993)
    assert account["IncomingMailServerUseSSL"] is True and account["OutgoingMailServerUseSSL"] is True
    assert (account["OutgoingMailServerPortNumber"], account["OutgoingMailServerUsername"]) == (465, ALICE)
    assert re.fullmatch(r"[0-9A-F-]{36}", account["PayloadUUID"])
    assert "Password" not in str(profile.keys()) and ALICE_PASSWORD not in response.text


def test_profile_needs_a_login(web: WebClient) -> None:
    web.logout()
    assert web.get("/account/mobileconfig").headers["location"].startswith("/login")
