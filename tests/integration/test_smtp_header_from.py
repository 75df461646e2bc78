"""Submission refuses a header From:/Sender: the login may not send as (issue 10 item 11): the same
rule as the envelope sender (own address, plus-addresses, aliases that reach the mailbox), over 587
with STARTTLS and 465 with implicit TLS."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import BoxHandle
from tests.support.smtp_wire import hold_outbound, maildir_messages

PASSWORD = "correct horse battery staple 9"
ALICE, BOB = "alice@ourdomain.test", "bob@ourdomain.test"


@pytest.fixture
def box_with_users(box: BoxHandle) -> BoxHandle:
    hold_outbound(box)
    box.add_user(ALICE, PASSWORD)
    box.add_user(BOB, PASSWORD)
    box.add_user("boss@second.test", PASSWORD)
    box.run(box.services.accounts.add_alias("sales@ourdomain.test", [ALICE]))
    return box


def submission_587(box: BoxHandle) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", box.port("submission"), timeout=30)
    client.starttls(context=box.client_context)
    return client


def submission_465(box: BoxHandle) -> smtplib.SMTP:
    return smtplib.SMTP_SSL("127.0.0.1", box.port("submissions"), timeout=30, context=box.client_context)


PORTS = [pytest.param(submission_587, id="587"), pytest.param(submission_465, id="465")]
Connect = Callable[[BoxHandle], smtplib.SMTP]


@pytest.fixture
def client(request: pytest.FixtureRequest, box_with_users: BoxHandle) -> Iterator[smtplib.SMTP]:
    connect: Connect = request.param
    smtp = connect(box_with_users)
    smtp.login(ALICE, PASSWORD)
    try:
        yield smtp
    finally:
        smtp.close()


def submit(client: smtplib.SMTP, head: str) -> tuple[int, bytes]:
    client.rset()
    assert client.mail(ALICE)[0] == 250
    assert client.rcpt(BOB)[0] == 250
    return client.data(f"{head}To: {BOB}\r\nSubject: test\r\n\r\nHello.\r\n".encode())


FORGED = [
    f"From: {BOB}\r\n",
    "From: Boss <boss@second.test>\r\n",
    f"From: Alice <{ALICE}>, {BOB}\r\n",  # RFC 5322 3.6.2: every author counts
    f"From: {ALICE}\r\nSender: {BOB}\r\n",
    f"From: {ALICE}\r\nFrom: {BOB}\r\n",  # a second field
    f"From: \"{ALICE}\" <{BOB}>\r\n",  # our address as the display name only
    f"NoColonHeader\r\nFrom: {BOB}\r\n",  # behind a malformed line
    f"From : {BOB}\r\n",  # obsolete syntax, still shown as From
    f"From: Alice\r\n <{BOB}>\r\n",  # folded
    "From: outsider@external.test\r\n",
    "From: Undisclosed:;\r\n",  # names nobody
    # Nested past the parser's recursion: 451 and a traceback, so the client retried for ever (audit30).
    f"From: {'g:' * 20_000}{ALICE}{';' * 20_000}\r\n",
    f"From: {ALICE} {'(' * 40_000}{')' * 40_000}\r\n",
]


ALLOWED = [
    f"From: {ALICE}\r\n",
    f"From: Alice Example <{ALICE.upper()}>\r\n",
    "From: Alice <alice+lists@ourdomain.test>\r\n",  # a plus-address of her own
    "From: Sales <sales@ourdomain.test>\r\n",  # an alias that reaches her
    f"From: Alice <{ALICE}>\r\nSender: sales@ourdomain.test\r\n",
    "",  # no From: at all: nothing forged
]


@pytest.mark.parametrize("client", PORTS, indirect=True)
def test_a_header_from_the_login_may_not_use_is_refused(client: smtplib.SMTP, box_with_users: BoxHandle) -> None:
    for head in FORGED:
        code, text = submit(client, head)
        assert code == 550, (head, code, text)
        assert text.startswith(b"5.7.1"), (head, code, text)
        assert b"may send as" in text, (head, code, text)
    assert maildir_messages(box_with_users.data.mail, BOB) == []


@pytest.mark.parametrize("client", PORTS, indirect=True)
def test_the_login_s_own_addresses_are_accepted(client: smtplib.SMTP, box_with_users: BoxHandle) -> None:
    for head in ALLOWED:
        code, text = submit(client, head)
        assert code == 250, (head, text)
    assert len(maildir_messages(box_with_users.data.mail, BOB)) == len(ALLOWED)


def test_a_from_hidden_past_a_huge_header_section_is_refused(box_with_users: BoxHandle) -> None:
    """The checks read the whole header section, so one longer than they read is refused outright."""
    padding = "".join(f"X-Pad-{i}: {'p' * 900}\r\n" for i in range(300))  # ~270 KB of fields
    with submission_465(box_with_users) as client:
        client.login(ALICE, PASSWORD)
        code, text = submit(client, padding + f"From: {BOB}\r\n")
        assert code == 552, text
        assert text.startswith(b"5.3.4"), text
        code, _ = submit(client, f"From: {ALICE}\r\n" + padding[: 100 * 1024])  # a long but fair header
        assert code == 250
    with smtplib.SMTP("127.0.0.1", box_with_users.port("smtp"), timeout=30) as mx:
        mx.ehlo("mta.test")
        mx.mail("x@sender.test")
        mx.rcpt(BOB)
        code, _ = mx.data((padding + "From: ceo@sender.test\r\nSubject: x\r\n\r\nx\r\n").encode())
        assert code == 552
    assert len(maildir_messages(box_with_users.data.mail, BOB)) == 1
