"""Issue 10 item 1, for sessions: an IMAP or POP3 session logged in before its mailbox was removed ends at
its next command; it never reads (or, at QUIT, deletes) the mail of a mailbox created later under the
same address. Before, both sessions went on by address and saw the new owner's mail."""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import smtplib
import subprocess

import pytest

from appliance.admin import Admin
from tests.conftest import LETTERBOX, BoxHandle
from tests.support.imap_wire import RawImap

JONH = "jonh@example.test"
OLD_PASSWORD, NEW_PASSWORD = "the first jonh's password", "the second jonh's password"


def replace_jonh(box: BoxHandle) -> None:
    """The administrator removes jonh, a new person gets the address, and mail arrives for them."""
    accounts = box.services.accounts
    box.run(accounts.remove_user(JONH))
    box.run(accounts.add_user(JONH, NEW_PASSWORD))
    [uid] = box.run(box.services.store.deliver([JONH], b"Subject: for the new jonh\r\n\r\nnew secret\r\n")).values()
    assert uid == 1  # the same UID the old session's message had


def idling(box: BoxHandle, password: str, *, selected: bool) -> RawImap:
    """A phone logged in to jonh in IDLE, with INBOX selected or no folder."""
    client = RawImap(box.port("imaps"), box.client_context, timeout=10)
    client.login(JONH, password)
    if selected:
        client.command(b"S", b"SELECT INBOX")
    client.send(b"I IDLE\r\n")
    assert client.line() == b"+ idling\r\n"
    return client


def test_imap_session_of_a_removed_mailbox_ends(box: BoxHandle) -> None:
    box.add_user(JONH, OLD_PASSWORD)
    box.run(box.services.store.deliver([JONH], b"Subject: old\r\n\r\nold letter\r\n"))
    imap = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=15)
    try:
        imap.login(JONH, OLD_PASSWORD)
        assert imap.select("INBOX")[1] == [b"1"]
        replace_jonh(box)
        with pytest.raises(imaplib.IMAP4.abort, match="no longer exists"):
            imap.uid("FETCH", "1", "(BODY.PEEK[])")
    finally:
        with contextlib.suppress(OSError):
            imap.shutdown()
    new = imaplib.IMAP4_SSL("127.0.0.1", box.port("imaps"), ssl_context=box.client_context, timeout=15)
    try:
        new.login(JONH, NEW_PASSWORD)
        assert new.select("INBOX")[1] == [b"1"]
    finally:
        new.logout()


def test_pop3_session_of_a_removed_mailbox_ends(box: BoxHandle) -> None:
    box.add_user(JONH, OLD_PASSWORD)
    box.run(box.services.store.deliver([JONH], b"Subject: old\r\n\r\nold letter\r\n"))
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=15)
    try:
        pop.user(JONH)
        pop.pass_(OLD_PASSWORD)
        pop.dele(1)
        replace_jonh(box)
        with pytest.raises(poplib.error_proto, match="no longer exists"):
            pop.retr(1)
    finally:
        pop.close()
    messages = box.run(box.services.store.snapshot(JONH, "INBOX")).messages
    assert len(messages) == 1
    assert b"new secret" in messages[0].path.read_bytes()


@pytest.mark.parametrize("selected", [True, False], ids=["selected", "no-folder"])
def test_an_idling_session_of_a_removed_mailbox_gets_bye(box: BoxHandle, selected: bool) -> None:
    """The console removes the mailbox of a phone in IDLE: the phone is told BYE at once and the
    connection ends, as at any other command. Before, the IDLE was answered a tagged NO [CANNOT] no
    such mailbox the client had not asked for (no DONE sent), and the session stayed logged in."""
    box.add_user(JONH, OLD_PASSWORD)
    client = idling(box, OLD_PASSWORD, selected=selected)
    try:
        box.run(Admin.of(box.services).remove_mailbox(JONH))
        assert client.line() == b"* BYE This mailbox no longer exists\r\n"
        assert client.closed()
    finally:
        client.close()


@pytest.mark.parametrize(("change", "bye"), [("disable", b"This account is disabled"),
                                             ("remove", b"This mailbox no longer exists")])
@pytest.mark.parametrize("selected", [True, False], ids=["selected", "no-folder"])
def test_an_idling_session_ends_when_the_cli_disables_or_removes_its_mailbox(
    box: BoxHandle, change: str, bye: bytes, selected: bool,
) -> None:
    """The `letterbox` CLI, another process, disables or removes the mailbox of a phone in IDLE: the
    phone is told BYE within a few seconds, as when the console does it. Before, the box noticed at
    IDLE's next look at the disk, a minute later (left alone last session), and the phone received
    the disabled mailbox's new mail until then; an IDLE with no folder selected was never told, by
    the console's change either."""
    box.add_user(JONH, OLD_PASSWORD)
    client = idling(box, OLD_PASSWORD, selected=selected)
    try:
        subprocess.run([LETTERBOX, "--data", str(box.data.root), "user", change, JONH], check=True,
                       capture_output=True, timeout=60)
        assert client.line() == b"* BYE " + bye + b"\r\n"
        assert client.closed()
    finally:
        client.close()


