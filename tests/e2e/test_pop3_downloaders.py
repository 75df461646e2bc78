"""`letterbox serve` emptied by a real POP3 downloader: fetchmail (STLS on 110, implicit TLS on 995)
downloads every message intact, once keeping them on the server and once deleting them, and a second
run finds nothing new."""

from __future__ import annotations

import os
import poplib
import smtplib
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ServedBox, require_program

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
FETCH_TIMEOUT = 120


def messages() -> list[bytes]:
    """Awkward on purpose: dot lines (stuffing), 8-bit text, a long line, one of about 2 MB."""
    bodies = [
        b"Plain body.\r\n",
        b".starts with a dot\r\n..two\r\n.\r\nafter a lone dot\r\n",
        "Grüße aus Köln, 8-bit body\r\n".encode(),
        b"x" * 900 + b"\r\n",
        b"".join(b"%06d .line of the big one\r\n" % i for i in range(80_000)),
    ]
    return [
        (f"From: sender{n}@example.org\r\nTo: {USER}\r\nSubject: pop test {n}\r\n"
         f"Message-ID: <pop{n}@example.org>\r\nMIME-Version: 1.0\r\n"
         f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() + body
        for n, body in enumerate(bodies, 1)
    ]


@pytest.fixture
def served(served_box: ServedBox) -> ServedBox:
    served_box.add_user(USER, PASSWORD)
    with smtplib.SMTP("127.0.0.1", served_box.port("smtp"), timeout=30) as smtp:
        for data in messages():
            smtp.sendmail("sender@example.org", [USER], data)
    return served_box


def stored(served: ServedBox) -> list[bytes]:
    """The messages as the box delivered them into the Maildir (with its trace headers)."""
    root = served.data.mail / "example.test" / "alice"
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (root / sub).iterdir())


def server_count(served: ServedBox) -> int:
    client = poplib.POP3_SSL("localhost", served.port("pop3s"), context=served.client_context, timeout=30)
    try:
        client.user(USER)
        client.pass_(PASSWORD)
        return client.stat()[0]
    finally:
        client.quit()


class Fetchmail:
    """fetchmail with its own home, handing each message to a script that writes it to `out`."""

    def __init__(self, served: ServedBox, work: Path, *, implicit_tls: bool, keep: bool) -> None:
        self.program = require_program("fetchmail")
        self.home = work / "fetchmail-home"
        self.home.mkdir()
        self.out = work / "fetched"
        self.out.mkdir()
        mda = work / "mda.sh"
        mda.write_text('#!/bin/sh\nexec cat > "$1/$(date +%s%N).$$"\n')
        mda.chmod(0o755)
        port = served.port("pop3s" if implicit_tls else "pop3")
        # PEERS.md: fetchmail matches the certificate against the host name, not IP SANs: 'localhost'.
        # No 'ssl' on 110 with sslproto set: fetchmail then insists on STLS.
        tls = "ssl" if implicit_tls else ""
        self.rc = self.home / "fetchmailrc"
        self.rc.write_text(
            "set no syslog\nset invisible\n"
            f"poll localhost with proto POP3 port {port} uidl\n"
            f'  user "{USER}" there with password "{PASSWORD}" is "root" here\n'
            f"  {'keep' if keep else 'nokeep'} no rewrite no stripcr no mimedecode\n"
            f'  {tls} sslproto "TLS1.2+" sslcertck sslcertfile "{served.ca_file}"\n'
            f'  mda "{mda} {self.out}"\n'
        )
        self.rc.chmod(stat.S_IRUSR | stat.S_IWUSR)  # fetchmail refuses an rc file others can read

    def run(self) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FETCHMAILHOME": str(self.home), "HOME": str(self.home)}
        # Its own pidfile too: run as root, fetchmail locks /var/run/fetchmail.pid whatever FETCHMAILHOME
        # says, and a parallel test's run then failed with "another foreground fetchmail is running".
        return subprocess.run([self.program, "-f", str(self.rc), "--pidfile", str(self.home / "fetchmail.pid"), "-v"],
                              env=env, capture_output=True, text=True, timeout=FETCH_TIMEOUT)

    def fetched(self) -> list[bytes]:
        return sorted(p.read_bytes() for p in self.out.iterdir())


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls-110", "tls-995"])
def test_fetchmail_keep_then_nothing_new(served: ServedBox, tmp_path: Path, implicit_tls: bool) -> None:
    delivered = stored(served)
    assert len(delivered) == len(messages())
    fetchmail = Fetchmail(served, tmp_path, implicit_tls=implicit_tls, keep=True)
    first = fetchmail.run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert fetchmail.fetched() == delivered
    assert server_count(served) == len(delivered)
    second = fetchmail.run()
    assert second.returncode == 1, second.stdout + second.stderr  # 1: no mail
    assert fetchmail.fetched() == delivered
    assert stored(served) == delivered


def test_fetchmail_delete_then_nothing_new(served: ServedBox, tmp_path: Path) -> None:
    delivered = stored(served)
    fetchmail = Fetchmail(served, tmp_path, implicit_tls=True, keep=False)
    first = fetchmail.run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert fetchmail.fetched() == delivered
    assert server_count(served) == 0
    assert stored(served) == []
    second = fetchmail.run()
    assert second.returncode == 1, second.stdout + second.stderr
    assert fetchmail.fetched() == delivered
