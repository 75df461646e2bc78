"""Free loopback TCP ports for the test peers (pebble, Dovecot, the DNS server, qemu's forwards)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """`count` different free loopback ports. All are held until each is picked: one socket bound and
    closed at a time may be given the same port again (a fresh-clone `make image-test` got one port for
    two qemu forwards; a `make test` gave pebble one port for its ACME and management listeners)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]
