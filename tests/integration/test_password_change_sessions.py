"""A password changed because it leaked ends the sessions logged in with the old one: the thief's IMAP
IDLE is told BYE at once (the console's change) or within a few seconds (the CLI's, another process:
appliance/session_watch.py), its other IMAP and POP3 sessions end at their next command and its SMTP
session's login stops counting. Sessions logged in with the new password go on. Before, a password
change ended only the web sessions: a phone in IDLE went on receiving the mailbox's mail for hours.
(A change while a login's password is checked: test_mailbox_removal_sessions.)"""

from __future__ import annotations

import poplib
import smtplib
import subprocess

import pytest

from appliance import passwords
from appliance.admin import Admin
from tests.conftest import LETTERBOX, TEST_HASHER, BoxHandle
from tests.integration.test_mailbox_removal_sessions import JONH, NEW_PASSWORD, OLD_PASSWORD, idling
from tests.support.imap_wire import RawImap

BYE = b"* BYE The password of this account was changed\r\n"


def cli_passwd(box: BoxHandle) -> None:
    subprocess.run([LETTERBOX, "--data", str(box.data.root), "user", "passwd", JONH, "--password-stdin"],
                   input=NEW_PASSWORD + "\n", text=True, check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("by", ["console", "cli"])
@pytest.mark.parametrize("selected", [True, False], ids=["selected", "no-folder"])
def test_an_idling_session_of_the_old_password_ends_and_one_of_the_new_goes_on(
    box: BoxHandle, by: str, selected: bool,
) -> None:
    box.add_user(JONH, OLD_PASSWORD)
    thief = idling(box, OLD_PASSWORD, selected=selected)
    try:
        if by == "console":
            box.run(Admin.of(box.services).set_mailbox_password(JONH, NEW_PASSWORD, by_owner=True))
        else:
            cli_passwd(box)
        assert thief.line() == BYE
        assert thief.closed()
    finally:
        thief.close()
    owner = idling(box, NEW_PASSWORD, selected=True)
    try:
        box.run(box.services.store.deliver([JONH], b"Subject: after\r\n\r\nfor the owner only\r\n"))
        assert owner.line() == b"* 1 EXISTS\r\n"  # woken by the delivery, still logged in
        owner.send(b"DONE\r\n")
        assert owner.until_tagged(b"I")[-1].startswith(b"I OK")
    finally:
        owner.close()


def test_imap_pop3_and_smtp_sessions_of_the_old_password_end_at_their_next_command(box: BoxHandle) -> None:
    box.add_user(JONH, OLD_PASSWORD)
    box.run(box.services.store.deliver([JONH], b"Subject: old\r\n\r\nold letter\r\n"))
    message = f"From: {JONH}\r\nSubject: hello\r\n\r\nhi\r\n".encode()
    imap = RawImap(box.port("imaps"), box.client_context)
    pop = poplib.POP3_SSL("127.0.0.1", box.port("pop3s"), context=box.client_context, timeout=15)
    smtp = smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), context=box.client_context, timeout=15)
    try:
        imap.login(JONH, OLD_PASSWORD)
        imap.command(b"S", b"SELECT INBOX")
        pop.user(JONH)
        pop.pass_(OLD_PASSWORD)
        smtp.login(JONH, OLD_PASSWORD)
        cli_passwd(box)
        imap.send(b"F FETCH 1 (BODY.PEEK[])\r\n")
        assert imap.line() == BYE
        assert imap.closed()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\] The password of this account was changed"):
            pop.retr(1)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(JONH, ["someone@remote.example"], message)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (530, b"5.7.0 Authentication required")
        smtp.login(JONH, NEW_PASSWORD)  # the same connection, logged in again with the new password
        assert smtp.sendmail(JONH, ["someone@remote.example"], message) == {}
    finally:
        imap.close()
        pop.close()
        smtp.close()
    assert len(box.run(box.services.spool.messages())) == 1


def test_the_owners_devices_logging_in_at_once_while_the_hash_is_upgraded_all_log_in(box: BoxHandle) -> None:
    """A stored hash of other argon2 parameters (an update changed them) is rehashed at a login. Two of
    the owner's devices logging in at once (a hash slot each) both proved the old hash; the second's
    compare-and-set of its rehash then failed, it logged in under the old hash, and the session, which
    ends under any hash but the one stored now, refused it: 'Authentication failed' for the right
    password, and the phone asked for it again. It now checks the password against the hash stored
    (another login's rehash of it) and logs in under that."""
    box.add_user(JONH, OLD_PASSWORD)
    sources = ["127.0.0.10", "127.0.0.11"]  # two devices the box knows: both may take a hash slot
    for source in sources:
        known = RawImap(box.port("imaps"), box.client_context, source=source)
        known.login(JONH, OLD_PASSWORD)
        known.close()
    older = passwords.make_hasher(time_cost=3, memory_cost_kib=8 * 1024, parallelism=1)
    refused = []
    for _ in range(5):  # the race is lost in most rounds without the change
        box.run(box.services.db.execute("UPDATE mailboxes SET password_hash = ?", (older.hash(OLD_PASSWORD),)))
        devices = [RawImap(box.port("imaps"), box.client_context, source=source) for source in sources]
        try:
            for n, device in enumerate(devices):
                device.send(b'L%d LOGIN "%s" "%s"\r\n' % (n, JONH.encode(), OLD_PASSWORD.encode()))
            refused += [answer for n, device in enumerate(devices)
                        if not (answer := device.until_tagged(b"L%d" % n)[-1]).startswith(b"L%d OK" % n)]
        finally:
            for device in devices:
                device.close()
    assert not refused, refused
    stored = box.run(box.services.accounts.mailbox_credentials(JONH))
    assert stored is not None
    assert not passwords.needs_rehash(stored.password_hash, TEST_HASHER)  # upgraded
