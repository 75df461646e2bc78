"""A mailbox owner's pages: client settings, own password, the Apple profile."""

from __future__ import annotations

import plistlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LETTERBOX
from tests.support.web import (
    ADMIN,
    ADMIN_PASSWORD,
    ALICE,
    ALICE_PASSWORD,
    HOSTNAME,
    WebClient,
    logged_in,
)
from web.session import SECURE_COOKIE_NAME

NEW_PASSWORD = "alice's brand new passphrase"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebClient]:
    with logged_in(tmp_path / "data", ALICE, ALICE_PASSWORD) as client:
        yield client


def test_account_page_shows_client_settings(web: WebClient) -> None:
    web.services.listener_status = lambda: {"imaps": ("0.0.0.0", 10993, True)}
    page = web.get("/account")
    assert page.status_code == 200
    text = page.text
    assert f"<code>{HOSTNAME}</code>" in text
    assert "<code>10993</code>" in text
    assert "<code>465</code>" in text
    assert "<code>587</code>" in text
    assert "STARTTLS" in text
    assert f"User name: <code>{ALICE}</code>" in text
    assert 'href="/account/mobileconfig"' in text


def test_change_own_password(web: WebClient) -> None:
    response = web.post("/account/password", {"current": "not my password", "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/account")
    assert response.status_code == 400
    assert "not your current password" in response.text
    response = web.post("/account/password", {"current": ALICE_PASSWORD, "password": "short",
                                              "password2": "short"}, token_from="/account")
    assert response.status_code == 400
    assert "too short" in response.text
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
    assert profile["PayloadType"] == "Configuration"
    assert profile["PayloadVersion"] == 1
    account = profile["PayloadContent"][0]
    assert account["PayloadType"] == "com.apple.mail.managed"
    assert (account["EmailAddress"], account["EmailAccountName"]) == (ALICE, "Alice Example")
    assert (account["IncomingMailServerHostName"], account["IncomingMailServerPortNumber"]) == (HOSTNAME, 993)
    assert account["IncomingMailServerUseSSL"] is True
    assert account["OutgoingMailServerUseSSL"] is True
    assert (account["OutgoingMailServerPortNumber"], account["OutgoingMailServerUsername"]) == (465, ALICE)
    assert re.fullmatch(r"[0-9A-F-]{36}", account["PayloadUUID"])
    assert "Password" not in str(profile.keys())
    assert ALICE_PASSWORD not in response.text


def test_profile_needs_a_login(web: WebClient) -> None:
    web.logout()
    assert web.get("/account/mobileconfig").headers["location"].startswith("/login")


# --- sessions end on the server (issue 10 item 12) ------------------------------------------------------
# Each test keeps a copy of a logged-in cookie, as someone who copied it would, and checks that the
# copy stops working when it should.

def _cookie(web: WebClient) -> str:
    return str(web.client.cookies[SECURE_COOKIE_NAME])


def _with_cookie(web: WebClient, value: str, path: str = "/account") -> int:
    """GET path carrying only this cookie (as a second browser holding a copy of it would)."""
    saved = dict(web.client.cookies)
    web.client.cookies.clear()
    try:
        response = web.client.get(path, headers={"Cookie": f"{SECURE_COOKIE_NAME}={value}"}, follow_redirects=False)
    finally:
        web.client.cookies.clear()
        for name, cookie_value in saved.items():
            web.client.cookies.set(name, cookie_value)
    return response.status_code


def _as_admin(web: WebClient) -> None:
    web.client.cookies.clear()
    web.login(ADMIN, ADMIN_PASSWORD)


def test_a_copied_cookie_dies_at_logout(web: WebClient) -> None:
    copy = _cookie(web)
    assert _with_cookie(web, copy) == 200
    web.logout()
    assert _with_cookie(web, copy) == 303  # to the login page
    assert web.get("/account").status_code == 303


def test_own_password_change_ends_the_other_sessions_only(web: WebClient) -> None:
    other = _cookie(web)
    web.client.cookies.clear()
    web.login(ALICE, ALICE_PASSWORD)  # this browser changes the password; `other` is another device
    response = web.post("/account/password", {"current": ALICE_PASSWORD, "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/account")
    assert response.headers["location"] == "/account"
    assert web.get("/account").status_code == 200  # still logged in here
    assert _with_cookie(web, other) == 303


def test_password_set_by_an_admin_ends_the_sessions(web: WebClient) -> None:
    copy = _cookie(web)
    _as_admin(web)
    response = web.post(f"/console/mailboxes/{ALICE}/password", {"password": NEW_PASSWORD, "password2": NEW_PASSWORD},
                        token_from=f"/console/mailboxes/{ALICE}")
    assert response.status_code == 303
    assert _with_cookie(web, copy) == 303


def test_password_set_with_the_cli_ends_the_sessions(web: WebClient) -> None:
    copy = _cookie(web)
    result = subprocess.run([LETTERBOX, "--data", str(web.services.config.data.root), "user", "passwd", ALICE,
                             "--password-stdin"], input=NEW_PASSWORD + "\n", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert _with_cookie(web, copy) == 303


def test_disabling_a_mailbox_ends_its_sessions_for_good(web: WebClient) -> None:
    copy = _cookie(web)
    _as_admin(web)
    form = {"name": "", "quota": "", "enabled": ""}
    assert web.post(f"/console/mailboxes/{ALICE}", form, token_from=f"/console/mailboxes/{ALICE}").status_code == 303
    assert _with_cookie(web, copy) == 303
    web.run(web.services.accounts.update_user, ALICE, enabled=True)
    assert _with_cookie(web, copy) == 303  # enabled again: the old session stays ended


def test_deleting_a_mailbox_ends_its_sessions(web: WebClient) -> None:
    copy = _cookie(web)
    _as_admin(web)
    response = web.post(f"/console/mailboxes/{ALICE}/delete", {}, token_from=f"/console/mailboxes/{ALICE}/delete")
    assert response.status_code == 303
    web.add_user()  # re-created under the same address: still not the old session's
    assert _with_cookie(web, copy) == 303


def test_admin_password_change_ends_the_admins_other_sessions(web: WebClient) -> None:
    _as_admin(web)
    other = _cookie(web)
    web.client.cookies.clear()
    web.login(ADMIN, ADMIN_PASSWORD)
    response = web.post("/console/password", {"current": ADMIN_PASSWORD, "password": NEW_PASSWORD,
                                              "password2": NEW_PASSWORD}, token_from="/console/password")
    assert response.headers["location"] == "/console"
    assert web.get("/console").status_code == 200
    assert _with_cookie(web, other, "/console") == 303


def test_logout_ends_every_session_of_the_account(web: WebClient) -> None:
    phone = _cookie(web)
    web.client.cookies.clear()
    web.login(ALICE, ALICE_PASSWORD)
    laptop = _cookie(web)
    web.logout()
    assert _with_cookie(web, laptop) == 303
    assert _with_cookie(web, phone) == 303
    assert "alice@example.test logged out (every session ended)" in [t for _, _, t in web.run(web.services.events.recent)]


def test_logout_leaves_other_accounts_logged_in(web: WebClient) -> None:
    alice = _cookie(web)
    web.client.cookies.clear()
    _as_admin(web)
    web.logout()
    assert _with_cookie(web, alice) == 200


def test_certificate_warning_only_while_self_signed(web: WebClient) -> None:
    import trustme

    assert web.services.tls.info().self_signed
    assert 'id="cert-warning"' in web.get("/account").text
    leaf = trustme.CA().issue_cert(HOSTNAME)
    web.services.tls.install(b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes(),
                             hostname=HOSTNAME)
    assert 'id="cert-warning"' not in web.get("/account").text


def test_login_page_says_what_to_do_about_a_forgotten_password(web: WebClient) -> None:
    """"Wrong name or password." was the page's last word: nothing said who can set a new one, or how."""
    web.logout()
    page = web.get("/login").text
    assert "<summary>Forgot your password?</summary>" in page
    assert 'id="restored"' not in page  # only after a whole-box restore (tests/e2e/test_console_restore.py)
    assert '<details class="hint" id="forgotten">' in page  # folded until a login fails
    assert "an administrator of this box sets a new one" in page
    assert "<code>letterbox admin passwd NAME</code>" in page
    # The appliance has no command line to type it in (tests/integration/test_boot_reset.py).
    assert "put a plain text file named <code>letterbox-reset.txt</code>" in page
    failed = web.post("/login", {"name": "admin", "password": "not the password"}, token_from="/login").text
    assert '<details class="hint" id="forgotten" open>' in failed
