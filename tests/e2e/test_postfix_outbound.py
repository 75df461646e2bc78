"""Letterbox delivering to Debian's Postfix: mail submitted on 587 arrives in Postfix's mailbox, over
STARTTLS, with a DKIM signature that verifies against the key published in the test zone (issue 7).

`letterbox serve` runs as a subprocess; Postfix is a private instance on 127.0.0.2 (its own config,
queue and Maildir in a temp dir, PEERS.md); the test zone on a loopback DNS server sends the box there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import Iterator

import dkim
import dns.resolver
import pytest
import trustme

from appliance.db import Database
from tests.conftest import ServedBox, require_program
from tests.support.dns_server import ZoneServer
from tests.support.polling import wait_until
from tests.support.postfix import PostfixInstance
from tests.support.receivers import free_port

pytestmark = pytest.mark.e2e

POSTFIX_HOST = "127.0.0.2"
PASSWORD = "correct horse battery staple 9"
ALICE, BOB = "alice@ourdomain.test", "bob@example.net"

MAIN_CF = """\
myhostname = mx.example.net
virtual_mailbox_domains = example.net
virtual_mailbox_maps = texthash:{root}/etc/vmailbox
message_size_limit = 10240000
smtpd_tls_security_level = may
smtpd_tls_cert_file = {root}/etc/cert.pem
smtpd_tls_key_file = {root}/etc/key.pem
smtpd_tls_received_header = yes
"""


class PrivatePostfix(PostfixInstance):
    """A Postfix of our own: `postfix -c DIR start/stop`, mail for bob@example.net in a Maildir."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        cert = ca.issue_cert("mx.example.net")
        super().__init__(MAIN_CF, f"{POSTFIX_HOST}:{port} inet n - n - - smtpd\n", {
            "vmailbox": f"{BOB} example.net/bob/\n".encode(),
            "cert.pem": b"".join(blob.bytes() for blob in cert.cert_chain_pems),
            "key.pem": cert.private_key_pem.bytes(),
        })
        self.port = port

    def mailbox(self) -> list[bytes]:
        folder = self.root / "mail" / "example.net" / "bob" / "new"
        return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


@pytest.fixture
def postfix(ca: trustme.CA) -> Iterator[PrivatePostfix]:
    require_program("postfix")
    instance = PrivatePostfix(free_port(("127.0.0.1", POSTFIX_HOST)), ca)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = ZoneServer(ttl=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def set_settings(served: ServedBox, settings: dict[str, str]) -> None:
    """Write settings into the running box's db (SQLite WAL: a second connection is fine)."""

    async def write() -> None:
        db = await Database.open(served.data.db)
        try:
            for key, value in settings.items():
                await db.set_setting(key, value)
        finally:
            await db.close()

    asyncio.run(write())


def txt_rdata(value: str) -> str:
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def test_submitted_mail_reaches_postfix_signed_and_over_tls(
    served_box: ServedBox, postfix: PrivatePostfix, zone: ZoneServer
) -> None:
    swaks = require_program("swaks")
    served_box.add_user(ALICE, PASSWORD)
    rotated = served_box.cli("dkim", "rotate", "ourdomain.test").stdout
    m = re.search(r'^(\S+)\. IN TXT "(v=DKIM1;[^"]+)"$', rotated, re.MULTILINE)
    assert m, rotated
    zone.set(m.group(1), "TXT", [txt_rdata(m.group(2))])
    zone.set("example.net", "MX", ["10 mx.example.net."])
    zone.set("mx.example.net", "A", [POSTFIX_HOST])
    set_settings(served_box, {"dns_resolver": zone.address, "outbound_port": str(postfix.port), "queue_hold": "0"})

    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{served_box.port('submission')}", "--tls",
         "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
         "--from", ALICE, "--to", BOB, "--header", "Subject: hello from Letterbox",
         "--body", "Signed, sealed, delivered.", "--h-From", f"Alice <{ALICE}>"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    with contextlib.suppress(AssertionError):  # told with both logs just below
        wait_until(postfix.mailbox, seconds=45, interval=0.2, what="the message at postfix")
    delivered = postfix.mailbox()
    assert delivered, f"nothing arrived; postfix log:\n{postfix.log.read_text()}\nbox log:\n" \
                      f"{served_box.log_path.read_text()}"
    [raw] = delivered
    head = raw.split(b"\n\n", 1)[0].decode()
    assert "Subject: hello from Letterbox" in head
    assert re.search(r"Received: from localhost \(unknown \[127\.0\.0\.1\]\)\s+\(using TLSv1\.[23]", head), head
    assert f"<{BOB}>" in head
    assert "by mx.example.net (Postfix) with ESMTPS" in " ".join(head.split())

    def zone_txt(name: bytes, timeout: int = 5) -> bytes | None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], zone.port
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(next(iter(answer)).strings)

    signature = dkim.DKIM(raw)
    assert signature.verify(dnsfunc=zone_txt), "the DKIM signature does not verify"
    assert signature.domain == b"ourdomain.test"
    # postlogd writes the log from datagrams: qmgr's line may land after the mailbox does.
    wait_until(lambda: f"from=<{ALICE}>" in postfix.log.read_text(), seconds=30, what="postfix's log of the sender")
