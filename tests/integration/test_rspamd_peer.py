"""The tests' private rspamd (tests/support/rspamd.py) says at once when it cannot listen. rspamd goes on
without a listener whose port another process holds, so its /ping never answered and the wait ran to
its deadline; a fresh-clone CI run failed so, its message the tail of rspamd's Hyperscan lines: two
ports picked one at a time had come back the same, and Redis held rspamd's scanner port."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.conftest import require_program
from tests.support.ports import PortTaken, free_ports
from tests.support.rspamd import RspamdPeer


def test_a_scanner_port_another_process_holds_is_said_at_once(tmp_path: Path) -> None:
    require_program("rspamd")
    require_program("redis-server")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        controller, redis = free_ports(2)
        peer = RspamdPeer(tmp_path, scanner_port=holder.getsockname()[1], controller_port=controller,
                          redis_port=redis)
        started = time.monotonic()
        try:
            with pytest.raises(PortTaken, match="Address already in use"):
                peer.start()
        finally:
            peer.stop()
    assert time.monotonic() - started < peer.ready_seconds / 2
    assert not peer.procs
