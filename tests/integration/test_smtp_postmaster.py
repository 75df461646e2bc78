"""RFC 5321 4.5.1: `RCPT TO:<postmaster>` and postmaster@ every local domain are accepted on the MX
and LMTP even when nobody made a postmaster alias, and reach the administrators (issue 10 item 14);
RFC 2142's abuse@ every local domain too, as Mail-in-a-Box gives every domain both."""

from __future__ import annotations

import pytest

from tests.conftest import BoxHandle
from tests.support.smtp_wire import Wire, maildir_messages

PASSWORD = "correct horse battery staple 9"
BOB, ALICE, CAROL = "bob@ourdomain.test", "alice@ourdomain.test", "carol@example.test"
MESSAGE = b"From: x@sender.test\r\nSubject: abuse report\r\n\r\nHello postmaster.\r\n.\r\n"


@pytest.fixture
def served(box: BoxHandle) -> BoxHandle:
    box.add_user(BOB, PASSWORD)
    # created_at has one-second resolution: make bob older by setting his clock back, not by sleeping.
    box.run(box.services.db.execute("UPDATE mailboxes SET created_at = created_at - 60 WHERE local_part = 'bob'"))
    box.add_user(ALICE, PASSWORD)
    box.add_user(CAROL, PASSWORD)  # example.test: the domain of the box's name, mail.example.test
    box.run(box.services.accounts.add_domain("second.test"))
    return box


def deliver(box: BoxHandle, service: str, recipients: list[str]) -> list[tuple[int, str]]:
    with Wire(box.port(service)) as wire:
        assert wire.reply()[0] == 220
        assert wire.cmd(("LHLO" if service == "lmtp" else "EHLO") + " mta.sender.test")[0] == 250
        assert wire.cmd("MAIL FROM:<x@sender.test>")[0] == 250
        replies = [wire.cmd(f"RCPT TO:<{rcpt}>") for rcpt in recipients]
        if any(code == 250 for code, _ in replies):
            assert wire.cmd("DATA")[0] == 354
            wire.send(MESSAGE)
            for _ in range(sum(code == 250 for code, _ in replies) if service == "lmtp" else 1):
                assert wire.reply()[0] == 250
        return replies


FORMS = ["postmaster", "Postmaster", "POSTMASTER@ourdomain.test", "postmaster@example.test",
         "postmaster@second.test"]


@pytest.mark.parametrize("service", ["smtp", "lmtp"])
def test_postmaster_without_an_alias_reaches_the_first_mailbox_of_the_primary_domain(
    served: BoxHandle, service: str
) -> None:
    # No admin is a mailbox here: the oldest mailbox of example.test (the box is mail.example.test).
    for form in FORMS:
        [(code, text)] = deliver(served, service, [form])
        assert code == 250, (form, text)
    assert len(maildir_messages(served.data.mail, CAROL)) == len(FORMS)
    assert maildir_messages(served.data.mail, BOB) == []
    assert maildir_messages(served.data.mail, ALICE) == []


@pytest.mark.parametrize("service", ["smtp", "lmtp"])
def test_postmaster_reaches_the_administrators_with_a_mailbox(served: BoxHandle, service: str) -> None:
    # Admin names can no longer hold an '@' (such an admin could never log in), so an administrator named
    # like a mailbox is one carried over from an earlier version: stored as it would have been.
    served.run(served.services.db.execute(
        "INSERT INTO admins (username, password_hash, created_at) VALUES (?, 'x', 0)", (ALICE,)))
    served.run(served.services.accounts.add_admin("root", PASSWORD))  # no mailbox of that name
    [(code, _)], [(code2, _)] = deliver(served, service, ["postmaster"]), deliver(served, service,
                                                                              ["postmaster@second.test"])
    assert code == code2 == 250
    assert len(maildir_messages(served.data.mail, ALICE)) == 2
    assert maildir_messages(served.data.mail, CAROL) == []


def test_an_alias_made_for_postmaster_still_wins(served: BoxHandle) -> None:
    served.run(served.services.accounts.add_alias("postmaster@ourdomain.test", [BOB]))
    [(code, _)] = deliver(served, "smtp", ["postmaster@ourdomain.test"])
    assert code == 250
    assert len(maildir_messages(served.data.mail, BOB)) == 1


def test_other_unknown_users_and_foreign_postmasters_are_still_refused(served: BoxHandle) -> None:
    replies = deliver(served, "smtp", ["nobody@ourdomain.test", "postmaster@external.test", "postmaster@[127.0.0.1]"])
    assert [code for code, _ in replies] == [550, 554, 554]


@pytest.mark.parametrize("service", ["smtp", "lmtp"])
def test_abuse_without_an_alias_reaches_the_postmasters_mailbox(served: BoxHandle, service: str) -> None:
    forms = ["abuse@ourdomain.test", "Abuse@example.test", "ABUSE@second.test"]
    assert [code for code, _ in deliver(served, service, forms)] == [250, 250, 250]
    assert len(maildir_messages(served.data.mail, CAROL)) == 1  # one copy for the three
    assert maildir_messages(served.data.mail, BOB) == []


def test_an_alias_or_mailbox_named_abuse_still_wins(served: BoxHandle) -> None:
    served.run(served.services.accounts.add_alias("abuse@ourdomain.test", [BOB]))
    served.add_user("abuse@second.test", PASSWORD)
    assert [code for code, _ in deliver(served, "smtp", ["abuse@ourdomain.test", "abuse@second.test"])] == [250, 250]
    assert len(maildir_messages(served.data.mail, BOB)) == 1
    assert len(maildir_messages(served.data.mail, "abuse@second.test")) == 1
    assert maildir_messages(served.data.mail, CAROL) == []


def test_a_bare_abuse_and_a_foreign_abuse_are_refused(served: BoxHandle) -> None:
    # RFC 5321 4.5.1 names only Postmaster as a recipient without a domain.
    replies = deliver(served, "smtp", ["abuse", "abuse@external.test", "abuse@[127.0.0.1]"])
    assert [code for code, _ in replies] == [553, 554, 554]
