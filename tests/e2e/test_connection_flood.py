"""`letterbox serve` as a real process under connection floods from many loopback source addresses, with
its default limits (issue 10 items 2 and 6): abrupt TLS clients, then 2,000 idle sockets, and a normal
client still logs in on every TLS port and delivers through the MX."""

from __future__ import annotations

import smtplib
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ServedBox
from tests.support.flood import (
    MODES,
    RST_AFTER_HANDSHAKE,
    TLS_SERVICES,
    abrupt_tls,
    connect_from,
    login,
    raise_open_files_limit,
)

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def _hold(port: int, sources: list[str]) -> list[socket.socket]:
    def one(source: str) -> socket.socket | None:
        try:
            return connect_from(source, port, timeout=30)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [sock for sock in pool.map(one, sources) if sock is not None]


def test_abrupt_tls_flood_then_idle_flood_and_a_normal_client_is_served(served_box: ServedBox) -> None:
    raise_open_files_limit()
    served_box.add_user(USER, PASSWORD)
    # 1,002 abrupt TLS clients from 127.0.0.2..127.0.0.21; 127.0.0.2 resets 60 completed handshakes
    # per port, past every per-address limit, so one leaked slot each would lock it out.
    jobs = []
    for service in TLS_SERVICES:
        for j in range(167):
            if j < 60:
                jobs.append((served_box.port(service), service, "127.0.0.2", RST_AFTER_HANDSHAKE))
            else:
                jobs.append((served_box.port(service), service, f"127.0.0.{3 + j % 19}", MODES[j % 3]))
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(lambda job: abrupt_tls(*job), jobs))
    context = served_box.client_context
    for service in TLS_SERVICES:
        login(service, served_box.port(service), "127.0.0.2", context, USER, PASSWORD)

    # 2,000 idle sockets: the MX from 100 addresses of one /24 and 5 others, IMAP from 40 and 2.
    slash24 = [f"127.0.0.{i}" for i in range(2, 102)]
    mx_sources = [a for a in slash24 for _ in range(9)] + [f"127.0.{n}.1" for n in range(1, 6) for _ in range(20)]
    imap_sources = [a for a in slash24[:40] for _ in range(24)] + [f"127.0.{n}.1" for n in (6, 7) for _ in range(20)]
    held: list[socket.socket] = []
    try:
        held += _hold(served_box.port("smtp"), mx_sources)
        held += _hold(served_box.port("imap"), imap_sources)
        assert len(held) == 2000
        legit = "127.0.9.1"
        with smtplib.SMTP("127.0.0.1", served_box.port("smtp"), timeout=15, source_address=(legit, 0)) as mx:
            mx.sendmail("someone@sender.test", [USER], b"Subject: through the flood\r\n\r\nstill here\r\n")
        login("imap", served_box.port("imap"), legit, context, USER, PASSWORD)
        login("pop3", served_box.port("pop3"), legit, context, USER, PASSWORD)
    finally:
        for sock in held:
            sock.close()
    log = served_box.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("too many connections") < 50  # one line per interval, not one per refusal
