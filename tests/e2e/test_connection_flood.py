"""`letterbox serve` as a real process under connection floods from many loopback source addresses, with
its default limits (issue 10 items 2 and 6): abrupt TLS clients, then 2,000 idle sockets, and a normal
client still logs in on every TLS port and delivers through the MX."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import ServedBox
from tests.support.flood import (
    TLS_SERVICES,
    abrupt_tls_flood,
    deliver,
    hold,
    idle_flood_sources,
    login,
    raise_open_files_limit,
)

pytestmark = pytest.mark.e2e

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


def test_abrupt_tls_flood_then_idle_flood_and_a_normal_client_is_served(served_box: ServedBox) -> None:
    raise_open_files_limit()
    served_box.add_user(USER, PASSWORD)
    # 1,002 abrupt TLS clients from 127.0.0.2..127.0.0.21; 127.0.0.2 resets 60 completed handshakes
    # per port, past every per-address limit, so one leaked slot each would lock it out.
    abrupt_tls_flood(served_box.port)
    context = served_box.client_context
    for service in TLS_SERVICES:
        login(service, served_box.port(service), "127.0.0.2", context, USER, PASSWORD)

    # 2,000 idle sockets: the MX from 100 addresses of one /24 and 5 others, IMAP from 40 and 2.
    mx_sources, imap_sources = idle_flood_sources()
    held: list[socket.socket] = []
    try:
        held += hold(served_box.port("smtp"), mx_sources)
        held += hold(served_box.port("imap"), imap_sources)
        assert len(held) == 2000
        legit = "127.0.9.1"
        deliver(served_box.port("smtp"), legit, USER)
        login("imap", served_box.port("imap"), legit, context, USER, PASSWORD)
        login("pop3", served_box.port("pop3"), legit, context, USER, PASSWORD)
    finally:
        for sock in held:
            sock.close()
    log = served_box.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("too many connections") < 50  # one line per interval, not one per refusal
