"""A locked-out owner is told to wait, not that the password is wrong, in every protocol and on the
web; the lockout shows on the Events page with an Unlock button that works (issue 18)."""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import subprocess

import httpx
import pytest

from appliance.auth import Throttle, ThrottlePolicy
from tests.conftest import LETTERBOX, BoxHandle
from tests.integration.test_live_settings import ADMIN, admin_console

ALICE, PASSWORD = "alice@example.test", "alice's long password 9"
WRONG = "not alice's password at all"
LOCKOUT = ThrottlePolicy(free_failures=100, peer_free_failures=100, base_delay=0, pair_lockout_failures=3,
                         peer_lockout_failures=100, lockout_seconds=900, account_budget=1000, trusted_budget=1000)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def imap_login(box: BoxHandle, password: str) -> str:
    """'OK', or the server's refusal text."""
    with imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=30) as imap:
        try:
            imap.login(ALICE, password)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        imap.logout()
        return "OK"


@pytest.fixture
def locked(box: BoxHandle) -> BoxHandle:
    box.add_user(ALICE, PASSWORD)
    box.services.auth.throttle = Throttle(LOCKOUT)
    for _ in range(3):
        assert "[AUTHENTICATIONFAILED]" in imap_login(box, WRONG)
    return box


def test_every_protocol_says_try_later_to_the_right_password(locked: BoxHandle) -> None:
    refusal = imap_login(locked, PASSWORD)
    assert "[UNAVAILABLE]" in refusal
    assert "try again in 15 minutes" in refusal
    assert "[UNAVAILABLE]" in imap_login(locked, WRONG)  # the password is not looked at: no oracle

    pop = poplib.POP3_SSL("127.0.0.1", locked.port("pop3s"), context=locked.client_context, timeout=30)
    pop.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Too many failed logins"):
        pop.pass_(PASSWORD)
    pop.close()

    with smtplib.SMTP_SSL("127.0.0.1", locked.port("submissions"), context=locked.client_context, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(ALICE, PASSWORD)
        assert refused.value.smtp_code == 454
        assert b"try again in 15 minutes" in refused.value.smtp_error

    with admin_console(locked):
        pass  # the wizard's first step: the login page is there only after it
    with httpx.Client(base_url=f"https://localhost:{locked.port('https')}", verify=locked.client_context) as web:
        form = web.get("/login")
        token = _CSRF.search(form.text)
        assert token
        page = web.post("/login", data={"csrf": token.group(1), "name": ALICE, "password": PASSWORD})
        assert page.status_code == 429
        assert "Too many failed logins from your address: try again in 15 minutes" in page.text
        assert "Wrong name or password" not in page.text


def test_events_show_the_lockout_and_unlock_lets_the_owner_in(locked: BoxHandle) -> None:
    with admin_console(locked) as web:
        page = web.get("/console/events")
        assert f"locked out {ALICE} from 127.0.0.1 for 15 minutes after repeated failed logins (imap)" in page.text
        assert f"failed login for {ALICE} from 127.0.0.1 (imap)" in page.text
        assert 'id="lockouts"' in page.text
        assert ALICE in page.text.split('id="lockouts"')[1].split("</section>")[0]
        token = _CSRF.search(page.text)
        assert token
        response = web.post("/console/events/unlock", data={
            "csrf": token.group(1), "peer": "127.0.0.1", "account": f"mailbox:{ALICE}"})
        assert response.status_code == 303
        after = web.get("/console/events")
        assert 'id="lockouts"' not in after.text
        assert f"unlocked {ALICE} from 127.0.0.1 (by admin)" in after.text
    assert imap_login(locked, PASSWORD) == "OK"


def test_unlock_needs_the_form_token(locked: BoxHandle) -> None:
    with admin_console(locked) as web:
        response = web.post("/console/events/unlock", data={"peer": "127.0.0.1", "account": f"mailbox:{ALICE}"})
        assert response.status_code == 403
    assert "[UNAVAILABLE]" in imap_login(locked, PASSWORD)


def set_password(box: BoxHandle, kind: str, name: str, password: str) -> None:
    """What the README says to do about a forgotten password, from the box's command line."""
    result = subprocess.run([LETTERBOX, "--data", str(box.data.root), kind, "passwd", name, "--password-stdin"],
                            input=password + "\n", capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def web_login(box: BoxHandle, name: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=f"https://localhost:{box.port('https')}", verify=box.client_context) as web:
        token = _CSRF.search(web.get("/login").text)
        assert token
        return web.post("/login", data={"csrf": token.group(1), "name": name, "password": password})


def test_a_new_password_lifts_the_lockout_its_owner_earned_guessing(locked: BoxHandle) -> None:
    """Someone who forgot their password tried until locked out; the administrator set a new one. The
    new password was refused "try again in 15 minutes" all the same."""
    new = "alice's new long password"
    set_password(locked, "user", ALICE, new)
    assert imap_login(locked, new) == "OK"
    with admin_console(locked) as web:
        assert f"lifted the lockout of {ALICE} from 127.0.0.1: its password was changed" in web.get("/console/events").text


def test_another_accounts_new_password_leaves_the_lockout(locked: BoxHandle) -> None:
    locked.add_user("bob@example.test", "bob's long password 9")
    set_password(locked, "user", "bob@example.test", "bob's new long password")
    assert "[UNAVAILABLE]" in imap_login(locked, PASSWORD)


def test_an_administrator_locked_out_of_the_console_gets_in_with_the_password_set_by_the_cli(box: BoxHandle) -> None:
    with admin_console(box):
        pass  # the wizard's first step made the administrator
    box.services.auth.throttle = Throttle(LOCKOUT)
    for _ in range(3):
        assert web_login(box, ADMIN, WRONG).status_code == 401
    assert web_login(box, ADMIN, WRONG).status_code == 429
    new = "the administrator's new password"
    set_password(box, "admin", ADMIN, new)
    assert web_login(box, ADMIN, new).status_code == 303
