"""POP3 sessions of one mailbox side by side, against Debian's Dovecot 2.3 (bench.peers.BenchDovecot, its
defaults: pop3_lock_session = no): one script of three sessions run on both, every reply's status and
response code and what is left in the INBOX compared."""

from __future__ import annotations

import poplib
import re
import smtplib
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trustme

from bench.peers import BenchDovecot
from tests.conftest import ServedBox

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
Step = tuple[str, str]  # what was asked, how it was answered: "+OK", "-ERR" or "-ERR [CODE]" (or a count of messages)


def message(n: int) -> bytes:
    return f"From: sender@example.org\r\nTo: {USER}\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()


def answer(call: Callable[[], object]) -> str:
    try:
        call()
    except poplib.error_proto as exc:
        text = exc.args[0].decode()
        code = re.match(r"-ERR (\[[^\]]+\])", text)
        return f"-ERR {code.group(1)}" if code else "-ERR"
    return "+OK"


def subjects(client: poplib.POP3) -> list[str]:
    found = []
    for n in range(1, client.stat()[0] + 1):
        _, lines, _ = client.top(n, 0)
        found += [line.decode() for line in lines if line.startswith(b"Subject: ")]
    return found


def script(login: Callable[[], poplib.POP3]) -> list[Step]:
    """Two sessions together; the first removes 1 and 2; the second then asks for 1 and 2, marks 1 and 4."""
    steps: list[Step] = []
    first, second = login(), login()

    def ask(what: str, call: Callable[[], object]) -> None:
        steps.append((what, answer(call)))

    for name, client in (("A", first), ("B", second)):
        steps.append((f"{name} STAT", str(client.stat()[0])))
        ask(f"{name} RETR 1", partial(client.retr, 1))
    ask("A DELE 1", lambda: first.dele(1))
    ask("A DELE 2", lambda: first.dele(2))
    ask("A QUIT", first.quit)
    steps.append(("B STAT", str(second.stat()[0])))
    ask("B LIST 1", lambda: second.list(1))
    ask("B UIDL 1", lambda: second.uidl(1))
    ask("B RETR 1", lambda: second.retr(1))
    ask("B TOP 2 0", lambda: second.top(2, 0))
    ask("B RETR 3", lambda: second.retr(3))
    ask("B DELE 1", lambda: second.dele(1))
    ask("B DELE 4", lambda: second.dele(4))
    steps.append(("B STAT after DELE", str(second.stat()[0])))
    ask("B QUIT", second.quit)
    third = login()
    steps.append(("C subjects", str(subjects(third))))
    ask("C QUIT", third.quit)
    return steps


@pytest.fixture
def dovecot(ca: trustme.CA) -> Iterator[BenchDovecot]:
    work = Path(tempfile.mkdtemp(prefix="letterbox-pop3-"))  # Dovecot's root login processes read these
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = work / "cert.pem", work / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    server = BenchDovecot({USER: PASSWORD}, (cert, key))
    try:
        server.write_config()
        maildir = server.maildir(USER)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for n in range(1, 5):
            (maildir / "new" / f"{1_700_000_000 + n}.M{n}P1.sender").write_bytes(message(n))
        server.give_mail_to_dovecot()
        server.start()
        yield server
    finally:
        server.cleanup()
        for path in (cert, key):
            path.unlink()
        work.rmdir()


def test_sessions_side_by_side_answer_as_dovecot(dovecot: BenchDovecot, served_box: ServedBox) -> None:
    served_box.add_user(USER, PASSWORD)
    with smtplib.SMTP("127.0.0.1", served_box.port("smtp"), timeout=30) as smtp:
        for n in range(1, 5):
            smtp.sendmail("sender@example.org", [USER], message(n))

    def login_to(port: int) -> Callable[[], poplib.POP3]:
        def login() -> poplib.POP3:
            client = poplib.POP3_SSL("127.0.0.1", port, context=served_box.client_context, timeout=30)
            client.user(USER)
            client.pass_(PASSWORD)
            return client
        return login

    theirs = script(login_to(dovecot.pop3s_port))
    ours = script(login_to(served_box.port("pop3s")))
    assert ours == theirs
    # What Dovecot 2.3.19 answers, so a change on either side is seen here.
    assert dict(theirs)["B RETR 1"] == "-ERR"  # "-ERR Message 1 expunged."
    assert dict(theirs)["B DELE 1"] == "+OK"
    assert dict(theirs)["C subjects"] == "['Subject: m3']"