@pytest.mark.parametrize("change", ["remove", "disable"])
def test_a_submission_session_of_a_removed_or_disabled_mailbox_sends_no_more(box: BoxHandle, change: str) -> None:
    """A stolen password: the administrator removes or disables the mailbox while the thief's SMTP
    session is open. Its next MAIL FROM is 530 and a new AUTH fails. Before, the session went on
    sending as the address (queued, DKIM-signed by the domain) for as long as it stayed open."""
    box.add_user(JONH, OLD_PASSWORD)
    message = f"From: {JONH}\r\nSubject: hello\r\n\r\nhi\r\n".encode()
    admin = Admin.of(box.services)
    with smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), context=box.client_context, timeout=15) as client:
        client.login(JONH, OLD_PASSWORD)
        assert client.sendmail(JONH, ["someone@remote.example"], message) == {}
        box.run(admin.remove_mailbox(JONH) if change == "remove" else admin.update_mailbox(JONH, enabled=False))
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(JONH, ["someone@remote.example"], message)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (530, b"5.7.0 Authentication required")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(JONH, OLD_PASSWORD)
    assert len(box.run(box.services.spool.messages())) == 1


def test_imap_and_pop3_sessions_of_a_disabled_mailbox_end(box: BoxHandle) -> None:
    """The administrator disables a mailbox (a stolen password): its open IMAP session (a phone in
    IDLE) and POP3 session end at once or at their next command, as its SMTP session's login stops
    counting. Before, they went on reading and deleting mail for as long as they stayed open."""
    box.add_user(JONH, OLD_PASSWORD)
    box.run(box.services.store.deliver([JONH], b"Subject: old\r\n\r\nold letter\r\n"))
    imap = RawImap(box.port("imaps"), box.client_context)
    idling = RawImap(box.port("imaps"), box.client_context)
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=15)
    try:
        imap.login(JONH, OLD_PASSWORD)
        imap.command(b"S", b"SELECT INBOX")
        idling.login(JONH, OLD_PASSWORD)
        idling.command(b"S", b"SELECT INBOX")
        idling.send(b"I IDLE\r\n")
        assert idling.line() == b"+ idling\r\n"
        pop.user(JONH)
        pop.pass_(OLD_PASSWORD)
        box.run(Admin.of(box.services).update_mailbox(JONH, enabled=False))
        assert idling.line() == b"* BYE This account is disabled\r\n"
        imap.send(b"F FETCH 1 (BODY.PEEK[])\r\n")
        assert imap.line() == b"* BYE This account is disabled\r\n"
        assert imap.closed()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\] This account is disabled"):
            pop.retr(1)
    finally:
        imap.close()
        idling.close()
        pop.close()
    assert len(box.run(box.services.store.snapshot(JONH, "INBOX")).messages) == 1


@pytest.mark.parametrize("change", ["disable", "password"])
def test_a_mailbox_changed_while_its_password_is_checked_is_not_logged_in(
    box: BoxHandle, monkeypatch: pytest.MonkeyPatch, change: str,
) -> None:
    """The administrator disables a mailbox, or its password is changed, while a login's password check
    (argon2, on a thread) runs: the login is refused. Before, the session kept "no mailbox" as the one
    it logged in to, which is what every later check found too, so it never ended and read the disabled
    mailbox's mail; a session of the old password went on after the change."""
    box.add_user(JONH, OLD_PASSWORD)
    auth = box.services.auth
    checked = auth.login
    admin = Admin.of(box.services)

    async def changed_meanwhile(*args: object, **kwargs: object) -> object:
        principal = await checked(*args, **kwargs)  # type: ignore[arg-type]
        if change == "password":
            await admin.set_mailbox_password(JONH, NEW_PASSWORD)
        else:
            await admin.update_mailbox(JONH, enabled=True)  # (no change yet: warm caches)
            await admin.update_mailbox(JONH, enabled=False)
        return principal

    monkeypatch.setattr(auth, "login", changed_meanwhile)
    imap = RawImap(box.port("imaps"), box.client_context)
    try:
        imap.send(f'L LOGIN "{JONH}" "{OLD_PASSWORD}"\r\n'.encode())
        assert imap.line().startswith(b"L NO [AUTHENTICATIONFAILED]")
    finally:
        imap.close()
    box.run(admin.set_mailbox_password(JONH, OLD_PASSWORD) if change == "password"
            else admin.update_mailbox(JONH, enabled=True))
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=15)
    try:
        pop.user(JONH)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            pop.pass_(OLD_PASSWORD)
    finally:
        pop.close()
