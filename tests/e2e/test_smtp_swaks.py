"""`letterbox serve` driven by Debian's swaks: receive, submit with AUTH, wrong password, relay attempt,
oversize, unknown user."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.smtp.limits import MAX_MESSAGE_OCTETS
from tests.conftest import ServedBox, require_program
from tests.support.smtp_wire import hold_outbound_sql, maildir_messages, parse

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 9"
ALICE, BOB = "alice@ourdomain.test", "bob@ourdomain.test"


@pytest.fixture
def served(served_box: ServedBox) -> ServedBox:
    hold_outbound_sql(served_box.data.db)
    served_box.add_user(ALICE, PASSWORD)
    served_box.add_user(BOB, PASSWORD)
    return served_box


def swaks(served: ServedBox, service: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [require_program("swaks"), "--server", "localhost", "--port", str(served.port(service)),
               "--helo", "client.test", "--timeout", "30", *args]
    if any(a in ("--tls", "--tlsc") for a in args):
        command += ["--tls-verify", "--tls-ca-path", str(served.ca_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_receive_on_the_mx(served: ServedBox) -> None:
    result = swaks(served, "smtp", "--from", "sender@external.test", "--to", ALICE,
                   "--header", "Subject: swaks receive", "--body", "hello from swaks")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout
    [raw] = maildir_messages(served.data.mail, ALICE)
    msg = parse(raw)
    assert msg["Subject"] == "swaks receive"
    assert msg["Delivered-To"] == ALICE
    assert "hello from swaks" in msg.get_payload()


@pytest.mark.parametrize(("service", "tls", "mechanism"),
                         [("submission", "--tls", "PLAIN"), ("submissions", "--tlsc", "LOGIN")])
def test_submit_with_auth(served: ServedBox, service: str, tls: str, mechanism: str) -> None:
    result = swaks(served, service, tls, "--auth", mechanism, "--auth-user", ALICE, "--auth-password", PASSWORD,
                   "--from", ALICE, "--to", f"{BOB},carol@external.test", "--header", "Subject: submitted")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    [raw] = maildir_messages(served.data.mail, BOB)
    assert "with ESMTPSA" in " ".join(parse(raw)["Received"].split())
    assert PASSWORD not in raw.decode()
    listing = served.cli("queue", "list").stdout
    assert "carol@external.test  queued" in listing


def test_wrong_password(served: ServedBox) -> None:
    result = swaks(served, "submission", "--tls", "--auth", "PLAIN", "--auth-user", ALICE,
                   "--auth-password", "not the password", "--from", ALICE, "--to", BOB)
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout
    assert maildir_messages(served.data.mail, BOB) == []


def test_relay_attempt(served: ServedBox) -> None:
    result = swaks(served, "smtp", "--from", "spammer@external.test", "--to", "victim@elsewhere.test")
    assert result.returncode != 0
    assert "554 5.7.1 <victim@elsewhere.test>: Relay access denied" in result.stdout
    assert "queue is empty" in served.cli("queue", "list").stdout


def test_unknown_user(served: ServedBox) -> None:
    result = swaks(served, "smtp", "--from", "sender@external.test", "--to", "nobody@ourdomain.test")
    assert result.returncode != 0
    assert "550 5.1.1" in result.stdout


def test_oversize(served: ServedBox, tmp_path: Path) -> None:
    body = tmp_path / "big.txt"
    line = b"x" * 76 + b"\r\n"
    with body.open("wb") as f:
        for _ in range(MAX_MESSAGE_OCTETS // len(line) + 1000):
            f.write(line)
    result = swaks(served, "smtp", "--from", "sender@external.test", "--to", ALICE, "--body", f"@{body}",
                   "--silent", "2", timeout=120)
    assert result.returncode != 0
    assert "552 5.3.4" in result.stdout + result.stderr
    assert maildir_messages(served.data.mail, ALICE) == []
