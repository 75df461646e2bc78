"""Shared pieces of the outbound tests (issue 7): a box whose queue delivers to a test zone served by a
loopback DNS server, receivers on loopback addresses, and helpers to watch the queue and the inbox."""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from typing import cast

import dns.resolver
import pytest
import trustme

from appliance import dkim_keys
from appliance.queue.service import OutboundQueue
from appliance.queue.spool import QueuedMessage
from tests.conftest import BoxHandle
from tests.support.dns_server import ZoneServer
from tests.support.polling import wait_until
from tests.support.receivers import Receiver, free_port
from tests.support.smtp_wire import maildir_messages

PASSWORD = "correct horse battery staple 9"
OURS = "ourdomain.test"
ALICE = f"alice@{OURS}"
BODY = b"From: Alice <alice@ourdomain.test>\r\nTo: someone@example.net\r\nSubject: hello\r\n\r\nHi there.\r\n"
MX1, MX2 = "127.0.0.2", "127.0.0.3"


class Outbound:
    """A box whose queue delivers to the test zone, plus helpers to drive and observe it."""

    def __init__(self, box: BoxHandle, zone: ZoneServer, port: int, ca: trustme.CA) -> None:
        self.box, self.zone, self.port, self.ca = box, zone, port, ca

    @property
    def queue(self) -> OutboundQueue:
        queue = self.box.services.queue
        assert isinstance(queue, OutboundQueue)
        return queue

    def setting(self, key: str, value: str) -> None:
        """Change a setting and make the queue read its settings again now."""
        self.box.run(self.box.services.db.set_setting(key, value))
        self.wake()

    def wake(self) -> None:
        self.box.loop.call_soon_threadsafe(self.queue.wake)

    def receiver(self, host: str, **options: object) -> Receiver:
        return Receiver(host, self.port, **options)  # type: ignore[arg-type]

    def server_tls(self, *names: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(names or ("mx.example.net",))).configure_cert(ctx)
        return ctx

    def submit(self, rcpts: list[str], data: bytes = BODY, sender: str = ALICE) -> str:
        with smtplib.SMTP("127.0.0.1", self.box.port("submission"), timeout=30) as client:
            client.starttls(context=self.box.client_context)
            client.login(ALICE, PASSWORD)
            code, text = client.sendmail(sender, rcpts, data), b""
            assert code == {}
            _ = text
        return ""

    def publish_dkim_key(self) -> dkim_keys.DkimKey:
        """Our domain's DKIM key, made and published in the test zone."""
        key = self.box.run(dkim_keys.ensure_key(self.box.services.db, self.box.data.dkim, OURS))
        self.zone.set(key.record_name, "TXT", [txt(key.txt_record())])
        return key

    def dkim_dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's TXT lookup (its dnsfunc), asking the test zone."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], self.zone.port
        return b"".join(next(iter(resolver.resolve(name.decode(), "TXT"))).strings)

    def messages(self) -> list[QueuedMessage]:
        return self.box.run(self.queue.spool.messages())

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
        try:
            wait_until(predicate, seconds=timeout, interval=0.05, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; queue: {self.messages()}") from None

    def stays_queued(self, rcpt: str, receiver: Receiver) -> None:
        """A message to `rcpt` submitted and the queue woken while delivery is on hold (queue_hold): after
        a pass and the 1 s retry interval it is still queued, and `receiver` got nothing."""
        self.submit([rcpt])
        [message] = self.messages()
        self.wake()
        time.sleep(1.5)
        assert receiver.transactions == []
        assert [m.id for m in self.messages()] == [message.id]

    def wait_empty(self, timeout: float = 20) -> None:
        self.wait_until(lambda: not self.messages(), timeout, "an empty queue")

    def inbox(self, address: str = ALICE) -> list[bytes]:
        return maildir_messages(self.box.data.mail, address)

    def wait_inbox(self, count: int = 1, address: str = ALICE, timeout: float = 20) -> list[bytes]:
        self.wait_until(lambda: len(self.inbox(address)) >= count, timeout, f"{count} message(s) for {address}")
        return self.inbox(address)


@pytest.fixture(name="zone")
def zone_fixture() -> Iterator[ZoneServer]:
    server = ZoneServer(ttl=0)  # tests change records; nothing may be cached
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="outbound")
def outbound_fixture(box: BoxHandle, zone: ZoneServer, ca: trustme.CA) -> Outbound:
    box.add_user(ALICE, PASSWORD)
    out = Outbound(box, zone, free_port(("127.0.0.1", MX1, MX2, "::1")), ca)
    out.setting("dns_resolver", zone.address)
    out.setting("outbound_port", str(out.port))
    out.setting("queue_retry_intervals", "1")
    out.setting("queue_hold", "0")
    return out


def mx(zone: ZoneServer, domain: str, *hosts: tuple[int, str, str]) -> None:
    """MX records for `domain`: (preference, host name, IPv4 address) each."""
    zone.set(domain, "MX", [f"{pref} {name}." for pref, name, _ in hosts])
    for _, name, address in hosts:
        zone.set(name, "A", [address])


def txt(value: str) -> str:
    """A TXT rdata in zone-file syntax: long values split into quoted strings of at most 255."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def parse(raw: bytes) -> Message:
    return message_from_bytes(raw)


def delivery_status(report: bytes) -> list[Message]:
    msg = parse(report)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    [status] = [part for part in msg.walk() if part.get_content_type() == "message/delivery-status"]
    return subparts(status)


def subparts(part: Message) -> list[Message]:
    """The parts of a multipart (or the blocks of a message/delivery-status), typed."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    return cast(list[Message], payload)


def decoded(part: Message) -> bytes:
    """A leaf part's body with its transfer encoding undone."""
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data
